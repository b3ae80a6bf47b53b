"""``QTensor``: an integer tensor that carries its scale, its STE carrier and (when tracing) its program name.

Data movement (``reshape``, ``permute``, ``roll``, ``pad``, ``slice``, ``select``) goes through the op set
(``ivit.ir.trace.call``), so a traced forward records it too; shapes use the program's conventions
(``reshape``: 0 copies the size at that position, -1 is inferred), which keep the batch size free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .ir.opset import OPSET
from .ir.trace import call

__all__ = ["QTensor", "carry"]


@dataclass
class QTensor:
    """Integer tensor ``q`` standing for ``scale * q``.

    Attributes:
        q: integer tensor (uint8/int8/int16/int32) holding the exact integer values.
        scale: float64 tensor, a scalar or a per-channel vector along the last dimension.
            Scales are offline metadata: they only ever feed the computation of integer constants.
        bits: signed bit width of ``q``'s values (32 for accumulators).
        value: float carrier used for training, or None in pure-integer mode.  Its forward value is
            ``scale * q`` (the exact integer result) and its gradient is that of a float surrogate
            (straight-through estimator).
        name: the program value this tensor is, while a forward is traced (``ivit.ir.trace``).
    """

    q: Tensor
    scale: Tensor
    bits: int
    value: Tensor | None = None
    name: str | None = None

    @property
    def per_tensor(self) -> bool:
        return self.scale.numel() == 1

    def dequantize(self) -> Tensor:
        """``scale * q`` in float32 (for observers and reports, never for the integer path)."""
        return self.q.to(torch.float32) * self.scale.to(torch.float32)

    def _move(self, op: str, keeps_channels: bool, **attrs: Any) -> QTensor:
        if not self.per_tensor and not keeps_channels:
            raise ValueError(f"{op} would move the channel axis of a per-channel tensor; requantize it first")
        q, name = call(op, [self], attrs=attrs)
        value = None if self.value is None else OPSET[op].reference(self.value, **attrs)
        return QTensor(q, self.scale, self.bits, value, name)

    def reshape(self, *shape: int) -> QTensor:
        """Program reshape: 0 copies the input size at that position, -1 is inferred."""
        keeps = bool(shape) and (shape[-1] == 0 and len(shape) == self.q.dim()
                                 or shape[-1] == self.q.shape[-1])
        return self._move("reshape", keeps, shape=list(shape))

    def permute(self, *perm: int) -> QTensor:
        return self._move("permute", perm[-1] == len(perm) - 1, perm=list(perm))

    def roll(self, shifts: tuple[int, ...], dims: tuple[int, ...]) -> QTensor:
        keeps = all(d % self.q.dim() != self.q.dim() - 1 for d in dims)
        return self._move("roll", keeps, shifts=list(shifts), dims=list(dims))

    def pad(self, pads: tuple[int, ...]) -> QTensor:
        """Zero padding in ``torch.nn.functional.pad`` order (integer 0 stands for 0.0 at any scale)."""
        return self._move("pad", pads[0] == 0 and pads[1] == 0, pads=list(pads))

    def slice(self, dim: int, start: int, end: int) -> QTensor:
        last = dim % self.q.dim() == self.q.dim() - 1
        out = self._move("slice", True, dim=dim, start=start, end=end)
        if last and not self.per_tensor:
            out = replace(out, scale=self.scale[start:end])
        return out

    def select(self, dim: int, index: int) -> QTensor:
        return self._move("select", dim % self.q.dim() != self.q.dim() - 1, dim=dim, index=index)


def carry(surrogate: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """STE carrier: forward value ``scale * q`` (exact integer result), gradient of ``surrogate``."""
    exact = q.to(surrogate.dtype) * scale.to(surrogate.dtype)
    # exact + (s - s) is exactly ``exact`` in floating point; s + (exact - s) is not when |s| >> |exact|
    return exact + (surrogate - surrogate.detach())
