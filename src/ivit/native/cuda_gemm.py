"""Exact int8 GEMMs for CUDA tensors: ``linear`` and ``matmul`` with the integers of ``ops.int_linear`` /
``ops.int_matmul``.

CUDA has no int64 (nor int8) ``matmul``/``bmm``, so the reference ops cannot run there.  This module uses
``torch._int_mm`` (cuBLASLt int8 x int8 -> int32 with 32-bit integer compute: every product and partial sum is
an exact integer, wrapping modulo ``2**32`` exactly like the reference's int64 -> int32 cast) under its shape
rules, which it meets by zero padding:

* ``a`` is ``(M, K)`` row-major with ``M > 16`` (rows padded to 32 when ``M <= 16``) and ``K > 0`` a multiple
  of 8 (K padded with zero columns in both operands: a zero term adds nothing);
* ``b`` is ``(K, N)`` column-major, i.e. the transpose view of a row-major ``(N, K)`` matrix (the "TN" layout
  of int8 tensor-core GEMMs), with ``N`` a multiple of 8 (zero rows appended, their columns sliced off);
* operands start at 16-byte aligned addresses with exact row-major strides (otherwise they are copied).

A uint8 left operand (the ``shiftmax_rel`` probabilities, ``[0, 255]``) is made int8 by an offset:
``p @ b = (p - 128) @ b + 128 * colsum(b)`` with ``colsum(b)[n] = sum_k b[k, n]`` (int32, ``|.| <= 128 * 128 * K``),
exact in the validated range ``K <= 2**16`` and congruent modulo ``2**32`` beyond it, like the reference.

Batched products (``matmul`` with leading dimensions) run one ``torch._int_mm`` per matrix: torch has no batched
int8 GEMM.  The padding happens once for the whole batch.

The functions run on any device where ``torch._int_mm`` exists (CPU too: the tests check the padding and offset
logic there against the reference), and keep the interfaces of ``ivit.native.gemm``:
``linear(x, weight, bias=None)`` and ``matmul(a, b, transpose_b=False)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear", "matmul", "mm_nk", "MIN_ROWS", "ALIGN"]

#: ``torch._int_mm`` on CUDA needs more than 16 rows in its left operand; smaller ones are padded to 32
MIN_ROWS = 17
_PAD_ROWS = 32
#: K and N must be multiples of 8
ALIGN = 8
_BYTES_ALIGN = 16


def _ceil(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _padded(x: Tensor, rows: int, cols: int) -> Tensor:
    """``x`` (``(..., r, c)``, int8) zero-padded to ``(..., rows, cols)`` with exact row-major strides, on an
    aligned address (``x`` itself when it already is)."""
    r, c = x.shape[-2], x.shape[-1]
    want = []
    s = 1
    for d in reversed((*x.shape[:-2], rows, cols)):
        want.append(s)
        s *= d
    if (r, c) == (rows, cols) and x.stride() == tuple(reversed(want)) and x.data_ptr() % _BYTES_ALIGN == 0:
        return x
    out = torch.zeros((*x.shape[:-2], rows, cols), dtype=x.dtype, device=x.device)
    out[..., :r, :c] = x
    return out


def _check_int8(x: Tensor, name: str) -> None:
    if x.dtype != torch.int8:
        raise TypeError(f"{name} must be int8, got {x.dtype}")


def _shapes(m: int, k: int, n: int) -> tuple[int, int, int]:
    return (m if m >= MIN_ROWS else _PAD_ROWS), _ceil(k, ALIGN), _ceil(n, ALIGN)


def mm_nk(a: Tensor, b_nk: Tensor) -> Tensor:
    """``out[m, n] = sum_k a[m, k] * b_nk[n, k]`` exactly: int8 ``(M, K)`` x int8 ``(N, K)`` -> int32 ``(M, N)``.

    One ``torch._int_mm`` on zero-padded operands (see the module docstring); M, N or K may be 0.
    """
    _check_int8(a, "a")
    _check_int8(b_nk, "b_nk")
    if a.dim() != 2 or b_nk.dim() != 2 or a.shape[1] != b_nk.shape[1]:
        raise ValueError(f"mm_nk: needs (M, K) x (N, K), got {tuple(a.shape)} and {tuple(b_nk.shape)}")
    m, k = a.shape
    n = b_nk.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    mp, kp, np_ = _shapes(m, k, n)
    out = torch._int_mm(_padded(a, mp, kp), _padded(b_nk, np_, kp).t())  # (Mp, Np)
    return out if (mp, np_) == (m, n) else out[:m, :n].contiguous()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``ops.int_linear`` (same integers): ``acc[..., n] = sum_k x[..., k] * weight[n, k] + bias[n]``.

    Args:
        x: int8 ``(..., K)``.
        weight: int8 ``(N, K)``.
        bias: integer ``(N,)`` or None (added in int64 unless it is int32, then cast like the reference).

    Returns:
        int32 ``(..., N)``, equal to ``ops.int_linear(x, weight, bias)``.

    Raises:
        TypeError: ``x`` or ``weight`` is not int8.
        ValueError: shapes or devices do not fit.
    """
    _check_int8(x, "x")
    _check_int8(weight, "weight")
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError("linear: operands on different devices")
    acc = mm_nk(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype == torch.int32:
            acc = acc.add_(bias)  # int32 wraps modulo 2**32 like the reference's cast
        else:
            acc = (acc.to(torch.int64) + bias.to(torch.int64)).to(torch.int32)
    return acc.reshape(*x.shape[:-1], weight.shape[0])


def matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """``ops.int_matmul`` (same integers): batched ``a @ b`` (or ``a @ b^T`` when ``transpose_b``).

    Args:
        a: int8 or uint8 ``(..., M, K)``.
        b: int8 ``(..., K, N)``, or ``(..., N, K)`` when ``transpose_b``; batch dims broadcast.
        transpose_b: whether ``b`` is stored ``(..., N, K)``.

    Returns:
        int32 ``(..., M, N)``, equal to ``ops.int_matmul(a, b, transpose_b)``.

    Raises:
        TypeError: ``a`` is not int8/uint8 or ``b`` is not int8.
        ValueError: shapes or devices do not fit.
    """
    if a.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"a must be int8 or uint8, got {a.dtype}")
    _check_int8(b, "b")
    if a.dim() < 2 or b.dim() < 2 or a.device != b.device:
        raise ValueError(f"matmul: needs matrices on one device, got {tuple(a.shape)} and {tuple(b.shape)}")
    m, k = a.shape[-2], a.shape[-1]
    kb, n = (b.shape[-1], b.shape[-2]) if transpose_b else (b.shape[-2], b.shape[-1])
    if kb != k:
        raise ValueError(f"matmul: inner dimensions differ: {tuple(a.shape)} x {tuple(b.shape)} "
                         f"(transpose_b={transpose_b})")
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    nb = 1
    for d in batch:
        nb *= d
    if nb == 0 or m == 0 or n == 0 or k == 0:
        return torch.zeros(*batch, m, n, dtype=torch.int32, device=a.device)
    b_nk = b if transpose_b else b.transpose(-1, -2)  # (..., N, K)
    colsum = None
    if a.dtype == torch.uint8:
        colsum = b_nk.sum(dim=-1, dtype=torch.int32).expand(*batch, n).reshape(nb, 1, n)  # (nb, 1, N)
        a = (a.to(torch.int16) - 128).to(torch.int8)
    mp, kp, np_ = _shapes(m, k, n)
    if (mp * kp) % _BYTES_ALIGN:  # every matrix of the batch starts 16-byte aligned
        mp += 1
    a3 = _padded(a.expand(*batch, m, k).reshape(nb, m, k), mp, kp)  # (nb, Mp, Kp)
    b3 = _padded(b_nk.expand(*batch, n, k).reshape(nb, n, k), np_, kp)  # (nb, Np, Kp)
    out = torch.empty(nb, mp, np_, dtype=torch.int32, device=a.device)
    for i in range(nb):
        torch._int_mm(a3[i], b3[i].t(), out=out[i])
    if (mp, np_) != (m, n):
        out = out[:, :m, :n]
    if colsum is not None:
        out = out + colsum * 128
    return out.contiguous().reshape(*batch, m, n)
