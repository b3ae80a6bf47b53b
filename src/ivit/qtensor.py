"""``QTensor``: an integer tensor that carries its scale (and, in training, its STE carrier)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QTensor", "carry"]


@dataclass
class QTensor:
    """Integer tensor ``q`` standing for ``scale * q``.

    Attributes:
        q: integer tensor (int8/int16/int32) holding the exact integer values.
        scale: float64 tensor, a scalar or a per-channel vector along the last dimension.
            Scales are offline metadata: they only ever feed the computation of integer constants.
        bits: signed bit width of ``q``'s values (32 for accumulators).
        value: float carrier used for training, or None in pure-integer mode.  Its forward value is
            ``scale * q`` (the exact integer result) and its gradient is that of a float surrogate
            (straight-through estimator).
    """

    q: Tensor
    scale: Tensor
    bits: int
    value: Tensor | None = None

    @property
    def per_tensor(self) -> bool:
        return self.scale.numel() == 1

    def dequantize(self) -> Tensor:
        """``scale * q`` in float32 (for observers and reports, never for the integer path)."""
        return self.q.to(torch.float32) * self.scale.to(torch.float32)

    def map(self, fn: Callable[[Tensor], Tensor]) -> QTensor:
        """Apply a data-movement function (reshape, permute, slice) to ``q`` and ``value``.

        Only valid for per-tensor scales, since the function may move the channel axis.
        """
        if not self.per_tensor:
            raise ValueError("map() needs a per-tensor scale; requantize per-channel tensors first")
        return QTensor(fn(self.q), self.scale, self.bits, None if self.value is None else fn(self.value))


def carry(surrogate: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """STE carrier: forward value ``scale * q`` (exact integer result), gradient of ``surrogate``."""
    exact = q.to(surrogate.dtype) * scale.to(surrogate.dtype)
    # exact + (s - s) is exactly ``exact`` in floating point; s + (exact - s) is not when |s| >> |exact|
    return exact + (surrogate - surrogate.detach())
