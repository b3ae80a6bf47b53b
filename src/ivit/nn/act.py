"""``QAct``: requantize an integer tensor to an observed scale."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from ..qtensor import QTensor, carry
from ._run import run
from .observers import RangeObserver

__all__ = ["QAct"]


class QAct(nn.Module):
    """Requantize to ``bits`` at an observed scale: ``I_out = requantize(I_in, dyadic(S_in/S_out))``
    (``ops.requantize``: 31-bit multiplier, round half up, clamp to ``[-qmax, qmax]``).

    ``min_scale`` bounds the output scale from below (``S_out = max(observed, min_scale)``): attention
    scores use ``2**-21``, which keeps Shiftmax-rel's ``|x0| = floor(1/S) <= 2**21`` (its full 8-bit
    range) at a resolution far below anything softmax can tell apart.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.95, min_scale: float = 0.0) -> None:
        super().__init__()
        self.bits = bits
        self.min_scale = float(min_scale)
        self.observer = RangeObserver(bits, momentum)

    def consts(self, in_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mult, shift, out_scale)`` with ``mult / 2**shift ~= in_scale / out_scale``."""
        out_scale = self.observer.scale().clamp(min=self.min_scale)
        mult, shift = ops.dyadic(in_scale / out_scale)
        return mult, shift, out_scale

    def forward(self, x: QTensor) -> QTensor:
        self.observer.observe(x.dequantize())
        mult, shift, s = self.consts(x.scale)
        q, name = run("requantize", [x], {"mult": mult, "shift": shift}, {"bits": self.bits})
        return QTensor(q, s, self.bits, None if x.value is None else carry(x.value, q, s), name)
