"""The ``cpu`` backend (``fast`` where no C compiler is here): exact native kernels for the CPU, one call per op.

* int8 GEMMs through ``ivit.native.gemm`` (oneDNN where it is provably exact on this CPU, else our own
  C GEMM that never saturates);
* requantize, residual add, I-LayerNorm, Shiftmax and the fused ``attention`` / ``requantize_table``
  ops in C (``ivit.native.kernels``), with per-channel constants widened once when the engine plans;
* ShiftGELU of int8 values by a 256-entry table computed with the reference op.

Passes: ``fold_gelu_table`` then ``fuse_attention``.  Every kernel checks its operands' exact shapes
(against the validated static types here, and again inside ``ivit.native.kernels``) before any
pointer reaches C; cases a C kernel does not cover use the reference op (still exact).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from ..ir.program import Node
from ..ir.types import TType
from ..native import kernels
from .base import Backend, register_backend

__all__ = ["CPU", "cpu_kernels"]

Fn = Callable[..., Tensor]


def _check(x: Tensor, t: TType) -> None:
    """The operand has the validated dtype and shape for some batch size (never trust a caller)."""
    if x.dtype != t.dtype or x.dim() != t.rank:
        raise RuntimeError(f"operand {x.dtype}{tuple(x.shape)} does not match {t.describe()}")
    b = 1
    if t.batch_axis is not None:
        k = t.shape[t.batch_axis]
        b = x.shape[t.batch_axis] // k
        if b * k != x.shape[t.batch_axis]:
            raise RuntimeError(f"operand {tuple(x.shape)} does not match {t.describe()}")
    if tuple(x.shape) != t.concrete(b):
        raise RuntimeError(f"operand {tuple(x.shape)} does not match {t.describe()}")


def _factory(op: str, channel_consts: tuple[str, ...] = ()) -> Callable[..., Fn]:
    """A factory binding the node's constants (per-channel ones widened to ``(C,)`` int32 once) and attributes
    to ``ivit.native.kernels.EAGER[op]``, with a static shape check of every operand."""
    kernel = kernels.EAGER[op]

    def factory(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
        bound = dict(consts)
        if channel_consts:
            c = ins[0].shape[-1]
            for name in channel_consts:
                if name in bound and bound[name].numel() == 1:  # widened once, not at every call
                    widened = kernels.per_channel(bound[name], c)
                    if widened is not None:
                        bound[name] = widened
        for k, v in bound.items():
            bound[k] = v.contiguous()
        attrs = node.attrs

        def fn(*xs: Tensor) -> Tensor:
            for x, t in zip(xs, ins, strict=True):
                _check(x, t)
            return kernel(*xs, **bound, **attrs)
        return fn
    return factory


def cpu_kernels() -> dict[str, Callable[..., Fn]]:
    """The ``op -> kernel factory`` table of the cpu backend."""
    return {
        "linear": _factory("linear"),
        "matmul": _factory("matmul"),
        "requantize": _factory("requantize", ("mult", "shift")),
        "add_requantize": _factory("add_requantize", ("mult_a", "shift_a", "mult_b", "shift_b")),
        "layernorm": _factory("layernorm", ("mult", "shift", "offset")),
        "layernorm32": _factory("layernorm32", ("mult", "shift", "offset")),
        "shiftmax": _factory("shiftmax"),
        "shiftmax_rel": _factory("shiftmax_rel"),
        "attn_normalize": _factory("attn_normalize"),
        "shiftgelu": _factory("shiftgelu"),
        "requantize_table": _factory("requantize_table", ("mult", "shift")),
        "attention": _factory("attention"),
    }


CPU = register_backend(Backend(
    name="cpu",
    devices=("cpu",),
    available=lambda: True,
    kernels=cpu_kernels,
    passes=("fold_gelu_table", "fuse_attention"),
    description="native C kernels and exact int8 GEMMs (oneDNN where exact)",
    native=True,
))
