"""Triton kernels of the ``triton`` backend: the op set's integers, bit for bit, on CUDA.

Every launcher here has the op set's calling convention (``kernel(*inputs, **consts, **attrs)``) and returns
exactly ``OPSET[op].reference`` (tests compare them with ``torch.equal``, under ``TRITON_INTERPRET=1`` on the CPU
and on a GPU).  Integer arithmetic only: int8 tensor-core dots with int32 accumulators (exact: every partial sum
of a validated program stays inside int32), int32 elementwise math where the op's bounds allow it
(``shiftmax_rel``: every intermediate below ``2**31``), int64 where the reference needs it (dyadic products
``x * b`` up to ``2**62``, the legacy Shiftmax, I-LayerNorm's variance).  Integer division is C's (truncation):
every division here has a non-negative quotient (``floor == trunc``) or goes through ``_floordiv``.

Kernels:

* ``_gemm_kernel``: ``x (M, K) @ w (N, K)^T [+ bias]`` with an epilogue chosen at compile time: int32 out
  (``linear``), ``requantize``, ``add_requantize`` with a residual, or ``requantize_table``.  The fused forms are
  exposed as ``linear_requantize``, ``linear_add_requantize``, ``linear_requantize_table`` (ops the op set does
  not have yet: their reference is the composition of the existing ops, see their docstrings).
* ``_bmm_kernel``: batched int8/uint8 x int8 (``matmul``); uint8 ``a`` by ``(a - 128) @ b + 128 * colsum(b)``.
* ``_attention_kernel``: the fused ``attention`` op, one program per (image, head, block of query rows), the whole
  key row in registers: ``q k^T`` (tensor cores) [+ bias], score requantization, [window mask], Shiftmax-rel
  (or the legacy Shiftmax), ``p v`` (tensor cores), ``attn_normalize``; no score tensor in memory.
* row kernels: ``requantize``, ``add_requantize``, ``requantize_table``, ``shiftgelu`` (256-entry table),
  ``layernorm32`` and ``layernorm`` (exact integer square root), ``shiftmax_rel``, ``shiftmax``, ``attn_normalize``.

Launchers never read device values on the host (no synchronization): the engine's run can be captured in a CUDA
graph.  Per-tensor constants are widened to per-channel vectors here when a caller has not done it (the backend's
factories do it once at plan time).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import ops
from ...ir.opset import PROBS_REL8

__all__ = ["INTERPRETED", "linear", "linear_requantize", "linear_add_requantize", "linear_requantize_table",
           "matmul", "requantize", "add_requantize", "requantize_table", "shiftgelu", "gelu_table", "layernorm",
           "layernorm32", "shiftmax", "shiftmax_rel", "attn_normalize", "attention", "channels", "KERNELS",
           "PROPOSED", "MAX_ATTENTION_TOKENS"]

#: whether these kernels were defined for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

_NEG32: tl.constexpr = tl.constexpr(-(2**31) + 1)  # ops.shiftmax_rel's masked score
_NEG40: tl.constexpr = tl.constexpr(-(2**40))  # ops.shiftmax's masked score
_DIV_NUM: tl.constexpr = tl.constexpr(ops.DIV_NUM)
_INT32_MAX: tl.constexpr = tl.constexpr(ops.INT32_MAX)
_LN_SHIFT: tl.constexpr = tl.constexpr(31 - ops.LN_Z_BITS)
_LN_HALF: tl.constexpr = tl.constexpr(1 << (30 - ops.LN_Z_BITS))
_NORM_ONE: tl.constexpr = tl.constexpr(1 << ops._NORM_NUM_BITS)  # ops.attn_normalize: R = floor(2**30 / P)
_NORM_SHIFT: tl.constexpr = tl.constexpr(ops._NORM_NUM_BITS - ops.CTX_FRAC_BITS)
_NORM_HALF: tl.constexpr = tl.constexpr(1 << (ops._NORM_NUM_BITS - ops.CTX_FRAC_BITS - 1))
_REL_SHIFT: tl.constexpr = tl.constexpr(ops._REL_MULT_SHIFT)  # p = round_shift(e' * M, 22 + q)
_REL_QMAX: tl.constexpr = tl.constexpr(ops._REL_QMAX)
_REL_NUM = 255 << ops._REL_MULT_SHIFT  # M = floor(255 * 2**22 / |x0|), computed on the host

#: the fused attention keeps a whole key row in registers; longer rows use the unfused kernels
MAX_ATTENTION_TOKENS = 1024

# epilogues of the GEMM kernel
_EPI_ACC, _EPI_REQUANT, _EPI_ADD, _EPI_TABLE = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------------------------
# Integer helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _round_shift(x, s):
    """``ops.round_shift``: ``(x + 2**(s-1)) >> s`` on int64 ``x`` with ``1 <= s <= 62`` (ties up)."""
    s = s.to(tl.int64)
    one = tl.full(s.shape, 1, tl.int64)
    return (x + (one << (s - 1))) >> s


@triton.jit
def _dyadic(x, mult, shift):
    """``round_shift(x * mult, shift)`` in int64 (``|x|, |mult| < 2**31``: the product is below ``2**62``)."""
    return _round_shift(x.to(tl.int64) * mult.to(tl.int64), shift)


@triton.jit
def _clamp(x, m):
    return tl.minimum(tl.maximum(x, -m), m)


@triton.jit
def _floordiv(n, d):
    """``floor(n / d)`` for ``d > 0`` from the truncating division."""
    q = n // d
    return tl.where(q * d > n, q - 1, q)


@triton.jit
def _bit_length(v):
    """Bits of each non-negative int64 (0 for 0), by the binary search of ``ops._bit_length``."""
    rest = v.to(tl.int64)
    big = rest >= 4294967296  # 2**32
    bl = tl.where(big, 32, 0).to(tl.int64)
    rest = tl.where(big, rest >> 32, rest)
    big = rest >= 65536
    bl += tl.where(big, 16, 0)
    rest = tl.where(big, rest >> 16, rest)
    big = rest >= 256
    bl += tl.where(big, 8, 0)
    rest = tl.where(big, rest >> 8, rest)
    big = rest >= 16
    bl += tl.where(big, 4, 0)
    rest = tl.where(big, rest >> 4, rest)
    big = rest >= 4
    bl += tl.where(big, 2, 0)
    rest = tl.where(big, rest >> 2, rest)
    big = rest >= 2
    bl += tl.where(big, 1, 0)
    rest = tl.where(big, rest >> 1, rest)
    return bl + (rest > 0).to(tl.int64)


@triton.jit
def _isqrt(v):
    """``ops.isqrt``: ``floor(sqrt(v))`` for int64 ``0 <= v < 2**62``, by the same Newton iteration from above.

    Ten steps, the reference's ``max_iter``: once an element reaches ``floor(sqrt(v))`` it stays there, so the
    reference's early stop (no element changes) gives the same integers."""
    v = v.to(tl.int64)
    one = tl.full(v.shape, 1, tl.int64)
    k = one << ((_bit_length(v) + 1) >> 1)
    for _ in tl.static_range(10):
        k = tl.minimum(k, (k + v // tl.maximum(k, 1)) >> 1)
    return tl.where(v == 0, 0, k)


@triton.jit
def _rel_probs(s, valid, x0, m_rel):
    """``ops.shiftmax_rel`` of int32 score rows ``s`` (``|s| < 2**24``) over axis 1; 0 where not ``valid``.

    Every intermediate fits int32 (see ``ops.shiftmax_rel``).  Returns int32 in ``[0, 255]``."""
    smax = tl.max(tl.where(valid, s, _NEG32), axis=1)
    d = tl.where(valid, s - smax[:, None], 0)
    xp = tl.maximum(d + (d >> 1) - (d >> 4), x0 * _REL_QMAX)
    q = xp // x0  # xp <= 0, x0 < 0: a non-negative quotient, truncation == floor
    r = xp - q * x0
    e = (r >> 1) - x0
    sh = q + _REL_SHIFT
    p = (e * m_rel + (1 << (sh - 1))) >> sh
    return tl.where(valid, tl.minimum(p, 255), 0)


@triton.jit
def _legacy_probs(s, valid, x0, n, K_OUT: tl.constexpr):
    """``ops.shiftmax`` (absolute probabilities ``[0, 2**(K_OUT-1) - 1]``) of int64 score rows over axis 1."""
    s = s.to(tl.int64)
    x0 = x0.to(tl.int64)
    n = n.to(tl.int64)
    smax = tl.max(tl.where(valid, s, _NEG40), axis=1)
    xd = tl.where(valid, s - smax[:, None], 0)
    xp = tl.maximum(xd + (xd >> 1) - (xd >> 4), n * x0)
    q = xp // x0  # non-negative quotient
    r = xp - q * x0
    e = tl.where(valid, ((r >> 1) - x0) << (n - q), 0)
    total = tl.maximum(tl.sum(e, axis=1), 1)
    factor = tl.full(total.shape, _DIV_NUM, tl.int64) // total
    out = (e * factor[:, None] + (1 << (62 - K_OUT))) >> (63 - K_OUT)
    return tl.minimum(out, (1 << (K_OUT - 1)) - 1)


# ---------------------------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["qmax"])  # per-layer constants: no recompilation
def _gemm_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, mult_ptr, shift_ptr, res_ptr, rmult_ptr, rshift_ptr, table_ptr,
                 M, N, K, sxm, sxk, swn, swk, som, srm, qmax,
                 HAS_BIAS: tl.constexpr, EPI: tl.constexpr, EVEN_K: tl.constexpr, WIDE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """``out = epilogue(x @ w^T + bias)`` for int8 ``x (M, K)``, ``w (N, K)``; grouped tile order for L2 reuse.

    Rows and columns past the edge read wrapped (valid) addresses and are never stored; K tails load zeros.
    ``WIDE``: 64-bit row offsets (tensors of 2**31 bytes or more)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    am = rm % M
    bn = rn % N
    if WIDE:
        am = am.to(tl.int64)
        bn = bn.to(tl.int64)
    a_ptrs = x_ptr + am[:, None] * sxm + rk[None, :] * sxk  # (BM, BK)
    b_ptrs = w_ptr + bn[None, :] * swn + rk[:, None] * swk  # (BK, BN)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            left = K - kt * BK
            a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < left, other=0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK * sxk
        b_ptrs += BK * swk
    m_ok = rm < M
    n_ok = rn < N
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + bn)[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    om = rm.to(tl.int64) if WIDE else rm
    out_ptrs = out_ptr + om[:, None] * som + rn[None, :]
    if EPI == 0:
        tl.store(out_ptrs, acc, mask=ok)
    else:
        mult = tl.load(mult_ptr + bn)[None, :]
        shift = tl.load(shift_ptr + bn)[None, :]
        y = _dyadic(acc, mult, shift)
        if EPI == 2:
            res = tl.load(res_ptr + om[:, None] * srm + rn[None, :], mask=ok, other=0)
            rmult = tl.load(rmult_ptr + bn)[None, :]
            rshift = tl.load(rshift_ptr + bn)[None, :]
            y = _dyadic(res, rmult, rshift) + y
        y = _clamp(y, qmax)
        if EPI == 3:
            tl.store(out_ptrs, tl.load(table_ptr + (y + 128)), mask=ok)
        else:
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, out_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, sob, som,
                A_U8: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``out[i] = a[i] @ b[i]`` (int32) for int8/uint8 ``a (nb, M, K)`` and int8 ``b (nb, K, N)`` (any strides)."""
    i = tl.program_id(0).to(tl.int64)  # the batch of matrices on the first grid axis (up to 2**31 - 1)
    pid = tl.program_id(1)
    grid_n = tl.cdiv(N, BN)
    rm = (pid // grid_n) * BM + tl.arange(0, BM)
    rn = (pid % grid_n) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + i * sab + rm.to(tl.int64)[:, None] * sam
    b_cols = b_ptr + i * sbb + rn.to(tl.int64)[None, :] * sbn
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    colsum = tl.zeros((BN,), dtype=tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_rows + kk[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_cols + kk[:, None] * sbk, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if A_U8:  # p @ b = (p - 128) @ b + 128 * colsum(b); padding has b = 0 on both sides
            a = (a.to(tl.int32) - 128).to(tl.int8)
            colsum += tl.sum(b.to(tl.int32), axis=0)
        acc = tl.dot(a, b, acc)
    if A_U8:
        acc = acc + colsum[None, :] * 128
    tl.store(out_ptr + i * sob + rm.to(tl.int64)[:, None] * som + rn[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])


def _np2(v: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, v)))


def _gemm_config(m: int, n: int, k: int) -> dict[str, int]:
    """Tile sizes by problem size (a heuristic pending tuning on a GPU; chosen so that ``ptxas`` for sm_90 reports
    no spills).  int8 dots need a K tile of at least 32."""
    if m >= 2048 and n >= 128:
        bm, bn, warps = 128, 128, 8
    else:
        bm = 64 if m >= 64 else 32 if m >= 32 else 16
        bn = 64 if n >= 64 else 32 if n >= 32 else 16
        warps = 4
    bk = 64 if k >= 64 and k % 64 == 0 or k > 96 else 32
    return {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": 4 if k >= 4 * bk else 3}


def _rows_view(x: Tensor) -> tuple[Tensor, int]:
    """``x`` as ``(rows, C)`` with unit column stride: ``(view, row stride)``.  No copy when the outer dims collapse
    onto the rows (``Tensor.view`` succeeds): column slices such as the q/k/v parts of the qkv accumulator."""
    c = x.shape[-1]
    try:
        x2 = x.view(-1, c)
    except RuntimeError:
        x2 = x.contiguous().view(-1, c)
    if c > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2, x2.stride(0)


def channels(t: Tensor | None, c: int, device: torch.device) -> Tensor | None:
    """A per-tensor or per-channel integer constant as a contiguous int32 ``(c,)`` vector on ``device``."""
    if t is None:
        return None
    if t.numel() == 1:
        return t.reshape(1).to(device=device, dtype=torch.int32).expand(c).contiguous()
    if tuple(t.shape) != (c,):
        raise ValueError(f"constant of shape {tuple(t.shape)} for {c} channels")
    return t.to(device=device, dtype=torch.int32).contiguous()


def _gemm(x: Tensor, weight: Tensor, bias: Tensor | None, epi: int, out_dtype: torch.dtype, qmax: int = 0,
          mult: Tensor | None = None, shift: Tensor | None = None, residual: Tensor | None = None,
          rmult: Tensor | None = None, rshift: Tensor | None = None, table: Tensor | None = None) -> Tensor:
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise TypeError(f"linear needs int8 x and weight, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    n, k = weight.shape
    lead = x.shape[:-1]
    out = torch.empty(*lead, n, dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    dev = x.device
    if k == 0:  # an empty sum: zero operands of K = 1 give the same accumulator (0 + bias)
        k, x, weight = 1, torch.zeros(*lead, 1, dtype=torch.int8, device=dev), torch.zeros(n, 1, dtype=torch.int8,
                                                                                         device=dev)
    x2, sxm = _rows_view(x)
    m = x2.shape[0]
    bias_c = None if bias is None else bias.to(device=dev, dtype=torch.int32).contiguous()
    res2, srm = (None, 0)
    if residual is not None:
        if tuple(residual.shape) != (*lead, n):
            raise ValueError(f"residual {tuple(residual.shape)} does not fit the output {(*lead, n)}")
        res2, srm = _rows_view(residual)
    cfg = _gemm_config(m, n, k)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    wide = max(m * max(sxm, n, srm), n * weight.stride(0)) >= 2**31 - 2**20
    dummy = out
    _gemm_kernel[grid](
        x2, weight, out, dummy if bias_c is None else bias_c,
        dummy if mult is None else channels(mult, n, dev), dummy if shift is None else channels(shift, n, dev),
        dummy if res2 is None else res2, dummy if rmult is None else channels(rmult, n, dev),
        dummy if rshift is None else channels(rshift, n, dev), dummy if table is None else table.to(dev).contiguous(),
        m, n, k, sxm, x2.stride(1), weight.stride(0), weight.stride(1), n, srm, qmax,
        HAS_BIAS=bias_c is not None, EPI=epi, EVEN_K=k % cfg["BK"] == 0, WIDE=wide, **cfg)
    return out


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``ops.int_linear``: int8 ``(..., K)`` x int8 ``(N, K)`` [+ int32 bias] -> int32 ``(..., N)``."""
    return _gemm(x, weight, bias, _EPI_ACC, torch.int32)


def linear_requantize(x: Tensor, weight: Tensor, mult: Tensor, shift: Tensor, bits: int,
                      bias: Tensor | None = None) -> Tensor:
    """Fused ``requantize(linear(x, weight, bias), mult, shift, bits)`` (a proposed op ``linear_requantize``).

    ``out[..., n] = clamp(round_shift(acc[..., n] * mult[n], shift[n]), -qmax(bits), qmax(bits))`` with
    ``acc = ops.int_linear(x, weight, bias)``; ``storage_dtype(bits)`` out; the int32 accumulator never leaves
    the GEMM's registers."""
    return _gemm(x, weight, bias, _EPI_REQUANT, ops.storage_dtype(bits), ops.qmax(bits), mult, shift)


def linear_add_requantize(x: Tensor, residual: Tensor, weight: Tensor, mult_a: Tensor, shift_a: Tensor,
                          mult_b: Tensor, shift_b: Tensor, bits: int, bias: Tensor | None = None) -> Tensor:
    """Fused ``add_requantize(residual, linear(x, weight, bias), mult_a, shift_a, mult_b, shift_b, bits)`` (a proposed
    op ``linear_add_requantize``): the residual stream is operand ``a`` and the accumulator operand ``b``, as in the
    programs' ``linear -> add_requantize`` chains, so a pass copies the constants unchanged."""
    return _gemm(x, weight, bias, _EPI_ADD, ops.storage_dtype(bits), ops.qmax(bits), mult_b, shift_b, residual,
                 mult_a, shift_a)


def linear_requantize_table(x: Tensor, weight: Tensor, mult: Tensor, shift: Tensor, table: Tensor,
                            bias: Tensor | None = None) -> Tensor:
    """Fused ``requantize_table(linear(x, weight, bias), mult, shift, table)`` (a proposed op
    ``linear_requantize_table``: the MLP's fc1 -> GELU): ``table[requantize(acc, mult, shift, 8) + 128]``, int8."""
    if table.dtype != torch.int8 or tuple(table.shape) != (256,):
        raise ValueError("table must be int8 (256,)")
    return _gemm(x, weight, bias, _EPI_TABLE, torch.int8, ops.qmax(8), mult, shift, table=table)


def matmul(a: Tensor, b: Tensor, transpose_b: int | bool = False) -> Tensor:
    """``ops.int_matmul``: batched int8/uint8 ``(..., M, K)`` x int8 ``(..., K, N)`` (or ``(..., N, K)``) -> int32."""
    if a.dtype not in (torch.int8, torch.uint8) or b.dtype != torch.int8:
        raise TypeError(f"matmul needs int8/uint8 a and int8 b, got {a.dtype} and {b.dtype}")
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError("matmul needs matrices")
    bt = b.transpose(-1, -2) if transpose_b else b  # (..., K, N) view
    m, k = a.shape[-2:]
    if bt.shape[-2] != k:
        raise ValueError(f"matmul: inner dimensions differ: {tuple(a.shape)} x {tuple(b.shape)}")
    n = bt.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], bt.shape[:-2])
    out = torch.empty(*batch, m, n, dtype=torch.int32, device=a.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    a3 = a.expand(*batch, m, k).reshape(-1, m, k)
    b3 = bt.expand(*batch, k, n).reshape(-1, k, n)
    o3 = out.view(-1, m, n)
    bm = 64 if m >= 64 else 32 if m >= 32 else 16
    bn = 64 if n >= 64 else 32 if n >= 32 else 16
    bk = 64 if k >= 64 else 32
    grid = (o3.shape[0], triton.cdiv(m, bm) * triton.cdiv(n, bn))
    _bmm_kernel[grid](a3, b3, o3, m, n, k, a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1),
                      b3.stride(2), o3.stride(0), o3.stride(1), A_U8=a.dtype == torch.uint8, BM=bm, BN=bn, BK=bk,
                      num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Row kernels: requantize, residual add, tables
# ---------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["qmax"])  # per-layer constants: no recompilation
def _rowwise_kernel(x_ptr, y_ptr, out_ptr, mult_ptr, shift_ptr, ymult_ptr, yshift_ptr, table_ptr,
                    R, C, sxr, syr, qmax, OP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Elementwise ops on ``(R, C)`` rows with per-channel constants (OP: 0 requantize, 1 add_requantize,
    2 requantize_table, 3 table lookup of int8 values)."""
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    r_ok = rr < R
    c_ok = rc < C
    ok = r_ok[:, None] & c_ok[None, :]
    r64 = rr.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * sxr + rc[None, :], mask=ok, other=0)
    if OP == 3:
        out = tl.load(table_ptr + (x.to(tl.int32) + 128), mask=ok, other=0)
    else:
        mult = tl.load(mult_ptr + rc, mask=c_ok, other=0)[None, :]
        shift = tl.load(shift_ptr + rc, mask=c_ok, other=1)[None, :]
        v = _dyadic(x, mult, shift)
        if OP == 1:
            y = tl.load(y_ptr + r64 * syr + rc[None, :], mask=ok, other=0)
            ym = tl.load(ymult_ptr + rc, mask=c_ok, other=0)[None, :]
            ys = tl.load(yshift_ptr + rc, mask=c_ok, other=1)[None, :]
            v = v + _dyadic(y, ym, ys)
        v = _clamp(v, qmax)
        if OP == 2:
            out = tl.load(table_ptr + (v + 128), mask=ok, other=0)
        else:
            out = v.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r64 * C + rc[None, :], out, mask=ok)


def _rowwise(op: int, x: Tensor, out_dtype: torch.dtype, qmax: int = 0, mult: Tensor | None = None,
             shift: Tensor | None = None, y: Tensor | None = None, ymult: Tensor | None = None,
             yshift: Tensor | None = None, table: Tensor | None = None) -> Tensor:
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out
    if x.dim() == 0:
        raise ValueError("a row op needs at least one dimension")
    c = x.shape[-1]
    dev = x.device
    x2, sxr = _rows_view(x)
    y2, syr = (x2, 0) if y is None else _rows_view(y)
    r = x2.shape[0]
    bc = min(_np2(c), 1024)
    br = max(1, min(_np2(r), 4096 // bc))
    grid = (triton.cdiv(r, br), triton.cdiv(c, bc))
    d = out
    _rowwise_kernel[grid](x2, y2, out, d if mult is None else channels(mult, c, dev),
                          d if shift is None else channels(shift, c, dev),
                          d if ymult is None else channels(ymult, c, dev),
                          d if yshift is None else channels(yshift, c, dev),
                          d if table is None else table.to(dev).contiguous(), r, c, sxr, syr, qmax, OP=op, BR=br, BC=bc,
                          num_warps=4)
    return out


def requantize(x: Tensor, mult: Tensor, shift: Tensor, bits: int) -> Tensor:
    """``ops.requantize``: ``clamp(round_shift(x * mult, shift), -qmax, qmax)`` per tensor or per channel."""
    return _rowwise(0, x, ops.storage_dtype(bits), ops.qmax(bits), mult, shift)


def add_requantize(a: Tensor, b: Tensor, mult_a: Tensor, shift_a: Tensor, mult_b: Tensor, shift_b: Tensor,
                   bits: int) -> Tensor:
    """``ops.add_requantize``: each branch requantized to the output scale (half up), summed, clamped once."""
    if a.shape != b.shape:
        raise ValueError(f"add_requantize operands differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    return _rowwise(1, a, ops.storage_dtype(bits), ops.qmax(bits), mult_a, shift_a, b, mult_b, shift_b)


def requantize_table(x: Tensor, mult: Tensor, shift: Tensor, table: Tensor) -> Tensor:
    """``table[requantize(x, mult, shift, 8) + 128]`` (int8)."""
    return _rowwise(2, x, table.dtype, ops.qmax(8), mult, shift, table=table)


_GELU_TABLES: dict[tuple[int, int, int], Tensor] = {}


def gelu_table(x0: int, n: int, k_out: int) -> Tensor:
    """``table[v + 128] = ops.shiftgelu(v)`` for the 256 int8 values ``v`` (int32, CPU, computed by the reference)."""
    key = (x0, n, k_out)
    if key not in _GELU_TABLES:
        _GELU_TABLES[key] = ops.shiftgelu(torch.arange(-128, 128, dtype=torch.int8), x0, n, k_out).contiguous()
    return _GELU_TABLES[key]


def shiftgelu(x: Tensor, x0: int, n: int, k_out: int, table: Tensor | None = None) -> Tensor:
    """``ops.shiftgelu`` of int8 values through a 256-entry table of the reference op (exact).

    ``table`` (int32 ``(256,)`` on the device) is the precomputed ``gelu_table(x0, n, k_out)``; the backend's
    factory binds it once so no host-to-device copy happens while running."""
    if x.dtype != torch.int8:
        raise TypeError(f"shiftgelu kernel needs int8 input, got {x.dtype}")
    t = gelu_table(x0, n, k_out).to(x.device) if table is None else table
    return _rowwise(3, x, torch.int32, table=t)


# ---------------------------------------------------------------------------------------------------------------
# Row kernels: I-LayerNorm, Shiftmax, attn_normalize
# ---------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["qmax", "ln_bits"])  # per-layer constants: no recompilation
def _layernorm_kernel(x_ptr, out_ptr, mult_ptr, shift_ptr, off_ptr, R, C, sxr, qmax, ln_bits,
                      LN32: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """``ops.ilayernorm32`` (LN32) or ``ops.ilayernorm`` over rows of ``C`` channels."""
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    rc = tl.arange(0, BC)
    r_ok = rr < R
    c_ok = rc < C
    ok = r_ok[:, None] & c_ok[None, :]
    r64 = rr.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * sxr + rc[None, :], mask=ok, other=0).to(tl.int64)
    s = tl.sum(x, axis=1)
    if LN32:
        mean = _floordiv(s + (C >> 1), C)
        y = tl.where(ok, x - mean[:, None], 0)
        k = tl.maximum(_bit_length(tl.max(tl.abs(y), axis=1)) - ln_bits, 0)
        yp = y >> k[:, None]
        r = y - (yp << k[:, None])  # y = y' * 2**k + r, 0 <= r < 2**k
        v = tl.sum(yp * yp, axis=1) + ((2 * tl.sum(yp * r, axis=1) + (tl.sum(r * r, axis=1) >> k)) >> k)
        std = _isqrt(v)  # v = floor(sum(y**2) / 4**k)
        f = (tl.full(std.shape, _INT32_MAX, tl.int64) // tl.maximum(std, 1)) >> k
        z = (y * f[:, None] + _LN_HALF) >> _LN_SHIFT  # round_shift(y * F, 11)
    else:
        mean = _floordiv(2 * s + C, 2 * C)
        y = tl.where(ok, x - mean[:, None], 0)
        std = _isqrt(tl.sum(y * y, axis=1))
        z = (y * (tl.full(std.shape, _INT32_MAX, tl.int64) // tl.maximum(std, 1))[:, None]) >> _LN_SHIFT
    mult = tl.load(mult_ptr + rc, mask=c_ok, other=0)[None, :]
    shift = tl.load(shift_ptr + rc, mask=c_ok, other=1)[None, :]
    off = tl.load(off_ptr + rc, mask=c_ok, other=0).to(tl.int64)[None, :]
    out = _clamp(_dyadic(z, mult, shift) + off, qmax)
    tl.store(out_ptr + r64 * C + rc[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


def _layernorm(ln32: bool, x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor, bits: int) -> Tensor:
    if x.dtype not in (torch.int8, torch.int16):
        raise TypeError(f"layernorm needs int8/int16 input, got {x.dtype}")
    out = torch.empty(x.shape, dtype=ops.storage_dtype(bits), device=x.device)
    if x.numel() == 0:
        return out
    c = x.shape[-1]
    x2, sxr = _rows_view(x)
    r = x2.shape[0]
    bc = _np2(c)
    br = max(1, min(_np2(r), 2048 // bc))
    dev = x.device
    _layernorm_kernel[(triton.cdiv(r, br),)](x2, out, channels(mult, c, dev), channels(shift, c, dev),
                                             channels(offset, c, dev), r, c, sxr, ops.qmax(bits),
                                             ops._ln_bits(c), LN32=ln32, BR=br, BC=bc,
                                             num_warps=4 if bc <= 1024 else 8)
    return out


def layernorm32(x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor, bits: int) -> Tensor:
    """``ops.ilayernorm32`` (32-bit intermediates, the default I-LayerNorm)."""
    return _layernorm(True, x, mult, shift, offset, bits)


def layernorm(x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor, bits: int) -> Tensor:
    """``ops.ilayernorm`` (64-bit variance; programs of format 1)."""
    return _layernorm(False, x, mult, shift, offset, bits)


@triton.jit(do_not_specialize=["x0", "n", "m_rel"])  # per-layer constants: no recompilation
def _softmax_kernel(x_ptr, out_ptr, mask_ptr, R, N, sxr, heads, n_win, x0, n, m_rel,
                    REL: tl.constexpr, K_OUT: tl.constexpr, HAS_MASK: tl.constexpr,
                    BR: tl.constexpr, BN: tl.constexpr):
    """``ops.shiftmax_rel`` (REL) or ``ops.shiftmax`` over rows of ``N`` scores; a window mask ``(nW, N, N)``
    applies to scores ``(B*nW, H, N, N)``: row ``r`` is query ``r % N`` of window ``(r // (H*N)) % nW``."""
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    rn = tl.arange(0, BN)
    r_ok = rr < R
    n_ok = rn < N
    ok = r_ok[:, None] & n_ok[None, :]
    r64 = rr.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * sxr + rn[None, :], mask=ok, other=0).to(tl.int32)
    valid = ok
    if HAS_MASK:
        w = (r64 // (heads * N)) % n_win
        mrow = w * N + r64 % N  # row of the mask viewed as (nW * N, N)
        masked = tl.load(mask_ptr + mrow[:, None] * N + rn[None, :], mask=ok, other=0)
        valid = valid & (masked == 0)
    if REL:
        p = _rel_probs(x, valid, x0, m_rel)
    else:
        p = _legacy_probs(x, valid, x0, n, K_OUT)
    tl.store(out_ptr + r64[:, None] * N + rn[None, :], p.to(out_ptr.dtype.element_ty), mask=ok)


def _softmax_launch(rel: bool, x: Tensor, x0: int, n: int, k_out: int, mask: Tensor | None, out_dtype: torch.dtype
                    ) -> Tensor:
    if x.dtype not in (torch.int8, torch.int16, torch.int32):
        raise TypeError(f"shiftmax needs int8/int16/int32 scores, got {x.dtype}")
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out
    n_tok = x.shape[-1]
    heads, n_win, m8 = 1, 1, None
    if mask is not None:
        if x.dim() != 4 or tuple(mask.shape[1:]) != (n_tok, n_tok) or x.shape[-2] != n_tok \
                or x.shape[0] % mask.shape[0]:
            raise ValueError(f"mask {tuple(mask.shape)} does not fit scores {tuple(x.shape)}")
        heads, n_win = x.shape[1], mask.shape[0]
        m8 = _mask_u8(mask, x.device)
    x2, sxr = _rows_view(x)
    r = x2.shape[0]
    bn = _np2(n_tok, 16)
    br = max(1, min(_np2(r), 4096 // bn))
    m_rel = _REL_NUM // (-x0) if rel else 0
    _softmax_kernel[(triton.cdiv(r, br),)](x2, out, out if m8 is None else m8, r, n_tok, sxr, heads, n_win, x0, n,
                                          m_rel, REL=rel, K_OUT=k_out, HAS_MASK=m8 is not None, BR=br, BN=bn,
                                          num_warps=4)
    return out


def _mask_u8(mask: Tensor, device: torch.device) -> Tensor:
    return mask.to(device=device, dtype=torch.uint8).contiguous()


def shiftmax_rel(x: Tensor, x0: int, mask: Tensor | None = None) -> Tensor:
    """``ops.shiftmax_rel`` (uint8 probabilities relative to the row maximum), window mask as in the op set."""
    if not -(2**27) <= x0 <= -1:
        raise ValueError(f"shiftmax_rel needs -2**27 <= x0 <= -1, got {x0}")
    return _softmax_launch(True, x, x0, 0, 8, mask, torch.uint8)


def shiftmax(x: Tensor, x0: int, n: int, k_out: int, mask: Tensor | None = None) -> Tensor:
    """``ops.shiftmax`` (the I-ViT Shiftmax, absolute probabilities), window mask as in the op set."""
    if x0 > -1 or not 0 <= n <= 62 or not 2 <= k_out <= 16:
        raise ValueError("shiftmax: x0 <= -1, 0 <= n <= 62, 2 <= k_out <= 16")
    return _softmax_launch(False, x, x0, n, k_out, mask, ops.storage_dtype(k_out))


@triton.jit
def _normalize_kernel(acc_ptr, p_ptr, out_ptr, R, D, N, sar, spr, BR: tl.constexpr, BD: tl.constexpr,
                      BN: tl.constexpr):
    """``ops.attn_normalize``: ``round_shift(acc * floor(2**30 / max(sum(p), 1)), 14)`` per row."""
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = rr < R
    r64 = rr.to(tl.int64)[:, None]
    rn = tl.arange(0, BN)
    p = tl.load(p_ptr + r64 * spr + rn[None, :], mask=r_ok[:, None] & (rn < N)[None, :], other=0)
    total = tl.maximum(tl.sum(p.to(tl.int32), axis=1), 1)
    rcp = (tl.full(total.shape, _NORM_ONE, tl.int32) // total).to(tl.int64)
    rd = tl.arange(0, BD)
    ok = r_ok[:, None] & (rd < D)[None, :]
    acc = tl.load(acc_ptr + r64 * sar + rd[None, :], mask=ok, other=0).to(tl.int64)
    out = (acc * rcp[:, None] + _NORM_HALF) >> _NORM_SHIFT
    tl.store(out_ptr + r64 * D + rd[None, :], out.to(tl.int32), mask=ok)


def attn_normalize(acc: Tensor, p: Tensor) -> Tensor:
    """``ops.attn_normalize``: ``acc = p @ v`` (int32 ``(..., N, d)``) divided by the row sums of uint8 ``p``."""
    if acc.dtype != torch.int32 or p.dtype != torch.uint8 or acc.shape[:-1] != p.shape[:-1]:
        raise TypeError("attn_normalize needs int32 acc (..., N, d) and uint8 p (..., N, N)")
    out = torch.empty(acc.shape, dtype=torch.int32, device=acc.device)
    if acc.numel() == 0:
        return out
    a2, sar = _rows_view(acc)
    p2, spr = _rows_view(p)
    r, d = a2.shape
    n_tok = p2.shape[1]
    bd, bn = _np2(d), _np2(n_tok)
    br = max(1, min(_np2(r), 4096 // max(bd, bn)))
    _normalize_kernel[(triton.cdiv(r, br),)](a2, p2, out, r, d, n_tok, sar, spr, BR=br, BD=bd, BN=bn, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fused attention
# ---------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["score_mult", "score_shift", "score_qmax", "x0", "n_exp", "m_rel"])
def _attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bias_ptr, mask_ptr,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                      H, N, D, n_win, score_mult, score_shift, score_qmax, x0, n_exp, m_rel,
                      HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, REL: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """One program per (block of query rows, image*head): the ``attention`` op's integers for those rows."""
    bh = tl.program_id(0)  # B*H can be large: the first grid axis (up to 2**31 - 1)
    pid_m = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rd = tl.arange(0, BD)
    m_ok = rm < N
    n_ok = rn < N
    d_ok = rd < D
    q = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0)  # (BM, BD)
    kt = tl.load(k_ptr + b * skb + h * skh + rn[None, :] * skn + rd[:, None], mask=d_ok[:, None] & n_ok[None, :],
                 other=0)  # (BD, BN)
    s = tl.dot(q, kt)  # int32 scores (BM, BN)
    pair = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        s = s + tl.load(bias_ptr + h * N * N + rm[:, None] * N + rn[None, :], mask=pair, other=0)
    s = _clamp(_round_shift(s.to(tl.int64) * score_mult, score_shift), score_qmax)
    valid = pair
    if HAS_MASK:
        w = b % n_win
        masked = tl.load(mask_ptr + w * N * N + rm[:, None] * N + rn[None, :], mask=pair, other=0)
        valid = valid & (masked == 0)
    v = tl.load(v_ptr + b * svb + h * svh + rn[:, None] * svn + rd[None, :], mask=n_ok[:, None] & d_ok[None, :],
                other=0)  # (BN, BD)
    if REL:
        p = _rel_probs(s.to(tl.int32), valid, x0, m_rel)  # [0, 255]
        # p @ v = (p - 128) @ v + 128 * colsum(v): uint8 x int8 on int8 tensor cores (padding keys have v = 0)
        acc = tl.dot((p - 128).to(tl.int8), v) + 128 * tl.sum(v.to(tl.int32), axis=0)[None, :]
        total = tl.maximum(tl.sum(p, axis=1), 1)
        rcp = (tl.full(total.shape, _NORM_ONE, tl.int32) // total).to(tl.int64)
        out = ((acc.to(tl.int64) * rcp[:, None] + _NORM_HALF) >> _NORM_SHIFT).to(tl.int32)
    else:
        p = _legacy_probs(s, valid, x0, n_exp, 8)  # [0, 127]
        out = tl.dot(p.to(tl.int8), v)
    tl.store(out_ptr + b * sob + h * soh + rm[:, None] * son + rd[None, :], out, mask=m_ok[:, None] & d_ok[None, :])


def attention(q: Tensor, k: Tensor, v: Tensor, score_mult: Tensor | int, score_shift: Tensor | int, score_bits: int,
              probs: int, x0: int, n: int = 0, bias: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The fused ``attention`` op on int8 ``(B, H, N, d)`` q, k, v (any strides with unit stride along d).

    The result is laid out ``(B, N, H, d)`` in memory and returned as the ``(B, H, N, d)`` view (the programs'
    following permute + reshape to ``(B, N, H*d)`` are then free).  ``score_mult``/``score_shift`` may be Python
    ints (the backend's factory reads the scalar constants once at plan time, so running never synchronizes)."""
    if not (q.dtype == k.dtype == v.dtype == torch.int8) or q.dim() != 4 or not (q.shape == k.shape == v.shape):
        raise TypeError("attention needs int8 q, k, v of one (B, H, N, d) shape")
    bsz, h, n_tok, d = q.shape
    sm = int(score_mult) if not isinstance(score_mult, Tensor) else int(score_mult.reshape(-1)[0])
    ss = int(score_shift) if not isinstance(score_shift, Tensor) else int(score_shift.reshape(-1)[0])
    if n_tok > MAX_ATTENTION_TOKENS:  # too long for one row in registers: the unfused kernels, same integers
        scores = matmul(q, k, True)
        if bias is not None:
            scores = (scores.to(torch.int64) + bias.to(torch.int64)).to(torch.int32)
        mt = torch.tensor(sm, dtype=torch.int32, device=q.device)
        st = torch.tensor(ss, dtype=torch.int32, device=q.device)
        s = requantize(scores, mt, st, score_bits)
        if probs == PROBS_REL8:
            p = shiftmax_rel(s, x0, mask)
            return attn_normalize(matmul(p, v), p)
        return matmul(shiftmax(s, x0, n, 8, mask), v)
    out = torch.empty(bsz, n_tok, h, d, dtype=torch.int32, device=q.device)
    o = out.permute(0, 2, 1, 3)
    if o.numel() == 0:
        return o
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    bias_c = None if bias is None else bias.to(device=q.device, dtype=torch.int32).contiguous()
    m8, n_win = None, 1
    if mask is not None:
        if tuple(mask.shape[1:]) != (n_tok, n_tok) or bsz % mask.shape[0]:
            raise ValueError(f"mask {tuple(mask.shape)} does not fit attention {tuple(q.shape)}")
        m8, n_win = _mask_u8(mask, q.device), mask.shape[0]
    bn = _np2(n_tok, 32)
    bd = _np2(d, 32)
    bm = 64 if bn <= 64 else 32 if bn <= 256 else 16
    bm = min(bm, _np2(n_tok, 16))
    m_rel = _REL_NUM // (-x0) if probs == PROBS_REL8 else 0
    grid = (bsz * h, triton.cdiv(n_tok, bm))
    _attention_kernel[grid](
        q, k, v, o, o if bias_c is None else bias_c, o if m8 is None else m8,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        h, n_tok, d, n_win, sm, ss, ops.qmax(score_bits), x0, n, m_rel,
        HAS_BIAS=bias_c is not None, HAS_MASK=m8 is not None, REL=probs == PROBS_REL8, BM=bm, BN=bn, BD=bd,
        num_warps=4 if bn <= 64 else 8)
    return o


#: op -> launcher with the op set's calling convention
KERNELS: dict[str, Any] = {
    "linear": linear,
    "matmul": lambda a, b, transpose_b: matmul(a, b, bool(transpose_b)),
    "requantize": requantize,
    "add_requantize": add_requantize,
    "requantize_table": requantize_table,
    "shiftgelu": shiftgelu,
    "layernorm": layernorm,
    "layernorm32": layernorm32,
    "shiftmax": shiftmax,
    "shiftmax_rel": shiftmax_rel,
    "attn_normalize": attn_normalize,
    "attention": attention,
}

#: launchers of the fused GEMM ops proposed for the op set (same calling convention; not in any kernel table yet)
PROPOSED: dict[str, Any] = {
    "linear_requantize": linear_requantize,
    "linear_add_requantize": linear_add_requantize,
    "linear_requantize_table": linear_requantize_table,
}
