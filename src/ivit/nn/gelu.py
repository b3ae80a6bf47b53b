"""``QShiftGELU``: integer GELU ``x * sigmoid(1.702 x)`` from ShiftExp."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..qtensor import QTensor, carry
from ._run import run

__all__ = ["QShiftGELU"]


class QShiftGELU(nn.Module):
    """ShiftGELU (``ops.shiftgelu``): int8 input at ``S``, int32 output at ``S * 2**-(k-1)``.

    ``quick=True`` is QuickGELU ``x * sigmoid(1.702 x)`` itself as the float surrogate (CLIP models);
    the integer op is the same either way, since ShiftGELU *is* that form.
    """

    def __init__(self, k_sig: int = 16, n_max: int = 23, quick: bool = False) -> None:
        super().__init__()
        self.k_sig = k_sig
        self.n_max = n_max
        self.quick = quick

    def consts(self, in_scale: Tensor) -> tuple[int, int, Tensor]:
        x0 = ops.shift_exp_x0(1.702 * float(in_scale))
        n = ops.choose_shiftgelu_n(x0, self.n_max)
        return x0, n, in_scale.to(torch.float64) * 2.0 ** -(self.k_sig - 1)

    def forward(self, x: QTensor) -> QTensor:
        if not x.per_tensor or x.bits > 8:
            raise ValueError("QShiftGELU needs an 8-bit per-tensor input")
        x0, n, s = self.consts(x.scale)
        q, name = run("shiftgelu", [x], attrs={"x0": x0, "n": n, "k_out": self.k_sig})
        value = None
        if x.value is not None:
            v = x.value
            f = v * torch.sigmoid(1.702 * v) if self.quick else torch.nn.functional.gelu(v)
            value = carry(f, q, s)
        return QTensor(q, s, 32, value, name)
