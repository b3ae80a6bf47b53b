"""The integer-only proof of a program on the backend that actually runs it.

``verify_integer_only(engine)`` makes exactly three checks, and ``IntegerProof.summary()`` says which:

1. **static**: the program validates against the op set (``ivit.ir.validate``): every op is an op of
   the set, every constant and every value has an integer dtype, every attribute is an integer;
2. **aten**: running the program on the engine's own backend (the one ``ivit eval`` and ``ivit bench``
   use) on random pixels executes no aten op that reads or writes a floating-point tensor
   (recorded with a ``TorchDispatchMode`` over the whole run);
3. **native**: when that backend runs native code, the machine code of the built kernel library
   contains no floating-point instruction (``ivit.native.fp_instructions``: x87, and SSE/AVX/AVX-512
   scalar or packed FP arithmetic, compares and conversions).

Nothing else is claimed: Python code of a backend that computes outside aten and outside the native
library (numpy, Python floats) is not seen by these checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import native
from .backends.engine import Engine
from .errors import IvitError
from .ir.types import DTYPE_NAMES
from .ir.validate import validate

__all__ = ["verify_integer_only", "IntegerProof"]


class _AtenRecorder(TorchDispatchMode):
    """Records every aten op executed and whether any of its tensors is floating point."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}
        self.float_ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        self.ops[name] = self.ops.get(name, 0) + 1
        tensors: list[Tensor] = []
        for a in list(args) + list(kwargs.values()) + [out]:
            if isinstance(a, Tensor):
                tensors.append(a)
            elif isinstance(a, (list, tuple)):
                tensors.extend(t for t in a if isinstance(t, Tensor))
        if any(t.is_floating_point() or t.is_complex() for t in tensors):
            self.float_ops[name] = self.float_ops.get(name, 0) + 1
        return out


@dataclass
class IntegerProof:
    """Outcome of the three checks of ``verify_integer_only``."""

    backend: str
    static_problems: list[str] = field(default_factory=list)
    n_nodes: int = 0
    n_consts: int = 0
    aten_ops: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)
    value_dtypes: dict[str, int] = field(default_factory=dict)
    run_error: str | None = None
    native_used: bool = False
    native_library: str | None = None
    native_fp: list[str] = field(default_factory=list)
    native_error: str | None = None

    @property
    def static_ok(self) -> bool:
        return not self.static_problems

    @property
    def aten_ok(self) -> bool:
        return self.run_error is None and not self.float_ops and all(
            d in ("uint8", "int8", "int16", "int32", "int64", "bool") for d in self.value_dtypes)

    @property
    def native_ok(self) -> bool:
        return not self.native_used or (self.native_error is None and not self.native_fp)

    @property
    def ok(self) -> bool:
        return self.static_ok and self.aten_ok and self.native_ok

    def lines(self) -> list[str]:
        """One line per check."""
        out = []
        if self.static_ok:
            out.append(f"static: yes ({self.n_nodes} nodes, all ops of the integer op set, {self.n_consts} integer "
                       f"constants, integer attributes)")
        else:
            out.append("static: NO (" + "; ".join(self.static_problems) + ")")
        n = sum(self.aten_ops.values())
        dts = ", ".join(f"{k} x{v}" for k, v in sorted(self.value_dtypes.items()))
        if self.aten_ok:
            out.append(f"aten ({self.backend} backend): yes ({n} aten ops executed, 0 floating-point; values {dts})")
        else:
            parts = ([self.run_error] if self.run_error else []) + [
                f"float aten op {k} x{v}" for k, v in self.float_ops.items()]
            bad = [d for d in self.value_dtypes if d not in ("uint8", "int8", "int16", "int32", "int64", "bool")]
            parts += [f"{d} value" for d in bad]
            out.append(f"aten ({self.backend} backend): NO (" + "; ".join(parts) + ")")
        if not self.native_used:
            out.append(f"native: none ({self.backend} backend runs no native kernel library)")
        elif self.native_ok:
            out.append(f"native: yes (no floating-point instruction in {self.native_library})")
        elif self.native_error:
            out.append(f"native: NOT CHECKED ({self.native_error})")
        else:
            shown = ", ".join(self.native_fp[:5]) + (" ..." if len(self.native_fp) > 5 else "")
            out.append(f"native: NO ({len(self.native_fp)} floating-point instructions: {shown})")
        return out

    def summary(self) -> str:
        return f"integer-only: {'yes' if self.ok else 'NO'}\n  " + "\n  ".join(self.lines())


def verify_integer_only(engine: Engine, batch: int = 1, seed: int = 0) -> IntegerProof:
    """Run the three checks of the module docstring on ``engine`` (its own backend)."""
    proof = IntegerProof(backend=engine.backend)
    prog = engine.program
    try:
        validate(prog, engine.limits)
        validate(engine.executed, engine.limits)
    except IvitError as e:
        proof.static_problems.append(str(e))
    for k, v in engine.executed.consts.items():
        if v.is_floating_point() or v.is_complex():
            proof.static_problems.append(f"constant {k} is {v.dtype}")
    for node in engine.executed.nodes:
        for a, v in node.attrs.items():
            for x in v if isinstance(v, list) else [v]:
                if not isinstance(x, int):
                    proof.static_problems.append(f"{node.op}.{a} = {x!r} is not an integer")
    proof.n_nodes, proof.n_consts = len(prog.nodes), len(prog.consts)

    c, h, w = prog.input_shape
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8, generator=g)
    dtypes: dict[str, int] = {}

    def trace(i: int, out: Tensor) -> None:
        name = DTYPE_NAMES.get(out.dtype, str(out.dtype).replace("torch.", ""))
        dtypes[name] = dtypes.get(name, 0) + 1

    rec = _AtenRecorder()
    try:
        with rec:
            if engine.compiled is not None:  # one native call: the output's dtype is the only value seen
                trace(len(engine.executed.nodes) - 1, engine.run(pixels))
            else:
                engine.run(pixels, trace=trace)
    except Exception as e:  # noqa: BLE001 - any failure of the run is a failed proof, reported in one line
        proof.run_error = f"running the program failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    proof.aten_ops, proof.float_ops, proof.value_dtypes = rec.ops, rec.float_ops, dtypes

    paths = []
    if engine.backend_def.native and native.available():
        paths.append(native.library_path())
    if engine.compiled is not None:
        paths += engine.compiled.libraries
    if paths:
        proof.native_used = True
        proof.native_library = ", ".join(str(p) for p in paths)
        try:
            for p in paths:
                proof.native_fp += native.fp_instructions(p)
        except RuntimeError as e:
            proof.native_error = str(e)
    return proof
