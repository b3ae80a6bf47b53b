"""``run``: an op of the set through ``ivit.ir.trace.call`` with its exact fast kernel (when it has one).

The quantized modules compute with the native kernels (C, and the exact int8 GEMM) so that
calibration, QAT and PTQ search run at engine speed; the integers are the reference's either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..ir.trace import Traceable, call
from ..native.kernels import EAGER

__all__ = ["run"]


def run(op: str, inputs: Sequence[Traceable], consts: Mapping[str, Tensor | None] | None = None,
        attrs: Mapping[str, Any] | None = None) -> tuple[Tensor, str | None]:
    return call(op, inputs, consts, attrs, kernel=EAGER.get(op))
