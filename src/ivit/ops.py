"""Reference integer operations: the specification every backend must reproduce bit for bit.

Every function here takes and returns integer tensors (any device) and uses only integer
arithmetic: add, multiply, floor division, arithmetic shift, compare, clamp, sum/max reductions.
Intermediates are computed in int64; each docstring states the input range for which no
intermediate can leave int64 (and, where it matters, int32).  Results are returned in the
narrowest storage dtype of their bit width (``storage_dtype``).

Floating point appears only in the *offline* helpers at the bottom (``dyadic``,
``quantize_symmetric``, ``shift_exp_x0``), which compute integer constants from float scales.

Notation: ``x = S * I`` (scale ``S``, integer ``I``).  ``>>`` is an arithmetic shift (floor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "INT32_MAX",
    "qmax",
    "storage_dtype",
    "round_shift",
    "requantize",
    "add_requantize",
    "int_linear",
    "int_matmul",
    "shift_exp",
    "shiftmax",
    "shiftgelu",
    "shiftmax_rel",
    "attn_normalize",
    "isqrt",
    "ilayernorm",
    "ilayernorm32",
    "int_mean",
    "patchify",
    "embed_tokens",
    "dyadic",
    "quantize_symmetric",
    "shift_exp_x0",
    "choose_shiftmax_n",
    "choose_shiftgelu_n",
    "LN_Z_BITS",
    "DIV_NUM",
    "SUM_BITS",
    "REL_BITS",
    "CTX_FRAC_BITS",
]

INT32_MAX = 2**31 - 1
#: I-LayerNorm normalizes to ``z = y / std * 2**LN_Z_BITS`` (|z| <= 2**LN_Z_BITS).
LN_Z_BITS = 20


def qmax(bits: int) -> int:
    """Largest value of a signed symmetric ``bits``-bit integer: ``2**(bits-1) - 1``.

    All signed quantized tensors use the narrow (symmetric) range ``[-qmax, qmax]``.
    """
    return (1 << (bits - 1)) - 1


def storage_dtype(bits: int) -> torch.dtype:
    """Narrowest torch integer dtype that holds signed ``bits``-bit values."""
    if bits <= 8:
        return torch.int8
    if bits <= 16:
        return torch.int16
    if bits <= 32:
        return torch.int32
    return torch.int64


def _i64(x: Tensor) -> Tensor:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"integer op got a {x.dtype} tensor; integer tensors only")
    return x.to(torch.int64)


def round_shift(x: Tensor, shift: Tensor | int) -> Tensor:
    """Divide by ``2**shift`` rounding half up: ``(x + 2**(shift-1)) >> shift``.

    Args:
        x: int64 tensor with ``x + 2**(shift-1) < 2**63`` (the rounding add must not wrap).
        shift: int or int64 tensor broadcastable to ``x``, each ``1 <= shift <= 62``.

    Rounding: to nearest, ties toward +inf (``floor(x / 2**shift + 1/2)``).
    """
    if isinstance(shift, int):
        return (x + (1 << (shift - 1))) >> shift
    shift = shift.to(torch.int64)  # constants may be stored as int32; shift amounts need int64 here
    one = torch.ones((), dtype=torch.int64, device=x.device)
    return (x + torch.bitwise_left_shift(one, shift - 1)) >> shift


def requantize(x: Tensor, mult: Tensor, shift: Tensor, bits: int) -> Tensor:
    """Dyadic requantization ``I_out = clamp(round_shift(I_in * b, c), -qmax, qmax)``.

    ``b / 2**c ~= S_in / S_out`` (see ``dyadic``); ``mult``/``shift`` are int64 scalars or
    per-channel vectors broadcast along the last dimension.

    Bounds: ``|I_in| < 2**31`` and ``|b| < 2**31`` keep the product below ``2**62`` and the
    rounding add below ``2**63`` (``|I_in| < 2**32`` can wrap for ``c >= 61``).
    Returns a ``storage_dtype(bits)`` tensor.
    """
    m = qmax(bits)
    y = round_shift(_i64(x) * _i64(mult), shift)
    return y.clamp_(-m, m).to(storage_dtype(bits))


def add_requantize(
    a: Tensor, b: Tensor, mult_a: Tensor, shift_a: Tensor, mult_b: Tensor, shift_b: Tensor, bits: int
) -> Tensor:
    """Residual add at the output scale ``S_out``:

    ``I_out = clamp(round_shift(I_a * b_a, c_a) + round_shift(I_b * b_b, c_b), -qmax, qmax)``
    with ``b_a / 2**c_a ~= S_a / S_out`` and ``b_b / 2**c_b ~= S_b / S_out``.
    Each branch is rounded separately (half up), then added, then clamped once.
    Bounds: ``|I_a|, |I_b| < 2**31`` and ``|b_a|, |b_b| < 2**31`` (as in ``requantize``).
    """
    m = qmax(bits)
    y = round_shift(_i64(a) * _i64(mult_a), shift_a) + round_shift(_i64(b) * _i64(mult_b), shift_b)
    return y.clamp_(-m, m).to(storage_dtype(bits))


def _check_int8(x: Tensor, name: str) -> None:
    if x.dtype != torch.int8:
        raise TypeError(f"{name} must be int8, got {x.dtype}")


def int_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """int8 x int8 -> int32 linear layer: ``acc[..., n] = sum_k x[..., k] * W[n, k] + bias[n]``.

    Args:
        x: int8 ``(..., K)``.
        weight: int8 ``(N, K)``, values in ``[-127, 127]``.
        bias: int32 ``(N,)`` at scale ``S_w * S_x`` or None.

    Exact: ``|acc| <= K * 128 * 127 + |bias|``, below ``2**31`` for ``K <= 2**17`` and
    ``|bias| < 2**30``.  Returns int32 ``(..., N)``.
    """
    _check_int8(x, "x")
    _check_int8(weight, "weight")
    acc = torch.matmul(x.to(torch.int64), weight.to(torch.int64).t())
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    return acc.to(torch.int32)


def int_matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """Batched int8 (or uint8) x int8 -> int32 matrix product ``a @ b`` (or ``a @ b^T``).

    Args:
        a: int8 or uint8 ``(..., M, K)`` (uint8: ``shiftmax_rel`` probabilities).
        b: int8 ``(..., K, N)``, or ``(..., N, K)`` when ``transpose_b``.

    Exact for ``K <= 2**16`` (``|acc| <= K * 255 * 128 < 2**31``).  Returns int32 ``(..., M, N)``.
    """
    if a.dtype != torch.uint8:
        _check_int8(a, "a")
    _check_int8(b, "b")
    b64 = b.to(torch.int64)
    if transpose_b:
        b64 = b64.transpose(-1, -2)
    return torch.matmul(a.to(torch.int64), b64).to(torch.int32)


def shift_exp(x: Tensor, x0: int, n: int) -> Tensor:
    """ShiftExp: integer ``exp(S * I)`` for ``I <= 0``; ``exp(0)`` maps to ``|x0| * 2**n``.

    With ``x0 = floor(-1/S)`` (the integer standing for -1, ``x0 <= -1``):

    1. ``I_p = I + (I >> 1) - (I >> 4)``  (``log2 e ~= 1.0111b``, so ``S*I_p ~= S*I*log2 e``)
    2. ``I_p = max(I_p, n * x0)``        (exponents below ``-n`` are clamped)
    3. ``q = floor(I_p / x0)`` (in ``[0, n]``), ``r = I_p - q * x0`` (in ``(x0, 0]``)
    4. ``E = ((r >> 1) - x0) << (n - q)``   (``2**(S*r) ~= S*r/2 + 1``)

    ``E`` approximates ``|x0| * 2**n * exp(S * I)`` at scale ``1 / (|x0| * 2**n)``.
    Bounds: ``0 < E <= |x0| * 2**n``; inputs must be ``<= 0`` and ``|I| < 2**59``.
    Returns int64.
    """
    if x0 > -1:
        raise ValueError(f"x0 must be <= -1, got {x0}")
    xp = x + (x >> 1) - (x >> 4)
    xp = torch.clamp(xp, min=n * x0)
    q = torch.div(xp, x0, rounding_mode="floor")
    r = xp - q * x0
    return torch.bitwise_left_shift((r >> 1) - x0, n - q)


#: Integer division numerator of Shiftmax/ShiftGELU: ``factor = floor(DIV_NUM / sum)``.
DIV_NUM = 2**62 - 1
#: Sums of exponentials are kept below ``2**SUM_BITS`` so that ``factor >= 2**(62 - SUM_BITS)``.
SUM_BITS = 46


def _int_div_scale(e: Tensor, total: Tensor, k_out: int) -> Tensor:
    """``(e * floor((2**62 - 1) / total)) >> (63 - k_out)`` ~= ``2**(k_out-1) * e / total``.

    ``0 <= e <= total`` keeps ``e * factor <= 2**62 - 1``; the result lies in ``[0, 2**(k_out-1) - 1]``.
    """
    factor = torch.div(DIV_NUM, total, rounding_mode="floor")
    return (e * factor) >> (63 - k_out)


def shiftmax(x: Tensor, x0: int, n: int, k_out: int = 8, mask: Tensor | None = None) -> Tensor:
    """Shiftmax: integer softmax over the last dimension.

    ``I_d = I - max(I)`` (max over unmasked positions, ``I_d`` clamped to ``<= 0``);
    ``E = shift_exp(I_d, x0, n)``; masked positions get ``E = 0``;
    ``out = min(round_shift(E * floor((2**62 - 1) / sum(E)), 63 - k_out), 2**(k_out-1) - 1)``.

    Output: unsigned probabilities in ``[0, 2**(k_out-1) - 1]`` at scale ``2**-(k_out-1)``,
    stored as ``storage_dtype(k_out)`` (int8 for ``k_out = 8``).  Masked positions are exactly 0;
    a fully masked row is all zeros.  Rounding: floor for the division, half up for the final
    shift (a floor there would bias every row sum down by up to ``N / 2**(k_out-1)``: 197 tokens
    of ~1/197 each would sum to ~1/3 at 8 bits), then a clamp so a certain position fits int8.

    Bounds: ``sum(E) <= N * |x0| * 2**n <= 2**46`` (``choose_shiftmax_n``), so the factor keeps at
    least 16 significant bits and ``E * factor <= 2**62 - 1``.  Input ``|I| < 2**32``.
    """
    xi = _i64(x)
    if mask is not None:
        xi = xi.masked_fill(mask, -(2**40))
    xd = (xi - xi.amax(dim=-1, keepdim=True)).clamp_(max=0)
    e = shift_exp(xd, x0, n)
    if mask is not None:
        e = e.masked_fill(mask, 0)
    s = e.sum(dim=-1, keepdim=True).clamp_(min=1)
    factor = torch.div(DIV_NUM, s, rounding_mode="floor")
    out = round_shift(e * factor, 63 - k_out).clamp_(max=qmax(k_out))
    return out.to(storage_dtype(k_out))


def shiftgelu(x: Tensor, x0: int, n: int, k_out: int = 16) -> Tensor:
    """ShiftGELU: ``GELU(x) ~= x * sigmoid(1.702 x)`` in integers, elementwise.

    ``x0 = floor(-1 / (1.702 * S))`` folds the 1.702 into the scale offline.  The sigmoid uses
    an elementwise stabilizer ``m = max(I, 0)``:
    ``sigmoid(t) = e^(t - m) / (e^(t - m) + e^(-m))``, both exponentials from ``shift_exp``, so no
    exponent is ever positive (the paper uses the row maximum; per element keeps the op
    elementwise and exact for a lookup-table kernel).

    ``E1 = shift_exp(I - m)``, ``E2 = shift_exp(-m)``,
    ``sig = (E1 * floor((2**62 - 1) / (E1 + E2))) >> (63 - k_out)``  (scale ``2**-(k_out-1)``),
    ``out = I * sig``  at scale ``S * 2**-(k_out-1)``.

    Bounds: ``E1 + E2 <= 2 * |x0| * 2**n <= 2**46`` (``choose_shiftgelu_n``);
    ``|I| <= 2**15`` and ``k_out <= 16`` keep ``|out| < 2**31``.  Returns int32.
    """
    xi = _i64(x)
    m = xi.clamp(min=0)
    e1 = shift_exp(xi - m, x0, n)
    e2 = shift_exp(-m, x0, n)
    sig = _int_div_scale(e1, e1 + e2, k_out)
    return (xi * sig).to(torch.int32)


#: Shiftmax-rel output: probabilities relative to the row maximum, unsigned 8-bit ``[0, 255]``.
REL_BITS = 8
#: ``attn_normalize`` output: the weighted mean of ``v`` with this many fractional bits.
CTX_FRAC_BITS = 16
_REL_MULT_SHIFT = 22  # p = round_shift(e' * M, 22 + q) with M = floor(255 * 2**22 / |x0|)
_REL_QMAX = 9  # 255 * 2**-9 < 1/2: exponents below -9 (in units of log2) always give p = 0
_NORM_NUM_BITS = 30  # R = floor(2**30 / P)


def shiftmax_rel(x: Tensor, x0: int, mask: Tensor | None = None) -> Tensor:
    """Shiftmax-rel: ShiftExp probabilities relative to the row maximum, unsigned 8-bit.

    For each row of scores ``I`` (scale ``S``, ``x0 = floor(-1/S) <= -1``) over the last dimension:

    1. ``d = I - max(I)`` (max over unmasked positions; ``d <= 0``), in int32;
    2. ``I_p = max(d + (d >> 1) - (d >> 4), 9 * x0)``       (``log2 e ~= 1.0111b``);
    3. ``q = floor(I_p / x0)`` (in ``[0, 9]``), ``r = I_p - q * x0`` (in ``(x0, 0]``);
    4. ``e' = (r >> 1) - x0``                               (``2**(S*r) ~= S*r/2 + 1``, times ``|x0|``);
    5. ``p = min(round_shift(e' * M, 22 + q), 255)`` with ``M = floor(255 * 2**22 / |x0|)``.

    So ``p ~= 255 * exp(S * d)``: the row maximum gets 255 for ``|x0| < 2**21`` (ivit's models keep
    ``S >= 2**-21``; beyond, the truncated ``M`` costs precision, e.g. 248 at ``2**25``) and every other
    position its probability *relative to the maximum*, with 8 bits wherever it matters (the old
    Shiftmax's absolute ``[0, 127]`` scale leaves most of a flat 197-token row at 0 or 1).  Masked
    positions get 0.  The absolute scale cancels in ``attn_normalize``, which divides by ``sum(p)``.

    Bounds (every intermediate fits int32): ``|I| < 2**24`` gives ``|d| < 2**25`` and
    ``|I_p| < 2**26``; ``|x0| <= 2**27`` keeps ``9 * x0`` in int32; ``e' * M <= 255 * 2**22 < 2**30``;
    shifts are at most 31.  Rounding: floor for ``>>`` and the division, half up for ``round_shift``.

    Args:
        x: int8/int16/int32 scores ``(..., N)``.
        mask: bool, broadcastable to ``x``; True = masked.
    Returns uint8 ``(..., N)``.
    """
    if x0 > -1:
        raise ValueError(f"x0 must be <= -1, got {x0}")
    xi = _i64(x)
    if mask is not None:
        xi = xi.masked_fill(mask, -(2**31) + 1)
    d = (xi - xi.amax(dim=-1, keepdim=True)).clamp_(max=0)
    xp = torch.clamp(d + (d >> 1) - (d >> 4), min=_REL_QMAX * x0)
    q = torch.div(xp, x0, rounding_mode="floor")
    r = xp - q * x0
    e = (r >> 1) - x0
    m = (255 << _REL_MULT_SHIFT) // (-x0)
    p = round_shift(e * m, q + _REL_MULT_SHIFT).clamp_(max=255)
    if mask is not None:
        p = p.masked_fill(mask, 0)
    return p.to(torch.uint8)


def attn_normalize(acc: Tensor, p: Tensor) -> Tensor:
    """Normalize ``acc = p @ v`` by the row sums of ``p``: ``round_shift(acc * floor(2**30 / P), 14)``.

    ``P = max(sum_j p[..., i, j], 1)`` per row ``i`` (int32: at most ``255 * N``); the result is the
    weighted mean ``acc / P`` of ``v`` with ``CTX_FRAC_BITS = 16`` fractional bits, i.e. int32 at scale
    ``S_v * 2**-16``.  ``R = floor(2**30 / P)`` keeps ``>= 13`` significant bits for ``N <= 577``
    (relative error ``<= 1/R``, far below the int8 output it feeds).

    Bounds: ``acc`` comes from ``matmul(p, v)`` with int8 ``v`` (validated), so
    ``|acc| <= 128 * P`` and ``|acc * R| <= 2**37``; the result is within ``+-2**23``.

    Args:
        acc: int32 ``(..., N, d)``.
        p: uint8 ``(..., N, N)`` (``shiftmax_rel`` output).
    Returns int32 ``(..., N, d)``.
    """
    total = _i64(p).sum(dim=-1, keepdim=True).clamp_(min=1)  # (..., N, 1)
    r = torch.div(torch.full_like(total, 1 << _NORM_NUM_BITS), total, rounding_mode="floor")
    return round_shift(_i64(acc) * r, _NORM_NUM_BITS - CTX_FRAC_BITS).to(torch.int32)


def _bit_length(v: Tensor) -> Tensor:
    """Number of bits of each non-negative int64 (0 for 0), by binary search on shifts."""
    bl = torch.zeros_like(v)
    rest = v.clone()
    for s in (32, 16, 8, 4, 2, 1):
        big = rest >= (1 << s)
        rest = torch.where(big, rest >> s, rest)
        bl = bl + big.to(torch.int64) * s
    return bl + (rest > 0).to(torch.int64)


def isqrt(v: Tensor, max_iter: int = 10) -> Tensor:
    """Integer square root ``floor(sqrt(v))`` for int64 ``0 <= v < 2**62``, exactly.

    Start ``k0 = 2**ceil(bitlen(v) / 2) >= sqrt(v)``; Newton from above
    ``k <- min(k, (k + v // k) >> 1)``; stop once no element changes (at most ``max_iter``
    steps; 7 suffice on ``[0, 2**62)`` since ``k0 < 2 sqrt(v) + 2``).  ``isqrt(0) = 0``.
    """
    v = _i64(v)
    host = v.device.type == "cpu"  # elsewhere (CUDA): no host synchronization, a fixed number of steps
    if host and bool((v < 0).any()):
        raise ValueError("isqrt of a negative value")
    if not host:
        torch._assert_async((v >= 0).all(), "isqrt of a negative value")
    k = torch.bitwise_left_shift(torch.ones_like(v), (_bit_length(v) + 1) >> 1)
    for _ in range(max_iter):
        # k only reaches 0 for v = 0; clamping the divisor keeps 0 // 1 = 0 (no division by zero).
        nk = torch.minimum(k, (k + torch.div(v, k.clamp(min=1), rounding_mode="floor")) >> 1)
        if host and torch.equal(nk, k):  # Newton from above stays at floor(sqrt(v)) once there
            break
        k = nk
    return torch.where(v == 0, torch.zeros_like(k), k)


def ilayernorm(x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor, bits: int = 8) -> Tensor:
    """I-LayerNorm over the last dimension (``C`` channels), gamma/beta folded.

    1. ``mean = floor((2 * sum(I) + C) / (2 * C))``   (round half up), ``y = I - mean``
    2. ``var = sum(y**2)`` (int64), ``std = isqrt(var)``
    3. ``z = (y * floor((2**31 - 1) / max(std, 1))) >> (31 - LN_Z_BITS)``;
       ``z ~= y / std * 2**20``, the normalized value is ``z * sqrt(C) / 2**20``.
    4. ``out[c] = clamp(round_shift(z * b[c], c_c) + offset[c], -qmax, qmax)`` with
       ``b[c] / 2**c_c ~= gamma[c] * sqrt(C) / 2**20 / S_out`` and
       ``offset[c] = round(beta[c] / S_out)``.

    Constant tokens (``std = 0``) give ``y = 0`` and so ``out = offset`` (= beta).
    Bounds: ``|I| < 2**24`` and ``C < 2**12`` keep ``var < 2**62``; ``|y| <= std`` gives
    ``|z| <= 2**20`` and ``|z * b| < 2**51``.  Returns ``storage_dtype(bits)``.
    """
    xi = _i64(x)
    c = xi.shape[-1]
    s = xi.sum(dim=-1, keepdim=True)
    mean = torch.div(2 * s + c, 2 * c, rounding_mode="floor")
    y = xi - mean
    var = (y * y).sum(dim=-1, keepdim=True)
    std = isqrt(var)
    factor = torch.div(INT32_MAX, std.clamp(min=1), rounding_mode="floor")
    z = (y * factor) >> (31 - LN_Z_BITS)
    m = qmax(bits)
    out = round_shift(z * _i64(mult), shift) + _i64(offset)
    return out.clamp_(-m, m).to(storage_dtype(bits))



def _ln_bits(c: int) -> int:
    """``B_C = floor((31 - ceil(log2 C)) / 2)``: rows of ``C`` values below ``2**B_C`` square-sum below 2**31."""
    return (31 - max(0, (c - 1).bit_length())) // 2


def ilayernorm32(x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor, bits: int = 8) -> Tensor:
    """I-LayerNorm with 32-bit intermediates (the default; ``ilayernorm`` is the 64-bit original).

    Per row of ``C`` channels (``C <= 8192``), gamma/beta folded as in ``ilayernorm``:

    1. ``mean = floor((sum(I) + floor(C / 2)) / C)`` (= ``ilayernorm``'s round-half-up mean), ``y = I - mean``;
    2. ``k = max(0, bitlen(max|y|) - B_C)`` with ``B_C = floor((31 - ceil(log2 C)) / 2)``;
       ``y = y' * 2**k + r`` with ``y' = y >> k`` and ``0 <= r < 2**k``;
    3. ``V = sum(y'**2) + ((2 * sum(y' * r) + (sum(r**2) >> k)) >> k)``, which is exactly
       ``floor(sum(y**2) / 4**k) < 2**31``; ``std' = isqrt(V) = floor(sqrt(sum(y**2)) / 2**k)`` (exact);
    4. ``F = floor((2**31 - 1) / max(std', 1)) >> k``;
    5. ``z = round_shift(y * F, 11)``  (``z ~= y / std * 2**20``, ``|z| <= 2**21``);
    6. ``out[c] = clamp(round_shift(z * b[c], c_c) + offset[c], -qmax, qmax)``.

    The variance is the exact one, scaled by ``4**-k``: only ``std'`` loses the ``k`` low bits of the
    standard deviation (it keeps at least ``B_C >= 9`` bits), and ``z`` uses the full-precision ``y``.
    Every intermediate fits int32 (``|y| < 2**16``, so ``|y' * r| < 2**16`` and ``|sum(y' * r)| < 2**29``;
    ``k <= 8``, so ``sum(r**2) < 2**29``) except the products ``y * F`` and ``z * b``, which are 32 x 32 ->
    64-bit multiplies immediately shifted back (as TOSA's ``MUL``/``RESCALE`` and a Cortex-M ``SMULL`` do).
    Constant tokens give ``out = offset``.  Input ``|I| < 2**15`` (int8/int16).
    """
    xi = _i64(x)
    c = xi.shape[-1]
    s = xi.sum(dim=-1, keepdim=True)
    mean = torch.div(s + (c >> 1), c, rounding_mode="floor")
    y = xi - mean
    k = (_bit_length(y.abs().amax(dim=-1, keepdim=True)) - _ln_bits(c)).clamp_(min=0)
    yp = y >> k
    r = y - (yp << k)
    a = (yp * r).sum(dim=-1, keepdim=True)
    q = (r * r).sum(dim=-1, keepdim=True)
    v = (yp * yp).sum(dim=-1, keepdim=True) + ((2 * a + (q >> k)) >> k)
    std = isqrt(v)
    f = torch.div(INT32_MAX, std.clamp(min=1), rounding_mode="floor") >> k
    z = round_shift(y * f, 31 - LN_Z_BITS)
    m = qmax(bits)
    out = round_shift(z * _i64(mult), shift) + _i64(offset)
    return out.clamp_(-m, m).to(storage_dtype(bits))


def int_mean(x: Tensor, dim: int) -> Tensor:
    """Mean over ``dim`` rounded half up: ``floor((2 * sum + n) / (2 * n))``.  Keeps the dtype."""
    xi = _i64(x)
    n = xi.shape[dim]
    return torch.div(2 * xi.sum(dim=dim) + n, 2 * n, rounding_mode="floor").to(x.dtype)


def patchify(pixels: Tensor, patch: int) -> Tensor:
    """uint8 pixels ``(B, C, H, W)`` -> int8 patches ``(B, L, C*patch*patch)``, values ``p - 128``.

    Patch order is row-major over the ``(H/patch, W/patch)`` grid; within a patch the order is
    ``(channel, row, col)``, matching ``conv.weight.reshape(out, -1)``.  The ``-128`` offset
    makes pixels fit int8; the patch-embedding bias absorbs it (``+128 * sum(W)``).
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype}")
    b, c, h, w = pixels.shape
    x = (pixels.to(torch.int16) - 128).to(torch.int8)
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)  # (B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def embed_tokens(acc: Tensor, mult: Tensor, shift: Tensor, prefix: Tensor | None, pos: Tensor,
                 bits: int = 16) -> Tensor:
    """Patch tokens + class token + position embedding on the residual scale ``S_r``.

    ``tok = round_shift(acc * b, c)`` per channel (``b/2**c ~= S_acc / S_r``); the class token
    row ``prefix`` (int, ``(P, C)``, already ``round((cls + pos_cls) / S_r)``) is prepended;
    ``pos`` (int, ``(L, C)`` = ``round(pos_patch / S_r)``) is added to the patch rows; then one
    clamp to ``[-qmax, qmax]``.

    Args:
        acc: int32 ``(B, L, C)`` patch-embedding accumulators.
    Returns ``storage_dtype(bits)`` ``(B, P + L, C)``.
    """
    m = qmax(bits)
    tok = round_shift(_i64(acc) * _i64(mult), shift) + _i64(pos)
    if prefix is not None:
        pre = _i64(prefix).unsqueeze(0).expand(tok.shape[0], -1, -1)
        tok = torch.cat([pre, tok], dim=1)
    return tok.clamp_(-m, m).to(storage_dtype(bits))


# ---------------------------------------------------------------------------------------------
# Offline helpers: float scales -> integer constants.  Never executed by a frozen program.
# ---------------------------------------------------------------------------------------------

MANTISSA_BITS = 31


def dyadic(ratio: Tensor | float) -> tuple[Tensor, Tensor]:
    """Integer multiplier ``b`` and shift ``c`` with ``b / 2**c ~= ratio`` (float64 offline).

    ``ratio = m * 2**e`` (frexp, ``0.5 <= |m| < 1``); ``b = round(m * 2**31)`` (|b| < 2**31,
    ~31 significant bits), ``c = 31 - e``.  If ``c > 62`` the multiplier is shifted down
    (tiny ratios); ``c < 1`` (ratios >= 2**30) is rejected.  ``ratio = 0`` gives ``b = 0``.
    Returns int64 tensors shaped like ``ratio``.
    """
    r = torch.as_tensor(ratio, dtype=torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("dyadic: non-finite scale ratio")
    m, e = torch.frexp(r)
    b = torch.round(m * float(1 << MANTISSA_BITS)).to(torch.int64)
    c = (MANTISSA_BITS - e).to(torch.int64)
    full = b.abs() == (1 << MANTISSA_BITS)  # m rounded up to 1.0
    b = torch.where(full, b >> 1, b)
    c = torch.where(full, c - 1, c)
    over = (c - 62).clamp(min=0)
    # Shifts past 62 leave round_shift's range (1 << 63 wraps); |b| < 2**31 rounds to 0 from 32 on.
    b = torch.where(over > 0, round_shift(b, over.clamp(min=1, max=62)), b)
    c = c - over
    zero = b == 0
    c = torch.where(zero, torch.ones_like(c), c)
    if bool((c < 1).any()):
        raise ValueError("dyadic: scale ratio too large (>= 2**30)")
    return b, c


def quantize_symmetric(x: Tensor, scale: Tensor | float, bits: int) -> Tensor:
    """``clamp(round(x / S), -qmax, qmax)`` (round half to even), offline / fake-quant use."""
    m = qmax(bits)
    q = torch.round(x.to(torch.float64) / torch.as_tensor(scale, dtype=torch.float64))
    return q.clamp_(-m, m).to(storage_dtype(bits))


def shift_exp_x0(scale: float) -> int:
    """``x0 = floor(-1 / S)``, the integer standing for -1 at scale ``S`` (at most -1)."""
    return min(-1, math.floor(-1.0 / float(scale)))


def choose_shiftmax_n(x0: int, length: int, n_max: int = 15) -> int:
    """Largest ``n <= n_max`` with ``length * |x0| * 2**n <= 2**SUM_BITS`` (Shiftmax's sum bound)."""
    n = n_max
    while n > 0 and length * (-x0) * (1 << n) > 2**SUM_BITS:
        n -= 1
    if length * (-x0) * (1 << n) > 2**SUM_BITS:
        raise ValueError(f"Shiftmax cannot bound the sum for length={length}, x0={x0}")
    return n


def choose_shiftgelu_n(x0: int, n_max: int = 23) -> int:
    """Largest ``n <= n_max`` with ``2 * |x0| * 2**n <= 2**SUM_BITS`` (ShiftGELU's sum bound)."""
    return choose_shiftmax_n(x0, 2, n_max)
