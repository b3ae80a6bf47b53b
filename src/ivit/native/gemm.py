"""Exact int8 GEMMs: ``linear`` and ``matmul`` with the integers of ``ops.int_linear`` / ``ops.int_matmul``.

(Interim version: routes to oneDNN's ``torch._int_mm`` only where a probe shows it exact, else to the
exact int64 reference.  The native C GEMM replaces the fallback.)
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import ops
from . import cpu_flags

__all__ = ["linear", "matmul", "int8_mm", "gemm_backend"]

_EXACT: bool | None = None


def _onednn_exact() -> bool:
    global _EXACT
    if _EXACT is None:
        flags = cpu_flags()
        ok = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) and os.environ.get("IVIT_GEMM") != "torch"
        if ok:
            g = torch.Generator().manual_seed(0)
            for m, k, n in ((1, 384, 64), (64, 384, 64), (17, 65, 33), (197, 3072, 64)):
                for a, b in ((torch.full((m, k), 127, dtype=torch.int8), torch.full((n, k), 127, dtype=torch.int8)),
                             (torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g),
                              torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g))):
                    try:
                        if not torch.equal(torch._int_mm(a, b.t()), ops.int_linear(a, b)):
                            ok = False
                    except RuntimeError:
                        ok = False
        _EXACT = ok
    return _EXACT


def gemm_backend() -> str:
    return "onednn" if _onednn_exact() else "torch"


def int8_mm(a: Tensor, b_nk: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a (M, K) int8|uint8 @ b_nk (N, K)^T int8 [+ bias]`` -> int32 ``(M, N)``, exact."""
    if a.device.type == "cpu" and b_nk.dtype == torch.int8 and a.dim() == 2 and a.shape[0] and a.shape[1] \
            and b_nk.shape[0] and _onednn_exact():
        if a.dtype == torch.int8:
            acc = torch._int_mm(a.contiguous(), b_nk.contiguous().t())
        elif a.dtype == torch.uint8:  # (p - 128) @ v + 128 * column sums: exact
            shifted = (a.to(torch.int16) - 128).to(torch.int8).contiguous()
            acc = torch._int_mm(shifted, b_nk.contiguous().t()) + 128 * b_nk.to(torch.int32).sum(dim=1)
        else:
            raise TypeError(f"int8_mm: a must be int8 or uint8, got {a.dtype}")
        return acc if bias is None else acc + bias
    if a.dtype == torch.uint8:
        acc = torch.matmul(a.to(torch.int64), b_nk.to(torch.int64).t()).to(torch.int32)
        return acc if bias is None else (acc.to(torch.int64) + bias.to(torch.int64)).to(torch.int32)
    return ops.int_linear(a, b_nk, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``ops.int_linear``: int8 ``(..., K)`` x int8 ``(N, K)`` [+ int32 bias] -> int32 ``(..., N)``."""
    if x.dtype != torch.int8 or weight.dtype != torch.int8 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return ops.int_linear(x, weight, bias)
    acc = int8_mm(x.reshape(-1, x.shape[-1]), weight, bias)
    return acc.reshape(*x.shape[:-1], weight.shape[0])


def matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """``ops.int_matmul`` for equal batch dims: a ``(..., M, K)`` int8/uint8, b int8."""
    if a.dim() < 2 or a.dim() != b.dim() or a.shape[:-2] != b.shape[:-2] or b.dtype != torch.int8 \
            or a.dtype not in (torch.int8, torch.uint8):
        return ops.int_matmul(a, b, transpose_b)
    bt = b if transpose_b else b.transpose(-1, -2)  # (..., N, K)
    if a.shape[-1] != bt.shape[-1]:
        return ops.int_matmul(a, b, transpose_b)
    m, n = a.shape[-2], bt.shape[-2]
    a3 = a.reshape(-1, m, a.shape[-1])
    b3 = bt.reshape(-1, n, bt.shape[-1])
    out = torch.empty(a3.shape[0], m, n, dtype=torch.int32, device=a.device)
    for i in range(a3.shape[0]):
        out[i] = int8_mm(a3[i], b3[i])
    return out.reshape(*a.shape[:-2], m, n)
