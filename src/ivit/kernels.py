"""Fast integer kernels for the CPU engine.

Each kernel computes exactly the same integers as its reference twin in ``ivit.ops`` (tests flip
the engine's backend and compare with ``torch.equal``).  Integer products are exact whatever the
summation order, so an int8 GEMM kernel (``torch._int_mm``: VNNI/AMX on x86) may replace the int64
reference matmul as long as the int32 accumulator cannot overflow (``K <= 2**17``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["fast_kernels", "int_linear_fast", "int_matmul_fast"]


def int_linear_fast(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``ops.int_linear`` via ``torch._int_mm`` (int8 x int8 -> int32)."""
    shape = x.shape
    acc = torch._int_mm(x.reshape(-1, shape[-1]).contiguous(), weight.t())
    if bias is not None:
        acc += bias
    return acc.reshape(*shape[:-1], weight.shape[0])


def int_matmul_fast(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """``ops.int_matmul`` as a loop of ``torch._int_mm`` over the flattened batch dims."""
    if transpose_b:
        b = b.transpose(-1, -2)
    batch = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = torch.empty(a3.shape[0], a3.shape[1], b3.shape[2], dtype=torch.int32, device=a.device)
    for i in range(a3.shape[0]):
        out[i] = torch._int_mm(a3[i], b3[i])
    return out.reshape(*batch, a.shape[-2], b.shape[-1])


def fast_kernels() -> dict[str, Callable[..., Tensor]]:
    """Kernels overriding the reference ones in ``ivit.engine.REFERENCE_KERNELS``."""
    return {
        "linear": int_linear_fast,
        "matmul": lambda a, b, transpose_b: int_matmul_fast(a, b, bool(transpose_b)),
    }
