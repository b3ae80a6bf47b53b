"""``QLayerNorm``: I-LayerNorm with gamma/beta folded into per-channel integer constants."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import LayerNormImpl
from ..qtensor import QTensor, carry
from ._run import run
from .observers import RangeObserver

__all__ = ["QLayerNorm"]


class QLayerNorm(nn.Module):
    """I-LayerNorm over the last dimension, output ``bits`` wide at an observed scale.

    ``b[c] / 2**c[c] ~= gamma[c] * sqrt(C) / 2**20 / S_out``, ``offset[c] = round(beta[c] / S_out)``
    (see ``ops.ilayernorm32``, the default, and ``ops.ilayernorm``).  Input scale does not matter
    (LayerNorm is scale invariant).
    """

    def __init__(self, dim: int, bits: int = 8, momentum: float = 0.95, eps: float = 1e-6,
                 impl: LayerNormImpl = LayerNormImpl.INT32) -> None:
        super().__init__()
        self.dim = dim
        self.bits = bits
        self.eps = eps
        self.impl = LayerNormImpl(impl)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.observer = RangeObserver(bits, momentum)

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, bits: int = 8, momentum: float = 0.95,
                   impl: LayerNormImpl = LayerNormImpl.INT32) -> QLayerNorm:
        m = cls(ln.normalized_shape[0], bits, momentum, ln.eps, impl)
        with torch.no_grad():
            m.weight.copy_(ln.weight)
            m.bias.copy_(ln.bias)
        return m

    @property
    def op(self) -> str:
        return "layernorm32" if self.impl == LayerNormImpl.INT32 else "layernorm"

    def consts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(mult (C,), shift (C,), offset (C,) int64, out_scale)``."""
        s = self.observer.scale()
        g = self.weight.detach().to(torch.float64).cpu()
        mult, shift = ops.dyadic(g * math.sqrt(self.dim) / 2**ops.LN_Z_BITS / s)
        offset = torch.round(self.bias.detach().to(torch.float64).cpu() / s)
        lim = 2**30 if self.impl == LayerNormImpl.INT32 else 2**31 - 1
        return mult, shift, offset.clamp(-lim, lim).to(torch.int64), s

    def forward(self, x: QTensor) -> QTensor:
        if self.observer.observing:
            with torch.no_grad():
                self.observer.observe(F.layer_norm(x.dequantize(), (self.dim,), self.weight, self.bias, self.eps))
        mult, shift, offset, s = self.consts()
        q, name = run(self.op, [x], {"mult": mult, "shift": shift, "offset": offset}, {"bits": self.bits})
        value = None
        if x.value is not None:
            value = carry(F.layer_norm(x.value, (self.dim,), self.weight, self.bias, self.eps), q, s)
        return QTensor(q, s, self.bits, value, name)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bits={self.bits}, impl={self.impl.value}"
