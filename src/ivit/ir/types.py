"""Static types of program values: integer dtype, shape with a symbolic batch, and a value interval.

A shape is a tuple of ints in which at most one axis, ``batch_axis``, is *batched*: its entry is a
per-image multiplier ``k`` and the real size is ``k * B`` for every batch size ``B >= 1`` (the input
pixels are ``(1*B, C, H, W)``; a Swin window partition makes ``(nW*B, N, C)``).  Inferring shapes with
this symbol proves a program well-formed for *every* batch size at once.

``lo``/``hi`` bound every integer the value can hold (from its dtype, narrowed by the op that makes
it); the op set uses them to prove that no int32 accumulator can overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import IvitError

__all__ = ["TType", "ProgramError", "DTYPES", "DTYPE_NAMES", "dtype_range", "INT_VALUE_DTYPES"]


class ProgramError(IvitError):
    """A program (or a file holding one) that fails validation: one line saying what is wrong."""


#: dtype names as written in programs and messages
DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
#: dtypes a program value may have (bool only for constants such as masks)
INT_VALUE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32)


def dtype_range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype == torch.bool:
        return 0, 1
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


@dataclass(frozen=True)
class TType:
    """Static type of a program value.

    Attributes:
        dtype: integer dtype.
        shape: sizes; ``shape[batch_axis]`` is the per-image multiplier of the batch size.
        batch_axis: the batched axis, or None (a value that does not depend on the batch).
        lo, hi: every element lies in ``[lo, hi]``.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    batch_axis: int | None
    lo: int
    hi: int

    @classmethod
    def of(cls, dtype: torch.dtype, shape: tuple[int, ...], batch_axis: int | None,
           lo: int | None = None, hi: int | None = None) -> TType:
        dlo, dhi = dtype_range(dtype)
        lo = dlo if lo is None else max(dlo, int(lo))
        hi = dhi if hi is None else min(dhi, int(hi))
        return cls(dtype, tuple(int(s) for s in shape), batch_axis, lo, hi)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def amax(self) -> int:
        """Largest absolute value."""
        return max(abs(self.lo), abs(self.hi))

    def numel_per_image(self) -> int:
        """Elements per unit of batch (the batched axis counted with its multiplier)."""
        return math.prod(self.shape)

    def bytes_per_image(self) -> int:
        return self.numel_per_image() * torch.empty((), dtype=self.dtype).element_size()

    def concrete(self, batch: int) -> tuple[int, ...]:
        """The real shape for batch size ``batch``."""
        return tuple(s * batch if i == self.batch_axis else s for i, s in enumerate(self.shape))

    def with_range(self, lo: int, hi: int) -> TType:
        dlo, dhi = dtype_range(self.dtype)
        return replace(self, lo=max(dlo, int(lo)), hi=min(dhi, int(hi)))

    def describe(self) -> str:
        dims = ["B" if (i == self.batch_axis and s == 1) else (f"{s}B" if i == self.batch_axis else str(s))
                for i, s in enumerate(self.shape)]
        return f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))}({', '.join(dims)})"
