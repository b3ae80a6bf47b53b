"""``QResidualAdd``: the residual sum, both branches requantized to the observed output scale."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from ..qtensor import QTensor, carry
from ._run import run
from .observers import RangeObserver

__all__ = ["QResidualAdd"]


class QResidualAdd(nn.Module):
    """``a + b`` on the residual stream (``ops.add_requantize``), ``bits`` wide."""

    def __init__(self, bits: int = 16, momentum: float = 0.95) -> None:
        super().__init__()
        self.bits = bits
        self.observer = RangeObserver(bits, momentum)

    def consts(self, scale_a: Tensor, scale_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        s = self.observer.scale()
        ma, sa = ops.dyadic(scale_a / s)
        mb, sb = ops.dyadic(scale_b / s)
        return ma, sa, mb, sb, s

    def forward(self, a: QTensor, b: QTensor) -> QTensor:
        if self.observer.observing:
            self.observer.observe(a.dequantize() + b.dequantize())
        ma, sa, mb, sb, s = self.consts(a.scale, b.scale)
        q, name = run("add_requantize", [a, b], {"mult_a": ma, "shift_a": sa, "mult_b": mb, "shift_b": sb},
                       {"bits": self.bits})
        value = None
        if a.value is not None and b.value is not None:
            value = carry(a.value + b.value, q, s)
        return QTensor(q, s, self.bits, value, name)
