"""Offline compilation of the triton backend's kernels for a CUDA GPU, and the integer-only check of their code.

No GPU is needed: ``dry_launches`` runs a launcher of ``kernels`` with ``JITFunction.run`` replaced by a recorder
(each launch's argument types, constexprs and options), and ``compile_launch`` compiles a record with
``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (LLVM, then the bundled ``ptxas``).  This catches what the CPU
interpreter cannot: code-generation errors (dot shapes and dtypes, layouts) and any floating-point instruction in
the generated PTX (``fp_instructions``, the analogue of ``ivit.native.fp_instructions`` for the C library).
``ptxas_usage`` reports registers and spills per kernel; ``loaded_ptx`` gives the PTX of the kernels an engine has
actually compiled in this process (on a GPU), for the integer-only proof of the backend that ran.

Needs the kernels defined for compilation (``TRITON_INTERPRET`` unset when ``kernels`` is first imported).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Launch", "dry_launches", "compile_launch", "fp_instructions", "ptxas_usage", "sample_launches",
           "loaded_ptx"]


@dataclass
class Launch:
    """One recorded kernel launch: the kernel, its signature and constexprs, launch options."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> tuple:
        return (self.name, tuple(sorted(self.signature.items())), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))


@contextmanager
def _recording(calls: list[Launch]) -> Iterator[None]:
    from triton.runtime.jit import JITFunction, mangle_type

    original = JITFunction.run

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        names = [p.name for p in self.params]
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        sig: dict[str, str] = {}
        consts: dict[str, Any] = {}
        for p in self.params:
            v = bound[p.name]
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                consts[p.name] = v
            else:
                sig[p.name] = mangle_type(v)
        calls.append(Launch(self, sig, consts, options))

    JITFunction.run = record  # type: ignore[method-assign]
    try:
        yield
    finally:
        JITFunction.run = original  # type: ignore[method-assign]


def dry_launches(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Launch]:
    """The kernel launches ``fn(*args, **kwargs)`` makes, recorded instead of run (outputs stay uninitialized)."""
    calls: list[Launch] = []
    with _recording(calls):
        fn(*args, **kwargs)
    return calls


def compile_launch(launch: Launch, arch: int = 90) -> Any:
    """``triton.compile`` of a recorded launch for ``sm_<arch>``; returns the compiled kernel (``.asm["ptx"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch.kernel, launch.signature, constexprs=launch.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))


_FP = re.compile(r"\.(f16|f16x2|bf16|bf16x2|tf32|f32|f64|e4m3|e5m2)\b")


def fp_instructions(ptx: str) -> list[str]:
    """PTX instruction lines with a floating-point type (declarations and comments are not instructions)."""
    out = []
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".reg", ".param", ".shared", ".global", ".local", ".const", ".loc",
                                  ".file", ".visible", ".entry", ".target", ".version", ".address_size",
                                  ".maxntid", ".reqntid", ".section", ".b8", ".b16", ".b32", ".b64")):
            continue
        if _FP.search(s):
            out.append(s)
    return out


def ptxas_usage(ptx: str, arch: int = 90) -> dict[str, int] | None:
    """Registers and spill bytes per thread from ``ptxas -v`` (None when no ptxas is found)."""
    exe = None
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        exe = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - any failure to locate it means "no ptxas"
        exe = shutil.which("ptxas")
    if not exe:
        return None
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([exe, f"-arch=sm_{arch}{suffix}", "-v", str(path), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=False)
    text = res.stdout + res.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill stores", text)
    return {"registers": max(map(int, regs)) if regs else -1, "spill_bytes": max(map(int, spill)) if spill else 0}


def sample_launches() -> list[Launch]:
    """Every kernel variant the backend launches for ViT/Swin-like programs (small CPU tensors, dry run)."""
    from . import kernels as k

    g = torch.Generator().manual_seed(0)

    def ints(lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64).to(dtype)

    i8, i16, i32 = torch.int8, torch.int16, torch.int32
    x = ints(-128, 127, (2, 197, 384), i8)
    w = ints(-127, 127, (1152, 384), i8)
    bias = ints(-1000, 1000, (1152,), i32)
    mult = ints(1, 2**30, (1152,), i32)
    shift = ints(20, 40, (1152,), i32)
    res = ints(-100, 100, (2, 197, 1152), i16)
    table = ints(-128, 127, (256,), i8)
    q = ints(-128, 127, (2, 6, 197, 64), i8)
    qs = ints(-128, 127, (8, 3, 49, 32), i8)
    mask = torch.zeros(4, 49, 49, dtype=torch.bool)
    sbias = ints(-100, 100, (3, 49, 49), i32)
    one = torch.tensor(1 << 20, dtype=i32)
    sh = torch.tensor(24, dtype=i32)
    scores = ints(-1000, 1000, (8, 3, 49, 49), i32)
    calls: list[Launch] = []
    runs: list[tuple[Callable[..., Any], tuple, dict]] = [
        (k.linear, (x, w, bias), {}),
        (k.linear, (x, w), {}),
        (k.linear_requantize, (x, w, mult, shift, 8), {"bias": bias}),
        (k.linear_add_requantize, (x, res, w, mult, shift, mult, shift, 16), {"bias": bias}),
        (k.linear_requantize_table, (x, w, mult, shift, table), {"bias": bias}),
        (k.matmul, (q, q, True), {}),
        (k.matmul, (ints(0, 255, (2, 6, 197, 197), torch.uint8), q), {}),
        (k.requantize, (ints(-2**20, 2**20, (2, 197, 1152), i32), mult, shift, 8), {}),
        (k.requantize, (ints(-2**20, 2**20, (2, 197, 1152), i32), mult, shift, 16), {}),
        (k.add_requantize, (res, ints(-2**20, 2**20, (2, 197, 1152), i32), mult, shift, mult, shift, 16), {}),
        (k.requantize_table, (ints(-2**20, 2**20, (2, 197, 1152), i32), mult, shift, table), {}),
        (k.shiftgelu, (x, -186, 23, 16), {}),
        (k.layernorm32, (res[..., :384], mult[:384], shift[:384], bias[:384], 8), {}),
        (k.layernorm, (res[..., :384], mult[:384], shift[:384], bias[:384], 8), {}),
        (k.shiftmax_rel, (scores, -737653), {"mask": mask}),
        (k.shiftmax_rel, (scores.to(i16), -737653), {}),
        (k.shiftmax, (scores.to(i16), -300, 15, 8), {"mask": mask}),
        (k.attn_normalize, (ints(-2**20, 2**20, (2, 6, 197, 64), i32), ints(0, 255, (2, 6, 197, 197),
                                                                             torch.uint8)), {}),
        (k.attention, (q, q, q, one, sh, 16, 1, -737653), {}),
        (k.attention, (qs, qs, qs, one, sh, 16, 1, -737653), {"bias": sbias, "mask": mask}),
        (k.attention, (q, q, q, one, sh, 16, 0, -737, 15), {}),
        (k.attention, (qs, qs, qs, one, sh, 16, 0, -737, 15), {"bias": sbias, "mask": mask}),
    ]
    seen: set[tuple] = set()
    for fn, args, kw in runs:
        for launch in dry_launches(fn, *args, **kw):
            if launch.key() not in seen:
                seen.add(launch.key())
                calls.append(launch)
    return calls


def loaded_ptx() -> list[tuple[str, str]]:
    """``(kernel name, PTX)`` of every kernel of ``kernels`` compiled in this process (what ran on the GPU)."""
    from triton.runtime.jit import JITFunction

    from . import kernels

    out = []
    for obj in vars(kernels).values():
        if not isinstance(obj, JITFunction):
            continue
        for cache in obj.device_caches.values():
            for compiled in cache[0].values():
                code = getattr(compiled, "asm", {}).get("ptx")
                if code:
                    out.append((obj.fn.__name__, code))
    return out
