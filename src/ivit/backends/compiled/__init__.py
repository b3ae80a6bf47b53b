"""The ``compiled`` backend: the whole program as one native function per model.

``Engine(program, backend="compiled")`` plans the executed program (after ``fold_gelu_table`` and
``fuse_attention``; ``plan``), generates C specialised to its shapes and constants (``codegen``: GEMM
micro-kernels with the requantization, GELU table, residual add or patch embedding fused into their
epilogues and the LayerNorm into their prologues, attention per head in VNNI register tiles, the C99
exporter's lowerings for everything else), builds it once per machine into ``$IVIT_CACHE`` (``build``)
and calls it once per batch: no Python between ops.  Weights are packed for the built code path at
load (AVX-512 VNNI ``vpdpbusd``; exact AVX2 ``vpmaddwd`` or portable C without it).

The integers equal the reference backend's (``torch.equal``; ``tests/backends/test_compiled.py``).  A
program the planner does not cover (a batch axis other than 0) runs on the ``cpu`` backend's kernels
instead, and says so in ``Compiled.info["fallback"]``; so does one the C compiler fails to build.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import IvitError
from ...ir import interpret
from ...ir.program import Program
from ...ir.validate import ProgramInfo
from ..base import Backend, Compiled, register_backend
from . import build, codegen
from .plan import Plan, Unsupported, plan_program

__all__ = ["COMPILED", "CompiledModel", "compile_program", "profile"]


class CompiledModel:
    """A built model library with its packed constants; ``model(pixels)`` runs one batch."""

    def __init__(self, program: Program, plan: Plan, isa: int, source: str, path: Path, out_shape: tuple[int, ...],
                 out_dtype: torch.dtype) -> None:
        self.program = program
        self.plan = plan
        self.isa = isa
        self.source = source
        self.path = path
        self.lib = build.load(path)
        if self.lib.ivit_model_isa() != isa:
            raise IvitError(f"compiled model {path} was built for another code path")
        blob = plan.blob.tensor()
        self.blob = _huge(blob.numel())
        self.blob.copy_(blob)
        self.out_shape = out_shape
        self.out_dtype = out_dtype
        self._lock = threading.Lock()
        self._work: Tensor | None = None

    def work_bytes(self, batch: int, nthreads: int) -> int:
        return codegen.work_bytes(self.plan, self.isa, batch, nthreads)

    def _area(self, batch: int, nthreads: int) -> int:
        need = self.work_bytes(batch, nthreads) + 64
        if self._work is None or self._work.numel() < need:
            self._work = _huge(need)
        return (self._work.data_ptr() + 63) // 64 * 64

    def run(self, pixels: Tensor, lib: ctypes.CDLL | None = None) -> Tensor:
        b = int(pixels.shape[0])
        px = pixels.contiguous()
        nt = max(1, torch.get_num_threads())
        out = torch.empty((b, *self.out_shape[1:]), dtype=self.out_dtype)
        with self._lock:
            work = self._area(b, nt)
            rc = (lib or self.lib).ivit_model_run(px.data_ptr(), out.data_ptr(), b, work, self.blob.data_ptr(), nt)
        if rc != 0:
            raise IvitError(f"compiled model failed (code {rc})")
        return out

    __call__ = run


def _huge(nbytes: int) -> Tensor:
    """A uint8 tensor of ``nbytes`` in anonymous memory advised for transparent huge pages (fewer TLB misses over the
    weights and activations); plain memory where that is not available."""
    try:
        size = -(-nbytes // (2 << 20)) * (2 << 20)
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)
    except (OSError, ValueError, AttributeError):
        return torch.empty(nbytes, dtype=torch.uint8)


def _fallback(program: Program, info: ProgramInfo, consts: Mapping[str, Tensor], why: str) -> Compiled:
    from ... import native
    from .. import cpu

    steps = interpret.plan(program, info.types, consts, cpu.cpu_kernels())

    def run(pixels: Tensor) -> Tensor:
        return interpret.run(program, steps, pixels)

    libs = [p for p in [native.library_path()] if p is not None]
    return Compiled(run=run, libraries=libs, info={"fallback": why})


def compile_program(program: Program, info: ProgramInfo, consts: Mapping[str, Tensor]) -> Compiled:
    """The ``compile`` hook: plan, generate, build (cached) and load ``program`` (after the passes)."""
    isa = build.detect_isa()
    try:
        plan = plan_program(program, info.types, isa)
    except Unsupported as e:
        return _fallback(program, info, consts, str(e))
    meta = program.meta
    header = f"model {meta.get('model', '?')} ({meta.get('family', '?')}), code path {build.ISA_NAMES[isa]}"
    source = codegen.generate(plan, isa, header)
    try:
        path = build.build(source)
    except RuntimeError as e:  # a compiler that cannot build it (e.g. no OpenMP): the per-op kernels instead
        return _fallback(program, info, consts, f"the C compiler failed: {str(e).splitlines()[0][:200]}")
    out_t = info.types[program.output]
    model = CompiledModel(program, plan, isa, source, path, out_t.concrete(1), out_t.dtype)
    gemm_macs = sum(s.macs for s in plan.steps if s.kind == "gemm")
    attn_macs = sum(s.macs for s in plan.steps if s.kind == "attn")
    return Compiled(run=model, libraries=[path], info={
        "isa": build.ISA_NAMES[isa], "steps": len(plan.steps), "fusions": dict(plan.fusions), "library": str(path),
        "arena_bytes_per_image": plan.arena_bytes, "const_bytes": plan.blob.size, "gemm_macs_per_image": gemm_macs,
        "attention_macs_per_image": attn_macs, "model": model})


def profile(model: CompiledModel, pixels: Tensor, runs: int = 5, warmup: int = 1) -> list[dict[str, Any]]:
    """Per-step wall time of ``model`` on ``pixels`` (a build with timers after each step's barrier; thread 0's
    clock, so a step's time includes waiting for the slowest thread), median of ``runs`` runs after ``warmup``
    untimed ones.  Returns one row per step: label, kind, median ns, multiply-accumulates (GEMM / attention) and
    the achieved int8 GOPS (2 ops per MAC)."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"profile needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    lib = build.load(build.build(model.source, profile=True))
    n = len(model.plan.steps)
    buf = (ctypes.c_int64 * (n + 1))()
    per: list[list[int]] = [[] for _ in range(n)]
    for _ in range(warmup):
        model.run(pixels, lib)
    lib.ivit_model_profile(buf)
    for _ in range(runs):
        model.run(pixels, lib)
        lib.ivit_model_profile(buf)
        for i in range(n):
            per[i].append(int(buf[i]))
    rows = []
    b = int(pixels.shape[0])
    for st, ts in zip(model.plan.steps, per, strict=True):
        ns = sorted(ts)[len(ts) // 2]
        macs = st.macs * b
        rows.append({"step": st.label, "kind": st.kind, "ns": ns, "macs": macs,
                     "gops": (2 * macs / ns) if ns and macs else None})
    return rows


def _available() -> bool:
    return build.available() and codegen.RUNTIME.is_file()


COMPILED = register_backend(Backend(
    name="compiled",
    devices=("cpu",),
    available=_available,
    kernels=lambda: {},
    passes=("fold_gelu_table", "fuse_attention"),
    description="the whole program compiled to one native function (VNNI GEMMs with fused epilogues)",
    native=True,
    compile=compile_program,
))


