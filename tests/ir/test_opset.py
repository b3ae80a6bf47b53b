"""The op set is the single description of ops: every component's op names come from ``OPSET``.

Components that name ops: the kernel tables of every registered backend, the lowering tables of every
registered exporter (which must cover the whole op set), the nodes that passes create, and every
``trace.call(...)`` / ``Node(...)`` in the source.  A name known to any of them and not to the op set
fails here.  The fused ops' reference semantics equal the chains they replace (``fuse_attention``,
``fold_gelu_table`` on real ViT and Swin programs, both backends).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import ivit
from conftest import make_qmodel, random_pixels
from ivit.backends import BACKENDS
from ivit.ir import OPSET
from ivit.ir.interpret import plan, run
from ivit.ir.passes import PASSES, apply_passes
from ivit.ir.validate import validate

SRC = Path(ivit.__file__).parent


def test_every_op_is_fully_defined() -> None:
    for name, op in OPSET.items():
        assert op.name == name
        assert callable(op.reference) and callable(op.infer)
        assert op.doc, f"{name} has no docstring"
        assert len(op.const_names) == len(op.consts) and len(op.attr_names) == len(op.attrs)
        for a in op.attrs:
            assert a.kind in ("int", "ints") and a.lo <= a.hi
        assert op.since in (1, 2)


def test_backend_kernel_tables_name_only_ops_of_the_set() -> None:
    assert {"reference", "cpu"} <= set(BACKENDS)
    for b in BACKENDS.values():
        unknown = set(b.kernels()) - set(OPSET)
        assert not unknown, f"backend {b.name} has kernels for unknown ops {unknown}"
        assert set(b.passes) <= set(PASSES)


def test_exporter_lowering_tables_cover_exactly_the_op_set() -> None:
    try:
        export = importlib.import_module("ivit.export")
    except ImportError:
        pytest.skip("no exporters in this build")
    for ex in export.EXPORTERS.values():
        lowered = set(ex.lowerings())
        assert lowered - set(OPSET) == set(), f"{ex.name} lowers unknown ops {lowered - set(OPSET)}"
        missing = set(OPSET) - lowered - set(ex.unsupported())
        assert not missing, f"{ex.name} has no lowering for {sorted(missing)}"


def _literal_op_names() -> set[tuple[str, str]]:
    """``(file, op)`` for every ``call("op", ...)``, ``run("op", ...)``, ``Node("op", ...)`` (and the other
    op-dispatching helpers) and ``OPSET["op"]`` in the source."""
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                fn = node.func
                fname = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                if fname in ("call", "run", "_move", "Node", "get_op", "_factory", "_ref"):
                    found.add((path.name, node.args[0].value))
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "OPSET" \
                    and isinstance(node.slice, ast.Constant):
                found.add((path.name, node.slice.value))
    return found


def test_source_names_only_ops_of_the_set() -> None:
    names = _literal_op_names()
    assert len(names) > 20  # the scan does find the forwards' ops
    unknown = sorted((f, op) for f, op in names if op not in OPSET)
    assert not unknown, f"ops named in the source but not in the op set: {unknown}"


def test_all_modules_import() -> None:
    for m in pkgutil.walk_packages(ivit.__path__, "ivit."):
        importlib.import_module(m.name)


@pytest.fixture(scope="module", params=["vit_test", "swin_test"])
def program(request: pytest.FixtureRequest) -> ivit.Program:
    return ivit.freeze(make_qmodel(request.param))


@pytest.mark.parametrize("passes", [("fuse_attention",), ("fold_gelu_table",), ("fold_gelu_table", "fuse_attention")])
def test_fused_ops_equal_the_chains_they_replace(program: ivit.Program, passes: tuple[str, ...]) -> None:
    fused = apply_passes(program, passes)
    assert len(fused.nodes) < len(program.nodes)
    made = {n.op for n in fused.nodes} - {n.op for n in program.nodes}
    assert made and made <= {"attention", "requantize_table"}
    x = random_pixels(3, 32, seed=2)
    want = run(program, plan(program, validate(program).types, program.consts, {}), x)
    got = run(fused, plan(fused, validate(fused).types, fused.consts, {}), x)  # reference semantics of fused ops
    assert torch.equal(got, want)
    assert torch.equal(ivit.Engine(program, backend="cpu")(x), want)
