"""The import graph of ``ivit``: no cycles, and lower layers never import higher ones (not even lazily).

Every ``import`` statement of every module (module level and inside functions) is read with ``ast``.
Layers, bottom to top (``../shared/docs/ARCHITECTURE.md``): the integer ops and plain utilities; the
IR (op set, format, validation, passes, tracing); quantized tensors, the native kernel loader and C code
generation;
quantized modules; models; quantization; backends; proof and exporters; training, data and benchmarks;
workflows; the CLI; the package root.  A module may import its own layer or lower ones.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ivit"

LAYERS: list[tuple[str, ...]] = [
    ("ivit.errors", "ivit.ops", "ivit._io", "ivit.config"),
    ("ivit.ir",),
    ("ivit.qtensor", "ivit.native", "ivit.codegen"),
    ("ivit.nn",),
    ("ivit.models",),
    ("ivit.quant",),
    ("ivit.backends",),
    ("ivit.verify", "ivit.export"),
    ("ivit.data", "ivit.bench", "ivit.training"),
    ("ivit.workflows",),
    ("ivit.cli",),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the most specific known module that the import names
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and t.startswith("ivit"):
                out.add(t)
    return out


def _layer(mod: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(mod == g or mod.startswith(g + ".") for g in group):
            return i
    if mod == "ivit":
        return len(LAYERS)
    raise AssertionError(f"module {mod} is in no layer; add it to LAYERS")


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    # an import of the package root from a submodule means "a sibling module" (resolved above); the root
    # ``ivit/__init__`` itself is the public API on top of everything
    return {m: {t for t in _imports(m, p, known) if t != "ivit"} for m, p in mods.items()}


def test_every_module_has_a_layer() -> None:
    for m in _modules():
        _layer(m)


def test_lower_layers_never_import_higher_ones() -> None:
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, deps in _graph().items() for t in deps if _layer(t) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    # a package __init__ re-exporting its own submodules is not a cycle of code
    cycles = [c for c in cycles if not all(any(m == o or o.startswith(m + ".") for o in c) for m in c
                                           if _modules()[m].name == "__init__.py")]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("mod", ["ivit", "ivit.ops", "ivit.ir", "ivit.cli"])
def test_import_does_not_initialize_cuda(mod: str) -> None:
    code = f"import torch, {mod}; print(torch.cuda.is_initialized())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
