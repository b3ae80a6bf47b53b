"""The integer engine: executes a frozen ``Program`` with integer ops only.

Each program op maps to a kernel.  The ``reference`` backend uses ``ivit.ops`` (the specification);
other backends (``ivit.kernels``) replace individual kernels with faster ones that must give the
same integers (tested with ``torch.equal``).  A backend is a dict ``op name -> kernel``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import ops
from .errors import IvitError
from .models.base import check_pixels
from .program import Program, check_program, load_program

__all__ = ["Engine", "Step", "plan_steps", "load", "REFERENCE_KERNELS", "verify_integer_only", "IntegerCheck"]

Kernel = Callable[..., Tensor]


def _reshape(x: Tensor, shape: list[int]) -> Tensor:
    # ONNX semantics: 0 copies the input dim at that position, -1 is inferred
    return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])


def _add_const(x: Tensor, const: Tensor) -> Tensor:
    return (x.to(torch.int64) + const.to(torch.int64)).to(torch.int32)


def _shiftmax(x: Tensor, x0: int, n: int, k_out: int, mask: Tensor | None = None) -> Tensor:
    if mask is not None:  # (nW, N, N) bool, repeated over batch-major windows: x is (B*nW, H, N, N)
        nw, nn_ = mask.shape[0], mask.shape[-1]
        mask = mask.view(1, nw, 1, nn_, nn_).expand(x.shape[0] // nw, nw, x.shape[1], nn_, nn_).reshape(x.shape)
    return ops.shiftmax(x, x0, n, k_out, mask)


REFERENCE_KERNELS: dict[str, Kernel] = {
    "patchify": lambda x, patch: ops.patchify(x, patch),
    "linear": lambda x, weight, bias=None: ops.int_linear(x, weight, bias),
    "requantize": lambda x, mult, shift, bits: ops.requantize(x, mult, shift, bits),
    "add_requantize": lambda a, b, mult_a, shift_a, mult_b, shift_b, bits: ops.add_requantize(
        a, b, mult_a, shift_a, mult_b, shift_b, bits),
    "embed": lambda x, mult, shift, pos, bits, prefix=None: ops.embed_tokens(x, mult, shift, prefix, pos, bits),
    "layernorm": lambda x, mult, shift, offset, bits: ops.ilayernorm(x, mult, shift, offset, bits),
    "slice": lambda x, dim, start, end: x.narrow(dim, start, end - start),
    "reshape": _reshape,
    "permute": lambda x, perm: x.permute(perm),
    "roll": lambda x, shifts, dims: torch.roll(x, shifts, dims),
    # zero padding, torch.nn.functional.pad order: (last_lo, last_hi, prev_lo, prev_hi, ...), all >= 0
    "pad": lambda x, pads: torch.nn.functional.pad(x, pads),
    "matmul": lambda a, b, transpose_b: ops.int_matmul(a, b, bool(transpose_b)),
    "add_const": _add_const,
    "shiftmax": _shiftmax,
    "shiftgelu": lambda x, x0, n, k_out: ops.shiftgelu(x, x0, n, k_out),
    "select": lambda x, dim, index: x.select(dim, index),
    "mean": lambda x, dim: ops.int_mean(x, dim),
}


@dataclass(frozen=True)
class Step:
    """One executable step: ``output = fn(*inputs)`` with constants and attributes bound.

    ``nodes`` are the indices of the program nodes it computes (several for a fused step).
    """

    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]
    output: str
    nodes: tuple[int, ...]

    @property
    def last_node(self) -> int:
        return self.nodes[-1]


def plan_steps(program: Program, consts: dict[str, Tensor], kernels: dict[str, Kernel]) -> list[Step]:
    """One step per node: the kernel with the node's constants and attributes bound."""
    steps = []
    for i, node in enumerate(program.nodes):
        kw = {k: consts[key] for k, key in node.consts.items()}
        steps.append(Step(functools.partial(kernels[node.op], **kw, **node.attrs), node.inputs, node.output, (i,)))
    return steps


def _backend(name: str) -> dict[str, Kernel]:
    if name == "reference":
        return REFERENCE_KERNELS
    if name == "fast":
        from .kernels import fast_kernels

        return {**REFERENCE_KERNELS, **fast_kernels()}
    raise IvitError(f"unknown backend {name!r} (choose 'reference' or 'fast')")


class Engine:
    """Runs a frozen integer program.

    ``engine(pixels)`` takes uint8 pixels ``(B, C, H, W)`` and returns int32 logits ``(B, classes)``;
    ``engine(pixels, dequantize=True)`` returns ``logit_scale * logits`` as float32 (the only float
    op, after the integer program has finished).

    Args:
        program: a ``Program`` (from ``ivit.freeze`` or ``ivit.load``).
        backend: ``"reference"`` (``ivit.ops``, the specification) or ``"fast"`` (default; kernels
            tested bit-exact against the reference).  Env ``IVIT_BACKEND`` overrides the default.
        device: where to keep constants and run (default: cpu).
    """

    def __init__(self, program: Program, backend: str | None = None, device: str | torch.device = "cpu") -> None:
        check_program(program)
        self.program = program
        self.backend = backend or os.environ.get("IVIT_BACKEND", "fast")
        self.kernels = _backend(self.backend)
        self.device = torch.device(device)
        self.consts = {k: v.to(self.device) for k, v in program.consts.items()}
        self.steps = plan_steps(program, self.consts, self.kernels)
        if self.backend == "fast":
            from .kernels import fuse_steps

            self.steps = fuse_steps(program, self.consts, self.steps)
        # last use of each value, to free intermediates early
        self._last_use: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for v in step.inputs:
                self._last_use[v] = i

    @property
    def meta(self) -> dict[str, Any]:
        return self.program.meta

    @property
    def num_classes(self) -> int:
        return int(self.program.meta["num_classes"])

    def run(self, pixels: Tensor, trace: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """Execute the program; ``trace(i, out)`` is called with each step's output, ``i`` being the
        index of the last program node the step computes (fused steps cover several nodes)."""
        c, h, w = self.program.input_shape
        check_pixels(pixels, c, (h, w))
        env: dict[str, Tensor] = {self.program.input: pixels.to(self.device)}
        with torch.inference_mode():
            for i, step in enumerate(self.steps):
                out = step.fn(*[env[v] for v in step.inputs])
                env[step.output] = out
                if trace is not None:
                    trace(step.last_node, out)
                for v in step.inputs:
                    if self._last_use.get(v) == i and v != self.program.output:
                        env.pop(v, None)
        return env[self.program.output]

    def __call__(self, pixels: Tensor, dequantize: bool = False) -> Tensor:
        logits = self.run(pixels)
        if dequantize:
            return logits.to(torch.float32) * float(self.program.meta["logit_scale"])
        return logits


def load(path: str | os.PathLike[str], backend: str | None = None, device: str | torch.device = "cpu") -> Engine:
    """Load a ``.ivit`` file into an ``Engine`` (validated; no code in the file is executed)."""
    return Engine(load_program(path), backend=backend, device=device)


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


class IntegerCheck:
    """Result of ``verify_integer_only``: static and run-time evidence that a program is integer-only."""

    def __init__(self, static_problems: list[str], aten_ops: dict[str, int], float_ops: dict[str, int],
                 value_dtypes: dict[str, str]) -> None:
        self.static_problems = static_problems
        self.aten_ops = aten_ops
        self.float_ops = float_ops
        self.value_dtypes = value_dtypes

    @property
    def ok(self) -> bool:
        return not self.static_problems and not self.float_ops and all(
            d in ("torch.int8", "torch.uint8", "torch.int16", "torch.int32", "torch.int64")
            for d in self.value_dtypes.values())

    def summary(self) -> str:
        if self.ok:
            return (f"integer-only: yes ({sum(self.aten_ops.values())} aten ops executed, 0 floating-point; "
                    f"all constants and values integer)")
        parts = self.static_problems + [f"float aten op {k} x{v}" for k, v in self.float_ops.items()]
        return "integer-only: NO (" + "; ".join(parts) + ")"


def verify_integer_only(engine: Engine, batch: int = 1) -> IntegerCheck:
    """Prove the program is integer-only: every constant and node output has an integer dtype, every
    attribute is an integer, and running it executes no aten op that touches a floating-point tensor
    (recorded with a ``TorchDispatchMode`` over the whole run).

    The run uses the reference backend (every op through aten, so the recorder sees all of them);
    the fast backend's C kernels are tested bit-exact against it and use integer types only."""
    if engine.backend != "reference":
        engine = Engine(engine.program, backend="reference", device=engine.device)
    prog = engine.program
    problems = [f"constant {k} is {v.dtype}" for k, v in prog.consts.items()
                if v.is_floating_point() or v.is_complex()]
    for node in prog.nodes:
        for a, v in node.attrs.items():
            for x in v if isinstance(v, list) else [v]:
                if not isinstance(x, int):
                    problems.append(f"{node.op}.{a} = {x!r} is not an integer")
    c, h, w = prog.input_shape
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8, generator=g)
    dtypes: dict[str, str] = {}

    def trace(i: int, out: Tensor) -> None:
        dtypes[f"{i}:{prog.nodes[i].op}"] = str(out.dtype)

    rec = _AtenRecorder()
    try:
        with rec:
            engine.run(pixels, trace=trace)
    except (TypeError, RuntimeError, ValueError) as e:  # e.g. an integer kernel handed a float tensor
        problems.append(f"running the program failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return IntegerCheck(problems, rec.ops, rec.float_ops, dtypes)
