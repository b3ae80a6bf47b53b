"""Tests for ``ivit.ops``: the integer reference ops that every backend must match bit for bit.

Three kinds of checks:

* Exactness: each op equals a pure-Python big-int evaluation of the formula in its docstring.
  Python ints never overflow, so equality also proves that no int64/int32 intermediate wrapped.
* Error bounds: each op against the float function it approximates, on realistic inputs.  Every
  bound was measured first; the measured value is written next to the asserted bound.
* Extremes, dtypes, devices and batch independence.

Format-2 ops (``shiftmax_rel``, ``attn_normalize``, ``ilayernorm32``) get the same three kinds of checks,
plus the documented bounds of their intermediates (asserted inside the big-int references) and the
error of ``softmax(scores) @ V`` against the float function (the reason ``shiftmax_rel`` exists).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ivit import ops
from ivit.ops import INT32_MAX, LN_Z_BITS

# ---------------------------------------------------------------------------------------------
# Pure-Python big-int references, written from the docstrings (not from the torch code).
# ---------------------------------------------------------------------------------------------

#: Shiftmax/ShiftGELU spec constants, written out (not imported) so the references stay independent.
DIV_NUM = 2**62 - 1  # factor = floor(DIV_NUM / sum(E)); Shiftmax rounds E * factor / 2**(63 - k_out)
#                     half up and clamps, ShiftGELU floors it
SUM_MAX = 2**46  # choose_shiftmax_n / choose_shiftgelu_n keep sum(E) <= SUM_MAX


def ref_round_half_up(v: int, s: int) -> int:
    """``floor(v / 2**s + 1/2)`` with exact rationals."""
    return math.floor(Fraction(v, 1 << s) + Fraction(1, 2))


def ref_clamp(v: int, bits: int) -> int:
    m = (1 << (bits - 1)) - 1
    return max(-m, min(m, v))


def ref_requantize(v: int, b: int, c: int, bits: int) -> int:
    return ref_clamp(ref_round_half_up(v * b, c), bits)


def ref_shift_exp(i: int, x0: int, n: int) -> int:
    """ShiftExp, steps 1-4 of ``ops.shift_exp``; asserts the documented ranges of ``q`` and ``r``."""
    ip = i + i // 2 - i // 16
    ip = max(ip, n * x0)
    q = ip // x0
    r = ip - q * x0
    assert 0 <= q <= n and x0 < r <= 0
    return (r // 2 - x0) * 2 ** (n - q)


def ref_shiftmax(row: list[int], x0: int, n: int, k_out: int, mask: list[bool] | None = None
                 ) -> tuple[list[int], list[int], int]:
    """Shiftmax of one row; returns ``(out, E, max(E * factor))``.

    ``out = min(round_half_up(E * factor / 2**(63 - k_out)), 2**(k_out-1) - 1)``.  The max runs over
    unmasked positions only; masked positions get ``E = 0`` whatever their score.
    """
    keep = [True] * len(row) if mask is None else [not mk for mk in mask]
    mx = max((v for v, k in zip(row, keep, strict=True) if k), default=0)
    e = [ref_shift_exp(min(v - mx, 0), x0, n) if k else 0 for v, k in zip(row, keep, strict=True)]
    factor = DIV_NUM // max(sum(e), 1)
    prods = [ei * factor for ei in e]
    top = 2 ** (k_out - 1) - 1
    return [min(ref_round_half_up(p, 63 - k_out), top) for p in prods], e, max(prods)


def check_shiftmax_intermediates(e: list[int], max_prod: int, k_out: int) -> None:
    """The docstring's bounds: ``sum(E) <= 2**46``, ``E * factor <= 2**62 - 1``, rounding add ``< 2**63``."""
    assert sum(e) <= SUM_MAX and max_prod <= DIV_NUM
    assert max_prod + 2 ** (62 - k_out) < 2**63


def check_shiftmax_rounding(out: list[int], e: list[int], k_out: int) -> None:
    """Each output is within half an LSB of ``2**(k_out-1) * E / sum(E)``, plus the division's error.

    With ``S = sum(E)``, ``f = floor((2**62 - 1) / S) > (2**62 - 1 - S) / S``, so
    ``t = E * f / 2**(63-k)`` lies in ``(P * (1 - (S + 1) / 2**62), P)`` for ``P = 2**(k-1) * E / S``, and
    ``out = floor(t + 1/2)`` in ``(t - 1/2, t + 1/2]``: ``out - P`` in ``(-1/2 - P * (S + 1) / 2**62, 1/2)``.
    A clamped output (``t >= 2**(k-1) - 1/2``, so ``P > 2**(k-1) - 1/2``; ``P <= 2**(k-1)``) has
    ``out - P`` in ``[-1, -1/2)``.
    ShiftExp's own error (the E) does not enter: this isolates the division and the final rounding.
    """
    s = sum(e)
    if s == 0:  # fully masked row
        assert out == [0] * len(out)
        return
    top = 2 ** (k_out - 1) - 1
    half = Fraction(1, 2)
    for o, ei in zip(out, e, strict=True):
        p = Fraction(2 ** (k_out - 1) * ei, s)
        dev = o - p
        if o == top and p > top + half:  # clamped, or (P within the division error of it) not
            assert -1 <= dev < -half, (o, ei, s)
        else:
            assert -half - p * Fraction(s + 1, 2**62) < dev < half, (o, ei, s)


def ref_shiftgelu(i: int, x0: int, n: int, k_out: int) -> tuple[int, int]:
    """ShiftGELU of one value; returns ``(out, E1 + E2)``."""
    m = max(i, 0)
    e1 = ref_shift_exp(i - m, x0, n)
    e2 = ref_shift_exp(-m, x0, n)
    sig = (e1 * (DIV_NUM // (e1 + e2))) // 2 ** (63 - k_out)
    return i * sig, e1 + e2


def ref_ilayernorm(row: list[int], mult: list[int], shift: list[int], offset: list[int], bits: int
                   ) -> tuple[list[int], dict[str, int]]:
    """I-LayerNorm of one token; returns the output and the intermediates' extremes."""
    c = len(row)
    mean = (2 * sum(row) + c) // (2 * c)
    y = [v - mean for v in row]
    var = sum(v * v for v in y)
    std = math.isqrt(var)
    factor = INT32_MAX // max(std, 1)
    z = [(v * factor) // 2 ** (31 - LN_Z_BITS) for v in y]
    zb = [zi * b for zi, b in zip(z, mult, strict=True)]
    out = [ref_clamp(ref_round_half_up(p, s) + o, bits) for p, s, o in zip(zb, shift, offset, strict=True)]
    stats = {"var": var, "max_y": max(abs(v) for v in y), "max_yf": max(abs(v * factor) for v in y),
             "max_z": max(abs(v) for v in z), "max_zb": max(abs(v) for v in zb), "std": std}
    return out, stats


#: Shiftmax-rel / attn_normalize spec constants, written out (not imported).
REL_M_NUM = 255 << 22  # M = floor(REL_M_NUM / |x0|)
REL_QMAX = 9  # I_p >= 9 * x0: exponents below -9 (log2 units) give p = 0
NORM_NUM = 2**30  # R = floor(NORM_NUM / P)
CTX_FRAC = 16  # attn_normalize output: 16 fractional bits (shift 30 - 16 = 14)


def ref_shiftmax_rel(row: list[int], x0: int, mask: list[bool] | None = None) -> list[int]:
    """Shiftmax-rel of one row, steps 1-5 of ``ops.shiftmax_rel``; asserts every documented int32 bound."""
    keep = [True] * len(row) if mask is None else [not mk for mk in mask]
    if not any(keep):
        return [0] * len(row)
    assert all(abs(v) < 2**24 for v, k in zip(row, keep, strict=True) if k)  # the documented input range
    assert -(2**27) <= x0 <= -1
    mx = max(v for v, k in zip(row, keep, strict=True) if k)
    m = REL_M_NUM // -x0
    out = []
    for v, k in zip(row, keep, strict=True):
        if not k:
            out.append(0)
            continue
        d = min(v - mx, 0)
        assert -(2**25) < d <= 0
        ip = max(d + (d >> 1) - (d >> 4), REL_QMAX * x0)
        assert -(2**31) <= REL_QMAX * x0 and -(2**26) < ip <= 0
        q = ip // x0
        r = ip - q * x0
        assert 0 <= q <= REL_QMAX and x0 < r <= 0
        e = (r >> 1) - x0
        assert 0 < e <= -x0
        assert e * m <= REL_M_NUM < 2**30 and 22 + q <= 31  # e' * M in int32; shifts at most 31
        out.append(min(ref_round_half_up(e * m, 22 + q), 255))
    return out


def ref_attn_normalize(acc: list[int], p: list[int]) -> list[int]:
    """``round_half_up(acc * floor(2**30 / max(sum(p), 1)), 14)``; asserts the documented bounds when ``acc``
    is ``p @ v`` of int8 ``v`` (``|acc| <= 128 * P``)."""
    total = max(sum(p), 1)
    assert total <= 255 * len(p)
    r = NORM_NUM // total
    out = []
    for a in acc:
        if abs(a) <= 128 * total:
            assert abs(a * r) <= 2**37
        v = ref_round_half_up(a * r, 30 - CTX_FRAC)
        if abs(a) <= 128 * total:
            assert abs(v) <= 2**23
        out.append(v)
    return out


def ref_ilayernorm32(row: list[int], mult: list[int], shift: list[int], offset: list[int], bits: int
                     ) -> tuple[list[int], dict[str, int]]:
    """I-LayerNorm with 32-bit intermediates, steps 1-6 of ``ops.ilayernorm32``; asserts that every intermediate
    but the two documented 64-bit products fits int32, and returns the output and the intermediates' extremes."""
    c = len(row)
    assert 1 <= c <= 8192 and all(abs(v) < 2**15 for v in row)
    s = sum(row)
    mean = (s + c // 2) // c
    assert mean == (2 * s + c) // (2 * c)  # the docstring: the same round-half-up mean as ilayernorm
    y = [v - mean for v in row]
    b_c = (31 - (c - 1).bit_length()) // 2  # (c - 1).bit_length() = ceil(log2 C)
    k = max(0, max(abs(v) for v in y).bit_length() - b_c)
    yp = [v >> k for v in y]
    r = [v - (w << k) for v, w in zip(y, yp, strict=True)]
    a = sum(w * ri for w, ri in zip(yp, r, strict=True))
    q = sum(ri * ri for ri in r)
    var = sum(v * v for v in yp) + ((2 * a + (q >> k)) >> k)
    assert var == sum(v * v for v in y) // 4**k  # the docstring: exactly floor(sum(y**2) / 4**k)
    assert abs(a) < 2**29 and q < 2**29 and k <= 8
    std = math.isqrt(var)
    f = (INT32_MAX // max(std, 1)) >> k
    z = [ref_round_half_up(v * f, 31 - LN_Z_BITS) for v in y]
    zb = [ref_round_half_up(zi * b, sh) for zi, b, sh in zip(z, mult, shift, strict=True)]
    out = [ref_clamp(v + o, bits) for v, o in zip(zb, offset, strict=True)]
    stats = {"sum": abs(s), "max_y": max(abs(v) for v in y), "var": var, "std": std, "f": f,
             "max_z": max(abs(v) for v in z), "max_zb": max(abs(v) for v in zb), "b_c": b_c, "k": k,
             "max_yp": max(abs(v) for v in yp)}
    assert b_c >= 9 and max(abs(v) for v in yp) <= 2**b_c
    for key in ("sum", "max_y", "var", "std", "f", "max_z"):  # 32-bit intermediates
        assert stats[key] < 2**31, (key, stats[key])
    assert stats["max_z"] <= 2 ** (LN_Z_BITS + 1)  # |z| <= 2**21
    return out, stats


def ref_int_mean(vals: list[int]) -> int:
    return math.floor(Fraction(sum(vals), len(vals)) + Fraction(1, 2))


def rows(t: Tensor) -> list[list[int]]:
    return t.reshape(-1, t.shape[-1]).tolist()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randint(lo: int, hi: int, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.int64) -> Tensor:
    """Uniform integers in ``[lo, hi]``."""
    return torch.randint(lo, hi + 1, shape, generator=gen(seed), dtype=torch.int64).to(dtype)


def ln_constants(gamma: Tensor, beta: Tensor, s_out: float) -> tuple[Tensor, Tensor, Tensor]:
    """I-LayerNorm's folded constants as the ``ilayernorm`` docstring defines them."""
    c = gamma.shape[-1]
    mult, shift = ops.dyadic(gamma.double() * math.sqrt(c) / 2**LN_Z_BITS / s_out)
    offset = torch.round(beta.double() / s_out).to(torch.int64)
    return mult, shift, offset


# ---------------------------------------------------------------------------------------------
# round_shift, requantize, add_requantize
# ---------------------------------------------------------------------------------------------


def _random_int64(count: int, max_bits: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        bits = rnd.randint(0, max_bits)
        out.append(rnd.choice((-1, 1)) * rnd.randrange(1 << bits))
    return out


def test_round_shift_matches_bigint_random() -> None:
    xs = _random_int64(3000, 61, seed=1)
    rnd = random.Random(2)
    shifts = [rnd.randint(1, 62) for _ in xs]
    got = ops.round_shift(torch.tensor(xs), torch.tensor(shifts)).tolist()
    assert got == [ref_round_half_up(x, s) for x, s in zip(xs, shifts, strict=True)]
    for s in (1, 2, 7, 31, 45, 62):  # python-int shift path
        got = ops.round_shift(torch.tensor(xs), s).tolist()
        assert got == [ref_round_half_up(x, s) for x in xs]


def test_round_shift_ties_go_toward_plus_infinity() -> None:
    x = torch.tensor([1, 3, 5, -1, -3, -5, 2, -2, 0, 6, -6, 7, -7])
    assert ops.round_shift(x, 1).tolist() == [1, 2, 3, 0, -1, -2, 1, -1, 0, 3, -3, 4, -3]
    # +-(k + 1/2) * 2**s for several s, big magnitudes included.
    for s in (2, 10, 40, 62):
        half = 1 << (s - 1)
        for k in (0, 1, 2, 1000, (1 << (62 - s)) - 1):
            v = k * (1 << s) + half
            if v + half >= 1 << 63:
                continue
            assert ops.round_shift(torch.tensor([v, -v]), s).tolist() == [k + 1, -k]
    # Just off the tie: ordinary round-to-nearest.
    assert ops.round_shift(torch.tensor([5, 4, -5, -4, -6]), 3).tolist() == [1, 1, -1, 0, -1]


def test_round_shift_broadcasts_tensor_shift() -> None:
    x = torch.tensor([[1000, -1000], [12345, -12345]])
    shift = torch.tensor([3, 5])
    want = [[ref_round_half_up(v, s) for v, s in zip(r, (3, 5), strict=True)] for r in x.tolist()]
    assert ops.round_shift(x, shift).tolist() == want


@pytest.mark.parametrize("bits", [8, 16, 32])
@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize_matches_bigint(bits: int, per_channel: bool) -> None:
    n_ch = 24
    x = randint(-(2**31) + 1, 2**31 - 1, (40, n_ch), seed=3)
    x[:5] = randint(-(2**15), 2**15, (5, n_ch), seed=4)  # realistic small accumulators too
    if per_channel:
        mult = randint(-(2**31) + 1, 2**31 - 1, (n_ch,), seed=5)
        shift = randint(1, 62, (n_ch,), seed=6)
    else:
        mult, shift = torch.tensor(1_518_500_250), torch.tensor(44)
    out = ops.requantize(x, mult, shift, bits)
    assert out.dtype == ops.storage_dtype(bits)
    mb = mult.expand(n_ch).tolist()
    sb = shift.expand(n_ch).tolist()
    want = [[ref_requantize(v, mb[j], sb[j], bits) for j, v in enumerate(r)] for r in x.tolist()]
    assert out.tolist() == want


def test_requantize_extremes_do_not_overflow() -> None:
    big = 2**31 - 1
    x = torch.tensor([big, -big, big, -big, 1, -1, 0])
    for b, c in itertools.product((big, -big, 1, 2**30), (1, 31, 61, 62)):
        got = ops.requantize(x, torch.tensor(b), torch.tensor(c), 32).tolist()
        assert got == [ref_requantize(v, b, c, 32) for v in x.tolist()], (b, c)


def test_requantize_with_dyadic_constants_tracks_float_rescale() -> None:
    x = randint(-(2**20), 2**20, (4000,), seed=7)
    for ratio in (0.0123, 3.7e-5, 0.9, 1.5):
        b, c = ops.dyadic(ratio)
        out = ops.requantize(x, b, c, 32).double()
        # b/2**c is within 2**-31 of ratio, so |err| <= 0.5 + |x| * ratio * 2**-31.
        assert float((out - x.double() * ratio).abs().max()) <= 0.5 + 2**20 * ratio * 2**-30


@pytest.mark.parametrize("per_channel", [False, True])
def test_add_requantize_matches_bigint(per_channel: bool) -> None:
    n_ch = 16
    a = randint(-32767, 32767, (30, n_ch), seed=8, dtype=torch.int16)
    b = randint(-(2**31) + 1, 2**31 - 1, (30, n_ch), seed=9, dtype=torch.int32)
    b[:3] = randint(-127, 127, (3, n_ch), seed=10, dtype=torch.int32)
    if per_channel:
        ma, sa = randint(-(2**31) + 1, 2**31 - 1, (n_ch,), seed=11), randint(1, 62, (n_ch,), seed=12)
        mb, sb = randint(-(2**31) + 1, 2**31 - 1, (n_ch,), seed=13), randint(20, 62, (n_ch,), seed=14)
    else:
        ma, sa = torch.tensor(1 << 30), torch.tensor(31)
        mb, sb = torch.tensor(1_234_567_891), torch.tensor(50)
    out = ops.add_requantize(a, b, ma, sa, mb, sb, 16)
    assert out.dtype == torch.int16
    lists = [t.expand(n_ch).tolist() for t in (ma, sa, mb, sb)]
    want = [
        [ref_clamp(ref_round_half_up(va * lists[0][j], lists[1][j])
                   + ref_round_half_up(vb * lists[2][j], lists[3][j]), 16)
         for j, (va, vb) in enumerate(zip(ra, rb, strict=True))]
        for ra, rb in zip(a.tolist(), b.tolist(), strict=True)
    ]
    assert out.tolist() == want


def test_add_requantize_rounds_each_branch_then_clamps_once() -> None:
    one, sh = torch.tensor(1), torch.tensor(1)
    # 1/2 + 1/2: each branch rounds up to 1 -> 2 (a single rounding of the sum would give 1).
    assert ops.add_requantize(torch.tensor([1]), torch.tensor([1]), one, sh, one, sh, 8).item() == 2
    # -1/2 + -1/2: each branch rounds toward +inf to 0.
    assert ops.add_requantize(torch.tensor([-1]), torch.tensor([-1]), one, sh, one, sh, 8).item() == 0
    # 100 + 100 clamps to 127 once; 200 + (-100) is not clamped branch-wise.
    x = torch.tensor([200, 400])
    y = torch.tensor([200, -200])
    assert ops.add_requantize(x, y, one, sh, one, sh, 8).tolist() == [127, 100]


# ---------------------------------------------------------------------------------------------
# dyadic
# ---------------------------------------------------------------------------------------------


def _check_dyadic(r: float, b: int, c: int) -> None:
    assert abs(b) < 2**31 and 1 <= c <= 62, (r, b, c)
    got = Fraction(b, 1 << c)
    if abs(r) >= 2**-32:  # c <= 62 leaves the full 31-bit mantissa
        assert abs(got - Fraction(r)) <= Fraction(abs(r)) * Fraction(1, 2**30), (r, b, c)
        assert b != 0 and (b > 0) == (r > 0)
    else:  # shifted down to c = 62: half an LSB of 2**-62 (plus the first rounding)
        assert c == 62 or b == 0
        assert abs(got - Fraction(r)) <= Fraction(1, 2**62), (r, b, c)
        assert b == 0 or (b > 0) == (r > 0)


def test_dyadic_relative_error_over_wide_log_range() -> None:
    # 1e-12 .. 1e8 log-spaced plus random mantissas; both signs.
    rnd = random.Random(15)
    ratios = [10.0 ** (k / 50) for k in range(-600, 401)]
    ratios += [10.0 ** rnd.uniform(-12, 8) for _ in range(1000)]
    ratios += [-r for r in ratios[::3]]
    b, c = ops.dyadic(torch.tensor(ratios, dtype=torch.float64))
    assert b.dtype == torch.int64 and c.dtype == torch.int64 and b.shape == (len(ratios),)
    worst = 0.0
    for r, bi, ci in zip(ratios, b.tolist(), c.tolist(), strict=True):
        _check_dyadic(r, bi, ci)
        if abs(r) >= 2**-32:
            worst = max(worst, abs(bi / 2**ci - r) / abs(r))
    assert worst <= 2**-31  # measured 4.57e-10 = 0.98 * 2**-31 (half an LSB of the 31-bit mantissa)


def test_dyadic_tiny_ratios_shift_down_toward_zero() -> None:
    # Below 2**-32, c is capped at 62: precision becomes absolute (2**-63), never the wrong sign.
    tiny = [2.0**-32, 2.0**-33, 1e-12, 3e-15, 2.0**-62, 2.0**-63, 2.0**-64, 2.0**-94, 2.0**-95,
            2.0**-96, 2.0**-97, 1e-29, 1e-40, 1e-300, 5e-324]
    for r in tiny + [-t for t in tiny]:
        b, c = ops.dyadic(r)
        _check_dyadic(r, int(b), int(c))
    assert [int(v) for v in ops.dyadic(2.0**-63)] == [1, 62]  # tie rounds up
    assert [int(v) for v in ops.dyadic(-(2.0**-63))] == [0, 1]  # tie toward +inf
    for r in (2.0**-96, -(2.0**-96), 1e-300, -1e-300, 5e-324):
        assert [int(v) for v in ops.dyadic(r)] == [0, 1]


def test_dyadic_special_values() -> None:
    assert [int(v) for v in ops.dyadic(0.0)] == [0, 1]
    assert [int(v) for v in ops.dyadic(-0.0)] == [0, 1]
    assert [int(v) for v in ops.dyadic(1.0)] == [2**30, 30]
    assert [int(v) for v in ops.dyadic(-0.75)] == [-3 * 2**29, 31]
    # Mantissa rounds up to 1.0: b would be 2**31; it is halved and c reduced instead.
    for r, want in ((1 - 2.0**-40, (2**30, 30)), (-(1 - 2.0**-40), (-(2**30), 30)),
                    ((1 - 2.0**-35) * 2.0**-20, (2**30, 50)), ((1 - 2.0**-33) * 2.0**29, (2**30, 1))):
        assert tuple(int(v) for v in ops.dyadic(r)) == want
    # Negative ratios mirror positive ones (round half to even is symmetric).
    rs = torch.tensor([0.3, 1e-5, 7.25, 123456.789], dtype=torch.float64)
    bp, cp = ops.dyadic(rs)
    bn, cn = ops.dyadic(-rs)
    assert torch.equal(bn, -bp) and torch.equal(cn, cp)
    # Shape follows the input.
    b, c = ops.dyadic(torch.full((3, 4), 0.01))
    assert b.shape == (3, 4) and c.shape == (3, 4)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_dyadic_non_finite_raises(bad: float) -> None:
    with pytest.raises(ValueError):
        ops.dyadic(bad)
    with pytest.raises(ValueError):
        ops.dyadic(torch.tensor([0.5, bad, 0.25], dtype=torch.float64))


@pytest.mark.parametrize("big", [2.0**30, 2.0**30 * (1 - 2.0**-33), 1e10, -(2.0**31)])
def test_dyadic_too_large_raises(big: float) -> None:
    with pytest.raises(ValueError):
        ops.dyadic(big)


def test_dyadic_just_below_limit_is_accepted() -> None:
    b, c = ops.dyadic(1.5 * 2.0**29)
    assert int(c) == 1 and int(b) == 3 * 2**29
    b, c = ops.dyadic(1e8)
    _check_dyadic(1e8, int(b), int(c))


# ---------------------------------------------------------------------------------------------
# int_linear, int_matmul
# ---------------------------------------------------------------------------------------------


def _extreme_int8(shape: tuple[int, ...], seed: int, lo: int = -128) -> Tensor:
    """int8 values mostly at the extremes ``lo``/127, some random."""
    g = gen(seed)
    pick = torch.randint(0, 3, shape, generator=g)
    rnd = torch.randint(lo, 128, shape, generator=g)
    return torch.where(pick == 0, lo, torch.where(pick == 1, 127, rnd)).to(torch.int8)


@pytest.mark.parametrize("k", [3, 64, 3072])
def test_int_linear_exact_against_float64(k: int) -> None:
    x = _extreme_int8((2, 5, k), seed=16)
    w = _extreme_int8((12, k), seed=17, lo=-127)
    bias = randint(-(2**30) + 1, 2**30 - 1, (12,), seed=18, dtype=torch.int32)
    # Worst-case rows: all -128 against all -127 / 127, and the largest allowed bias.
    x[0, 0] = -128
    x[0, 1] = 127
    w[0] = -127
    w[1] = 127
    bias[0] = 2**30 - 1
    bias[1] = -(2**30) + 1
    out = ops.int_linear(x, w, bias)
    assert out.dtype == torch.int32 and out.shape == (2, 5, 12)
    ref = x.double() @ w.double().t() + bias.double()  # exact: every value < 2**53
    assert torch.equal(out.double(), ref)
    assert torch.equal(ops.int_linear(x, w).double(), x.double() @ w.double().t())
    if k == 3072:
        assert int(out[0, 0, 0]) == 3072 * 128 * 127 + 2**30 - 1  # 1.12e9 < 2**31 - 1


def test_int_linear_python_reference_small() -> None:
    x = randint(-128, 127, (3, 7), seed=19, dtype=torch.int8)
    w = randint(-127, 127, (4, 7), seed=20, dtype=torch.int8)
    bias = torch.tensor([5, -6, 2**29, -(2**29)], dtype=torch.int32)
    want = [[sum(a * b for a, b in zip(r, wr, strict=True)) + bb for wr, bb in zip(w.tolist(), bias.tolist(),
                                                                                   strict=True)]
            for r in x.tolist()]
    assert ops.int_linear(x, w, bias).tolist() == want


@pytest.mark.parametrize("transpose_b", [False, True])
def test_int_matmul_exact_against_float64(transpose_b: bool) -> None:
    a = _extreme_int8((2, 3, 6, 3072), seed=21)
    b = _extreme_int8((2, 3, 5, 3072) if transpose_b else (2, 3, 3072, 5), seed=22)
    a[0, 0, 0] = -128
    if transpose_b:
        b[0, 0, 0] = -128
    else:
        b[0, 0, :, 0] = -128
    out = ops.int_matmul(a, b, transpose_b=transpose_b)
    assert out.dtype == torch.int32 and out.shape == (2, 3, 6, 5)
    bd = b.double().transpose(-1, -2) if transpose_b else b.double()
    assert torch.equal(out.double(), a.double() @ bd)
    assert int(out[0, 0, 0, 0]) == 3072 * 128 * 128


def test_int_linear_and_matmul_require_int8() -> None:
    """int8 operands only; the one exception is ``int_matmul``'s left operand, which may be uint8 (the
    ``shiftmax_rel`` probabilities)."""
    x8 = torch.zeros(2, 4, dtype=torch.int8)
    for bad in (torch.int16, torch.int32, torch.int64, torch.uint8, torch.float32):
        with pytest.raises(TypeError):
            ops.int_linear(x8.to(bad), x8)
        with pytest.raises(TypeError):
            ops.int_linear(x8, x8.to(bad))
        with pytest.raises(TypeError):
            ops.int_matmul(x8, x8.to(bad), transpose_b=True)
        if bad != torch.uint8:
            with pytest.raises(TypeError):
                ops.int_matmul(x8.to(bad), x8.t().contiguous())
    assert ops.int_matmul(x8.to(torch.uint8), x8.t().contiguous()).dtype == torch.int32


@pytest.mark.parametrize("k", [8, 577, 4096])
def test_int_matmul_uint8_left_operand_exact(k: int) -> None:
    """u8 x s8 -> int32 (probabilities @ values): exact at the extremes 255 x -128 (``|acc| <= K * 255 * 128``)."""
    g = gen(39)
    pick = torch.randint(0, 3, (2, 3, 5, k), generator=g)
    a = torch.where(pick == 0, 255, torch.where(pick == 1, 0, torch.randint(0, 256, pick.shape, generator=g)))
    a = a.to(torch.uint8)
    b = _extreme_int8((2, 3, k, 6), seed=40)
    a[0, 0, 0] = 255
    b[0, 0, :, 0] = -128
    b[0, 0, :, 1] = 127
    out = ops.int_matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (2, 3, 5, 6)
    assert torch.equal(out.double(), a.double() @ b.double())
    assert int(out[0, 0, 0, 0]) == -k * 255 * 128 and int(out[0, 0, 0, 1]) == k * 255 * 127
    bt = b.transpose(-1, -2).contiguous()
    assert torch.equal(ops.int_matmul(a, bt, transpose_b=True), out)
    assert k * 255 * 128 < 2**31  # the documented limit K <= 2**16


# ---------------------------------------------------------------------------------------------
# isqrt
# ---------------------------------------------------------------------------------------------


def test_isqrt_exhaustive_small() -> None:
    v = torch.arange(0, 100_001)
    out = ops.isqrt(v)
    assert out.dtype == torch.int64
    assert out.tolist() == [math.isqrt(i) for i in range(100_001)]


def _isqrt_hard_values() -> list[int]:
    rnd = random.Random(23)
    vals = {2**62 - 1, 2**62 - 2, 0, 1, 2, 3}
    for j in range(63):  # powers of two: the start 2**ceil(bitlen/2) is furthest above sqrt here
        vals.update(v for v in ((1 << j) - 1, 1 << j, (1 << j) + 1) if 0 <= v < 2**62)
    ks = [rnd.randrange(1, 2**31) for _ in range(3000)] + [2**31 - 1, 2**31 - 2, 2**30, 2**15 + 1]
    for k in ks:  # around perfect squares
        vals.update(v for v in (k * k - 1, k * k, k * k + 1) if 0 <= v < 2**62)
    vals.update(rnd.randrange(2**62) for _ in range(3000))
    vals.update(rnd.randrange(2**bits) for bits in range(1, 63) for _ in range(20))
    vals.add(1_493_005_299_245_121_599)  # needs 6 Newton updates: the most found
    return sorted(vals)


def test_isqrt_random_and_near_perfect_squares() -> None:
    vals = _isqrt_hard_values()
    out = ops.isqrt(torch.tensor(vals)).tolist()
    for v, k in zip(vals, out, strict=True):
        assert k == math.isqrt(v)
        assert k * k <= v < (k + 1) * (k + 1)  # exactly floor(sqrt(v))


def _newton_updates(v: int) -> int:
    """Number of changing Newton steps ``isqrt`` performs before reaching its fixed point."""
    k = 1 << ((v.bit_length() + 1) // 2)
    steps = 0
    while True:
        nk = min(k, (k + v // max(k, 1)) // 2)
        if nk == k:
            return steps
        k, steps = nk, steps + 1


def test_isqrt_iteration_count_is_enough() -> None:
    vals = _isqrt_hard_values()
    worst = max(_newton_updates(v) for v in vals)
    assert worst <= 6  # measured: 6 (e.g. 1493005299245121599); the docstring says 7 suffice
    assert _newton_updates(1_493_005_299_245_121_599) == 6
    t = torch.tensor(vals)
    want = [math.isqrt(v) for v in vals]
    # 6 updates reach floor(sqrt) everywhere; the default budget (10) leaves room.
    assert ops.isqrt(t, max_iter=6).tolist() == want
    assert ops.isqrt(t, max_iter=7).tolist() == want
    # ...and the budget really is load-bearing: 5 steps are too few for the hardest value.
    hard = torch.tensor([1_493_005_299_245_121_599])
    assert ops.isqrt(hard, max_iter=5).item() != math.isqrt(1_493_005_299_245_121_599)


def test_isqrt_zero_and_errors() -> None:
    assert ops.isqrt(torch.zeros(5, dtype=torch.int64)).tolist() == [0] * 5
    assert ops.isqrt(torch.tensor([[0, 1], [0, 2**62 - 1]])).tolist() == [[0, 1], [0, 2**31 - 1]]
    with pytest.raises(ValueError):
        ops.isqrt(torch.tensor([4, -1]))
    for bad in (torch.float16, torch.float32, torch.float64, torch.bool):
        with pytest.raises(TypeError):
            ops.isqrt(torch.ones(3, dtype=bad))


# ---------------------------------------------------------------------------------------------
# int_mean, patchify, embed_tokens
# ---------------------------------------------------------------------------------------------


def test_int_mean_rounds_half_up() -> None:
    assert ops.int_mean(torch.tensor([1, 2]), 0).item() == 2  # 1.5 -> 2
    assert ops.int_mean(torch.tensor([-1, -2]), 0).item() == -1  # -1.5 -> -1
    assert ops.int_mean(torch.tensor([-1, 0, 0, 0]), 0).item() == 0  # -0.25 -> 0
    assert ops.int_mean(torch.tensor([-3, 0, 0, 0]), 0).item() == -1  # -0.75 -> -1
    assert ops.int_mean(torch.tensor([1, 1, 2]), 0).item() == 1  # 1.33 -> 1


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_int_mean_matches_bigint(dtype: torch.dtype) -> None:
    info = torch.iinfo(dtype)
    x = randint(info.min, info.max, (4, 197, 6), seed=24, dtype=dtype)
    for dim in (0, 1, 2, -1):
        out = ops.int_mean(x, dim)
        assert out.dtype == dtype
        moved = x.movedim(dim, -1)
        want = [ref_int_mean(r) for r in rows(moved)]
        assert out.reshape(-1).tolist() == want


@pytest.mark.parametrize("patch,hw", [(16, (32, 48)), (4, (8, 8)), (14, (28, 28))])
def test_patchify_matches_unfold_and_conv(patch: int, hw: tuple[int, int]) -> None:
    h, w = hw
    px = randint(0, 255, (2, 3, h, w), seed=25, dtype=torch.uint8)
    px[0, 0, 0, 0], px[0, 1, 0, 1] = 0, 255
    p = ops.patchify(px, patch)
    assert p.dtype == torch.int8 and p.shape == (2, (h // patch) * (w // patch), 3 * patch * patch)
    shifted = px.double() - 128
    unf = F.unfold(shifted, kernel_size=patch, stride=patch).transpose(1, 2)  # (B, L, C*p*p)
    assert torch.equal(p.double(), unf)
    weight = randint(-127, 127, (7, 3, patch, patch), seed=26).double()
    conv = F.conv2d(shifted, weight, stride=patch)  # (B, 7, gh, gw)
    conv = conv.flatten(2).transpose(1, 2)  # (B, L, 7)
    assert torch.equal(conv, p.double() @ weight.reshape(7, -1).t())  # exact in float64


def test_patchify_requires_uint8() -> None:
    with pytest.raises(TypeError):
        ops.patchify(torch.zeros(1, 3, 16, 16, dtype=torch.int8), 16)
    with pytest.raises(TypeError):
        ops.patchify(torch.zeros(1, 3, 16, 16), 16)


def test_embed_tokens_matches_bigint() -> None:
    b_, l_, c_ = 2, 5, 6
    acc = randint(-(2**31) + 1, 2**31 - 1, (b_, l_, c_), seed=27, dtype=torch.int32)
    mult = randint(1, 2**31 - 1, (c_,), seed=28)
    shift = randint(30, 62, (c_,), seed=29)
    prefix = randint(-40000, 40000, (1, c_), seed=30, dtype=torch.int32)
    pos = randint(-40000, 40000, (l_, c_), seed=31, dtype=torch.int32)
    out = ops.embed_tokens(acc, mult, shift, prefix, pos, bits=16)
    assert out.dtype == torch.int16 and out.shape == (b_, 1 + l_, c_)
    m, s, pre, ps = mult.tolist(), shift.tolist(), prefix.tolist()[0], pos.tolist()
    for bi, tok in enumerate(acc.tolist()):
        assert out[bi, 0].tolist() == [ref_clamp(v, 16) for v in pre]
        for li, r in enumerate(tok):
            want = [ref_clamp(ref_round_half_up(v * m[j], s[j]) + ps[li][j], 16) for j, v in enumerate(r)]
            assert out[bi, 1 + li].tolist() == want
    assert ops.embed_tokens(acc, mult, shift, None, pos).shape == (b_, l_, c_)


# ---------------------------------------------------------------------------------------------
# shift_exp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x0,n", [(-1, 23), (-4, 20), (-1311, 12), (-7646, 15), (-587_545, 10)])
def test_shift_exp_matches_bigint_and_bounds(x0: int, n: int) -> None:
    i = torch.cat([randint(-3 * abs(x0) * n, 0, (2000,), seed=32), torch.tensor([0, -1, -2, -(2**40)])])
    e = ops.shift_exp(i, x0, n)
    assert e.dtype == torch.int64
    assert e.tolist() == [ref_shift_exp(v, x0, n) for v in i.tolist()]
    assert bool((e > 0).all()) and bool((e <= -x0 * 2**n).all())
    assert int(e[-4]) == -x0 << n  # exp(0) -> |x0| * 2**n
    assert int(e[-1]) == -x0  # clamped exponent: 2**-n


@pytest.mark.parametrize("scale", [1e-4, 7e-4, 1e-2])
def test_shift_exp_approximates_exp(scale: float) -> None:
    x0, n = ops.shift_exp_x0(scale), 15
    lim = math.floor(n * math.log(2) / scale / 1.01)  # exponents that are not clamped
    i = torch.arange(-lim, 1)
    ratio = ops.shift_exp(i, x0, n).double() / (-x0 * 2**n) / torch.exp(scale * i.double())
    # measured ratio range: [0.99686, 1.10653] (1e-2; 1e-4 and 7e-4: [0.99999, 1.1047]); the linear
    # 2**f ~= 1 + f/2 overestimates by up to 6.2% and I_p's 1.0111b ~= log2 e adds ~0.3% per unit of S*I.
    assert float(ratio.min()) >= 0.996 and float(ratio.max()) <= 1.108


def test_shift_exp_rejects_bad_x0() -> None:
    with pytest.raises(ValueError):
        ops.shift_exp(torch.tensor([0, -1]), 0, 15)


# ---------------------------------------------------------------------------------------------
# Shiftmax
# ---------------------------------------------------------------------------------------------


def attention_scores(n_rows: int, length: int, std: float, seed: int) -> tuple[Tensor, float]:
    """Attention-like float scores (std ``std``) quantized to 16 bits; returns ``(I int16, S)``."""
    s = torch.randn(n_rows, length, generator=gen(seed), dtype=torch.float64) * std
    scale = float(s.abs().max()) / 32767
    return ops.quantize_symmetric(s, scale, 16), scale


def shiftmax_errors(length: int, k_out: int) -> tuple[float, float, float]:
    """Over std 1..5: (max |p - softmax|, min row sum, max row sum) of the dequantized output."""
    worst, lo, hi = 0.0, math.inf, -math.inf
    for std in (1.0, 2.0, 3.0, 5.0):
        for seed in range(3):
            q, scale = attention_scores(64, length, std, seed=100 * seed + int(std))
            x0 = ops.shift_exp_x0(scale)
            n = ops.choose_shiftmax_n(x0, length)
            p = ops.shiftmax(q, x0, n, k_out=k_out).double() / 2 ** (k_out - 1)
            ref = torch.softmax(scale * q.double(), dim=-1)
            worst = max(worst, float((p - ref).abs().max()))
            sums = p.sum(-1)
            lo, hi = min(lo, float(sums.min())), max(hi, float(sums.max()))
    return worst, lo, hi


# (length, k_out): (max |p - softmax| bound, max |row sum - 1| bound); measured values in the comments
# (row sums are multiples of the LSB 2**-(k_out-1); "-30 .. +0 LSB" is the measured range of sum - 1).
# The error is ShiftExp's (up to +10% on each E, see test_shift_exp_approximates_exp); the division
# and the final half-up rounding add at most half an output LSB.  Row sums: each element is within
# 1/2 LSB, so random rounding errors mostly cancel; at 8 bits and 197 tokens the flat rows (std 1,
# most p ~ 1/197 < 1/256 = half an LSB, rounded to 0) lose the most.
SHIFTMAX_BOUNDS = {
    (197, 8): (0.021, 0.26),  # measured 0.01862, row sums 1 - 0.23438 .. 1 (-30 .. +0 LSB)
    (49, 8): (0.021, 0.062),  # measured 0.01872, row sums 1 - 0.05469 .. 1 + 0.04688 (-7 .. +6 LSB)
    (8, 8): (0.022, 0.018),  # measured 0.01929, row sums 1 -+ 0.01562 (-2 .. +2 LSB)
    (197, 16): (0.019, 0.0027),  # measured 0.01637, row sums 1 - 0.00238 .. 1 + 0.00232 (-78 .. +76 LSB)
    (49, 16): (0.018, 0.00064),  # measured 0.01559, row sums 1 - 0.00046 .. 1 + 0.00055 (-15 .. +18 LSB)
    (8, 16): (0.018, 0.00008),  # measured 0.01545, row sums 1 -+ 0.00006 (-2 .. +2 LSB)
}


@pytest.mark.parametrize("length,k_out", list(SHIFTMAX_BOUNDS))
def test_shiftmax_error_vs_softmax(length: int, k_out: int) -> None:
    err_bound, sum_dev = SHIFTMAX_BOUNDS[(length, k_out)]
    worst, lo, hi = shiftmax_errors(length, k_out)
    assert worst <= err_bound
    assert 1 - sum_dev <= lo and hi <= 1 + sum_dev


@pytest.mark.parametrize("k_out", [8, 16])
@pytest.mark.parametrize("length", [197, 49, 8])
def test_shiftmax_row_sums_within_half_lsb_per_element(length: int, k_out: int) -> None:
    # Provable (see check_shiftmax_rounding): sum(E) * factor >= 2**62 - sum(E) >= 2**62 * (1 - 2**-16),
    # and each element is off by < 1/2 LSB = 2**-k_out after the half-up rounding, so
    # 1 - 2**-16 - length * 2**-k_out < row sum < 1 + length * 2**-k_out.  A clamped element keeps
    # the row sum >= 1 - 2 * 2**-k_out, inside that for length >= 2.
    # 197 tokens: 1 -+ 0.0030 at 16 bits (measured 1 - 0.00238 .. 1 + 0.00232), 1 -+ 0.77 at 8 bits.
    _, lo, hi = shiftmax_errors(length, k_out)
    assert 1 - 2**-16 - length * 2.0**-k_out < lo and hi < 1 + length * 2.0**-k_out


@pytest.mark.parametrize("k_out", [8, 16])
def test_shiftmax_matches_bigint(k_out: int) -> None:
    q, scale = attention_scores(24, 197, 3.0, seed=33)
    x0 = ops.shift_exp_x0(scale)
    n = ops.choose_shiftmax_n(x0, 197)
    mask = torch.rand(24, 197, generator=gen(34)) < 0.2
    mask[0] = True  # fully masked row
    mask[1] = False
    out = ops.shiftmax(q, x0, n, k_out=k_out)
    out_m = ops.shiftmax(q, x0, n, k_out=k_out, mask=mask)
    assert out.dtype == ops.storage_dtype(k_out) and out_m.dtype == out.dtype
    for r, row in enumerate(rows(q)):
        want, e, max_prod = ref_shiftmax(row, x0, n, k_out)
        assert out[r].tolist() == want
        check_shiftmax_intermediates(e, max_prod, k_out)
        check_shiftmax_rounding(want, e, k_out)
        want_m, e_m, _ = ref_shiftmax(row, x0, n, k_out, mask[r].tolist())
        assert out_m[r].tolist() == want_m
        check_shiftmax_rounding(want_m, e_m, k_out)
    assert bool((out_m[mask] == 0).all())
    assert out_m[0].tolist() == [0] * 197
    assert bool((out >= 0).all()) and int(out.max()) <= 2 ** (k_out - 1) - 1


def test_shiftmax_mask_broadcasts() -> None:
    q, scale = attention_scores(3, 49, 2.0, seed=35)
    x0 = ops.shift_exp_x0(scale)
    n = ops.choose_shiftmax_n(x0, 49)
    key_mask = torch.zeros(49, dtype=torch.bool)
    key_mask[40:] = True  # padding keys, shared by every row
    out = ops.shiftmax(q, x0, n, mask=key_mask)
    assert torch.equal(out, ops.shiftmax(q, x0, n, mask=key_mask.expand(3, 49)))
    assert bool((out[:, 40:] == 0).all()) and bool((out[:, :40].sum(-1) > 0).all())


# length -> (k_out 8, k_out 16) outputs of an all-equal row: round(2**(k-1) / length), clamped.
ALL_EQUAL_WANT = {
    197: (1, 166),  # 0.650 -> 1, 166.34 -> 166
    49: (3, 669),  # 2.612 -> 3, 668.73 -> 669
    8: (16, 4096),  # exact 1/8: E * factor is just below 2**(63-k) / 8, rounds back up to it
    3: (43, 10923),
    2: (64, 16384),
    1: (127, 32767),  # 2**(k-1) (probability 1) clamped to 2**(k-1) - 1
    256: (0, 128),  # 8 bits: an exact tie 0.5; E * factor is just below it, so it rounds down
}


@pytest.mark.parametrize("length", list(ALL_EQUAL_WANT))
@pytest.mark.parametrize("value", [0, 1, -1, 12345, 32767, -32767])
def test_shiftmax_all_equal_rows_are_uniform(length: int, value: int) -> None:
    scale = 5.0 / 32767
    x0 = ops.shift_exp_x0(scale)
    n = ops.choose_shiftmax_n(x0, length)
    e = -x0 << n
    for k_out, want in zip((8, 16), ALL_EQUAL_WANT[length], strict=True):
        out = ops.shiftmax(torch.full((2, length), value, dtype=torch.int16), x0, n, k_out=k_out)
        assert out.tolist() == [[want] * length] * 2
        assert want == min(ref_round_half_up(e * (DIV_NUM // (length * e)), 63 - k_out), 2 ** (k_out - 1) - 1)
        # round(2**(k-1) / length), ties down (the numerator is 2**62 - 1, not 2**62), then clamped.
        ideal = Fraction(2 ** (k_out - 1), length)
        assert want == min(math.ceil(ideal - Fraction(1, 2)), 2 ** (k_out - 1) - 1)
        assert abs(want - ideal) <= Fraction(1, 2) or (length == 1 and want == ideal - 1)


@pytest.mark.parametrize("scale", [3e-5, 7.6e-4, 0.05])
def test_shiftmax_int16_extremes(scale: float) -> None:
    x0 = ops.shift_exp_x0(scale)
    n = ops.choose_shiftmax_n(x0, 197)
    pick = torch.rand(6, 197, generator=gen(36)) < 0.3
    q = torch.where(pick, 32767, -32767).to(torch.int16)
    q[0] = -32767
    q[0, 5] = 32767  # a single huge value
    for k_out in (8, 16):
        out = ops.shiftmax(q, x0, n, k_out=k_out)
        for r, row in enumerate(rows(q)):
            want, e, max_prod = ref_shiftmax(row, x0, n, k_out)
            assert out[r].tolist() == want
            check_shiftmax_intermediates(e, max_prod, k_out)
            check_shiftmax_rounding(want, e, k_out)
            hi = {v for v, p in zip(want, pick[r].tolist(), strict=True) if p}
            lo = {v for v, p in zip(want, pick[r].tolist(), strict=True) if not p}
            assert r == 0 or (len(hi) == 1 and len(lo) <= 1)  # equal inputs -> equal outputs
        top = int(out[0, 5])
        others = out[0].tolist()[:5] + out[0].tolist()[6:]
        assert top > max(others)
        if scale * 65534 * 1.44 > n:  # the gap saturates: every other exponent is clamped to 2**-n
            full = 2 ** (k_out - 1)
            # top ~ 2**n / (2**n + 196) of full scale; measured ratio to that 0.99812 (k_out 8, 127 =
            # the clamp), 0.999995 (k_out 16, 32573); others measured 0 (k_out 8), 1 (k_out 16)
            assert top >= 0.995 * full * 2**n / (2**n + 196)
            assert max(others) <= full * 2.0**-n + 0.5


def test_shiftmax_single_huge_value_takes_everything() -> None:
    # Fine scale, short row: all others are far below 2**-n, so their exponents are clamped to
    # E = |x0| (2**-n of the top's E = |x0| * 2**n): the top gets 2**n / (2**n + 7) of full scale.
    x0 = ops.shift_exp_x0(7.6e-4)
    n = ops.choose_shiftmax_n(x0, 8)
    assert n == 15
    q = torch.tensor([[-32767] * 7 + [32767], [32767] + [-32767] * 7], dtype=torch.int16)
    for k_out in (8, 16):
        out = ops.shiftmax(q, x0, n, k_out=k_out)
        want = [ref_shiftmax(r, x0, n, k_out) for r in rows(q)]
        assert out.tolist() == [w for w, _, _ in want]
        e, max_prod = want[0][1], want[0][2]
        check_shiftmax_intermediates(e, max_prod, k_out)
        check_shiftmax_rounding(want[0][0], e, k_out)
        assert out[0, 7] == out[1, 0] and out[0, :7].tolist() == out[1, 1:].tolist()
        if k_out == 8:
            # 128 * 2**15 / (2**15 + 7) = 127.97 rounds to 128 = probability 1, which int8 cannot
            # hold: the clamp saturates it at 2**(k-1) - 1 (without it, int8 would wrap to -128).
            assert ref_round_half_up(max_prod, 63 - k_out) == 2 ** (k_out - 1)
            assert int(out[0, 7]) == 2 ** (k_out - 1) - 1
            assert out[0, :7].tolist() == [0] * 7  # 128 / 32775 = 0.004 LSB
        else:
            # 32768 * 2**15 / (2**15 + 7) = 32761.0; each other is 32768 / 32775 = 0.9998 LSB -> 1.
            assert int(out[0, 7]) == 32761
            assert out[0, :7].tolist() == [1] * 7
        assert int(out[0].sum()) == {8: 127, 16: 32768}[k_out]  # 127: the clamp's one LSB


def test_shiftmax_intermediate_bounds_on_extreme_rows() -> None:
    """Recompute in big ints: sum(E) <= 2**46 and E * factor <= 2**62 - 1 (the docstring's bounds)."""
    for length in (197, 49, 8, 3136):
        for scale in (1e-11, 1e-6, 3e-5, 7.6e-4, 0.05, 2.0):
            x0 = ops.shift_exp_x0(scale)
            if length * -x0 > SUM_MAX:  # no n can bound the sum: refused, not overflowed
                with pytest.raises(ValueError):
                    ops.choose_shiftmax_n(x0, length)
                continue
            n = ops.choose_shiftmax_n(x0, length)
            for row in ([0] * length, [32767] * length, [-32767] * (length - 1) + [32767],
                        [(-1) ** j * 32767 for j in range(length)]):
                for k_out in (8, 16):
                    out, e, max_prod = ref_shiftmax(row, x0, n, k_out)
                    check_shiftmax_intermediates(e, max_prod, k_out)
                    assert DIV_NUM // sum(e) >= 2**16 - 1  # >= 16 significant bits
                    check_shiftmax_rounding(out, e, k_out)
                    got = ops.shiftmax(torch.tensor([row], dtype=torch.int16), x0, n, k_out=k_out)
                    assert got.tolist() == [out]
    # sum(E) exactly 2**46 (all-equal row, n = 0): factor = 2**16 - 1, outputs still exact.
    x0, length = -(2**31), 2**15
    assert ops.choose_shiftmax_n(x0, length) == 0
    row = [7] * length
    out, e, max_prod = ref_shiftmax(row, x0, 0, 16)
    assert sum(e) == SUM_MAX and DIV_NUM // sum(e) == 2**16 - 1
    check_shiftmax_intermediates(e, max_prod, 16)
    assert ops.shiftmax(torch.tensor([row]), x0, 0, k_out=16).tolist() == [out]
    assert out == [1] * length  # 2**15 / 2**15 = 1 LSB each, just below (factor floored), rounded up
    # The largest product the spec allows, E * factor = 2**62 - 1 (one position): the rounding add
    # reaches 2**62 - 1 + 2**(62 - k_out), still below 2**63; the result rounds to 2**(k-1), clamped.
    for k_out in (8, 16):
        out, e, max_prod = ref_shiftmax([5], -1, 0, k_out)
        assert e == [1] and max_prod == DIV_NUM
        check_shiftmax_intermediates(e, max_prod, k_out)
        check_shiftmax_rounding(out, e, k_out)
        assert ops.shiftmax(torch.tensor([[5]]), -1, 0, k_out=k_out).tolist() == [out] == [[2 ** (k_out - 1) - 1]]
    # |I| < 2**32 (int64 inputs): still exact.
    row = [2**32 - 1, -(2**32) + 1, 0, 5]
    x0 = ops.shift_exp_x0(1e-3)
    n = ops.choose_shiftmax_n(x0, 4)
    assert ops.shiftmax(torch.tensor([row]), x0, n).tolist() == [ref_shiftmax(row, x0, n, 8)[0]]


def test_division_constants_are_the_spec() -> None:
    assert ops.DIV_NUM == DIV_NUM and 2**ops.SUM_BITS == SUM_MAX


def test_choose_shiftmax_n() -> None:
    for x0, length in ((-1, 197), (-1311, 197), (-7646, 8), (-30000, 3136), (-(10**9), 197), (-(2**40), 50)):
        n = ops.choose_shiftmax_n(x0, length)
        assert length * -x0 * 2**n <= SUM_MAX
        assert n == 15 or length * -x0 * 2 ** (n + 1) > SUM_MAX
    assert ops.choose_shiftmax_n(-1311, 197) == 15  # realistic scales now get n_max
    assert ops.choose_shiftmax_n(-(10**9), 197) == 8
    assert ops.choose_shiftmax_n(-(2**40), 64) == 0  # 2**46 exactly is allowed
    with pytest.raises(ValueError):
        ops.choose_shiftmax_n(-(2**40), 65)
    with pytest.raises(ValueError):
        ops.choose_shiftmax_n(-(2**44), 8)
    assert ops.choose_shiftgelu_n(-(2**22)) == 23
    assert ops.choose_shiftgelu_n(-(2**22) - 1) == 22
    assert ops.choose_shiftgelu_n(-(2**45)) == 0
    with pytest.raises(ValueError):
        ops.choose_shiftgelu_n(-(2**45) - 1)


def test_shiftmax_masked_values_do_not_matter() -> None:
    x0 = ops.shift_exp_x0(7.6e-4)
    n = ops.choose_shiftmax_n(x0, 8)
    q = torch.tensor([[0, -500, -1000, -2000, 0, 0, 0, 0]], dtype=torch.int16)
    mask = torch.tensor([False] * 4 + [True] * 4)
    q_big = q.clone()
    q_big[0, 4:] = 32767
    out = ops.shiftmax(q, x0, n, mask=mask)
    assert torch.equal(out, ops.shiftmax(q_big, x0, n, mask=mask))
    assert out[0, 4:].tolist() == [0] * 4 and int(out[0, 0]) > int(out[0, 1]) > int(out[0, 2]) > 0


@pytest.mark.parametrize("k_out", [8, 16])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int64])
def test_shiftmax_masked_row_equals_shiftmax_of_unmasked_subrow(k_out: int, dtype: torch.dtype) -> None:
    """Masked scores far above (or below) every unmasked one change nothing: exact sub-row Shiftmax."""
    length = 49
    q, scale = attention_scores(12, length, 3.0, seed=37)
    x0 = ops.shift_exp_x0(scale)
    n = ops.choose_shiftmax_n(x0, length)
    mask = torch.rand(12, length, generator=gen(38)) < 0.4
    mask[0] = False
    mask[1] = True
    mask[1, 17] = False  # a single unmasked position takes everything
    mask[2, :-1] = True
    mask[2, -1] = False
    huge = 32767 if dtype == torch.int16 else 2**32 - 1  # the documented input limit |I| < 2**32
    q = q.to(dtype)
    low = 2**32 - 2**15 - 1
    if dtype == torch.int64:
        q[4] -= low  # unmasked scores down near -2**32: still far above the masked fill value
        q[5, 0], mask[5, 0] = huge, False  # an unmasked score at the limit
    for fill in (huge, -huge):
        qm = torch.where(mask, torch.tensor(fill, dtype=dtype), q)
        qm[3, mask[3]] = huge  # mixed: some huge positive, some huge negative masked scores
        qm[3, mask[3].nonzero()[::2, 0]] = -huge
        out = ops.shiftmax(qm, x0, n, k_out=k_out, mask=mask)
        assert bool((out[mask] == 0).all())
        for r in range(q.shape[0]):
            keep = ~mask[r]
            sub = ops.shiftmax(q[r, keep], x0, n, k_out=k_out)
            assert torch.equal(out[r, keep], sub), r
            assert out[r].tolist() == ref_shiftmax(qm[r].tolist(), x0, n, k_out, mask[r].tolist())[0]
    assert int(out[1, 17]) == 2 ** (k_out - 1) - 1  # single unmasked position: full scale
    if dtype == torch.int64:  # Shiftmax only sees I - max(I): the shifted row gives the same output
        assert torch.equal(out[4], ops.shiftmax(q[4] + low, x0, n, k_out=k_out, mask=mask[4]))
        assert int(out[4].sum()) > 0


# ---------------------------------------------------------------------------------------------
# Shiftmax-rel and attn_normalize (probabilities relative to the row maximum)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_shiftmax_rel_matches_bigint(dtype: torch.dtype) -> None:
    q, scale = attention_scores(24, 197, 3.0, seed=41)
    q = q.to(dtype)
    if dtype == torch.int32:  # scores up to the documented limit |I| < 2**24
        q = (q.to(torch.int64) * 511).clamp(-(2**24) + 1, 2**24 - 1).to(dtype)
        scale /= 511
    x0 = ops.shift_exp_x0(scale)
    mask = torch.rand(24, 197, generator=gen(42)) < 0.2
    mask[0] = True  # fully masked row
    mask[1] = False
    mask[2] = True
    mask[2, 100] = False  # a single unmasked position
    out = ops.shiftmax_rel(q, x0)
    out_m = ops.shiftmax_rel(q, x0, mask=mask)
    assert out.dtype == torch.uint8 and out_m.dtype == torch.uint8
    for r, row in enumerate(rows(q)):
        assert out[r].tolist() == ref_shiftmax_rel(row, x0)
        assert out_m[r].tolist() == ref_shiftmax_rel(row, x0, mask[r].tolist())
    assert bool((out_m[mask] == 0).all())
    assert out_m[0].tolist() == [0] * 197  # fully masked row: all 0
    assert int(out_m[2, 100]) == 255 and int(out_m[2].sum()) == 255
    # every row's maximum (over unmasked positions) gets 255
    assert torch.equal(out.gather(-1, q.to(torch.int64).argmax(-1, keepdim=True)), torch.full((24, 1), 255,
                                                                                               dtype=torch.uint8))
    keep = ~mask[1:]
    row_max = q[1:].to(torch.int64).masked_fill(~keep, -(2**40)).argmax(-1, keepdim=True)
    assert bool((out_m[1:].gather(-1, row_max) == 255).all())


@pytest.mark.parametrize("x0", [-1, -2, -3, -100, -1311, -7646, -(2**20), -(2**21)])
def test_shiftmax_rel_row_max_gets_255(x0: int) -> None:
    """``p ~= 255 * exp(S * d)``: every maximum of a row (ties included) is exactly 255 for ``|x0| <= 2**21``."""
    q = randint(-30000, 30000, (16, 49), seed=43, dtype=torch.int16)
    q[:, 7] = 30001
    q[:3, 20] = 30001  # tied maxima
    q[5] = 1234  # all equal: all 255
    out = ops.shiftmax_rel(q, x0)
    assert bool((out[:, 7] == 255).all()) and bool((out[:3, 20] == 255).all())
    assert out[5].tolist() == [255] * 49
    m = REL_M_NUM // -x0
    assert ref_round_half_up(-x0 * m, 22) == 255


@pytest.mark.parametrize("x0", [-(2**21) - 1, -3 * 2**20, -(2**22), -(2**23), -(2**25), -(2**27)])
def test_shiftmax_rel_row_max_for_large_x0(x0: int) -> None:
    q = torch.tensor([[0, -5, 3, 3], [7, 7, 7, 7]], dtype=torch.int32)
    out = ops.shiftmax_rel(q, x0)
    top = ref_round_half_up(-x0 * (REL_M_NUM // -x0), 22)
    assert out[:, 2].tolist() == [top, top] and out[1].tolist() == [top] * 4  # the spec's value, exactly
    # the docstring: 255 below 2**21 (ivit's models stay there), then the truncated M costs a little: 248 at 2**25
    assert top >= (254 if -x0 <= 2**23 else 248 if -x0 <= 2**25 else 224)


@pytest.mark.parametrize("scale", [1e-4, 7e-4, 1e-2])
def test_shiftmax_rel_approximates_relative_exp(scale: float) -> None:
    x0 = ops.shift_exp_x0(scale)
    lim = math.floor(9 * math.log(2) / scale / 1.02)  # exponents above the clamp at -9 (log2 units)
    i = torch.arange(-lim, 1).unsqueeze(0)
    p = ops.shiftmax_rel(i, x0)[0].double()
    ideal = 255 * torch.exp(scale * i[0].double())
    big = ideal >= 32
    ratio = p[big] / ideal[big]
    # measured [0.99777, 1.07991] (1e-4), [0.99857, 1.08034] (7e-4), [0.99295, 1.08208] (1e-2): ShiftExp's
    # linear 2**f ~= 1 + f/2 (up to +6.2%) and 1.0111b ~= log2 e
    assert float(ratio.min()) >= 0.99 and float(ratio.max()) <= 1.09
    assert int(p[-1]) == 255


def test_shiftmax_rel_extremes_and_clamped_exponents() -> None:
    """Scores at the limit +-(2**24 - 1), the coarsest and finest x0: exact, and a clamped exponent
    (``I_p = 9 * x0``) always gives 0 (``255 * 2**-9 < 1/2``)."""
    hi = 2**24 - 1
    pick = torch.rand(6, 64, generator=gen(44)) < 0.3
    q = torch.where(pick, hi, -hi).to(torch.int32)
    q[0] = -hi
    q[0, 5] = hi  # a single huge value takes everything
    q[1] = hi  # all equal
    for x0 in (-1, -2, -1311, -(2**21), -(2**27)):
        out = ops.shiftmax_rel(q, x0)
        for r, row in enumerate(rows(q)):
            assert out[r].tolist() == ref_shiftmax_rel(row, x0), (x0, r)
        if x0 > -(2**21):  # the gap 2 * hi clamps every exponent below the top: all others exactly 0
            assert out[0].tolist() == [0] * 5 + [255] + [0] * 58
            assert bool((out[2:][~pick[2:]] == 0).all()) and bool((out[2:][pick[2:]] == 255).all())
        assert len(set(out[1].tolist())) == 1
    # every clamped exponent rounds to 0 whatever x0 is
    for x0 in (-1, -7, -1000, -(2**20), -(2**27)):
        assert ref_round_half_up(-x0 * (REL_M_NUM // -x0), 22 + REL_QMAX) == 0


def test_shiftmax_rel_masked_row_equals_unmasked_subrow() -> None:
    """Masked scores (huge or tiny) change nothing: the unmasked positions get the sub-row's probabilities."""
    q, scale = attention_scores(12, 49, 3.0, seed=45)
    q = q.to(torch.int32)
    x0 = ops.shift_exp_x0(scale)
    mask = torch.rand(12, 49, generator=gen(46)) < 0.4
    mask[0] = False
    mask[1, :-1] = True
    for fill in (2**24 - 1, -(2**24) + 1):
        qm = torch.where(mask, torch.tensor(fill, dtype=torch.int32), q)
        out = ops.shiftmax_rel(qm, x0, mask=mask)
        assert bool((out[mask] == 0).all())
        for r in range(12):
            keep = ~mask[r]
            assert torch.equal(out[r, keep], ops.shiftmax_rel(q[r, keep], x0)), r
    assert int(out[1, -1]) == 255


def test_shiftmax_rel_mask_broadcasts() -> None:
    q, scale = attention_scores(3, 49, 2.0, seed=47)
    x0 = ops.shift_exp_x0(scale)
    key_mask = torch.zeros(49, dtype=torch.bool)
    key_mask[40:] = True
    out = ops.shiftmax_rel(q, x0, mask=key_mask)
    assert torch.equal(out, ops.shiftmax_rel(q, x0, mask=key_mask.expand(3, 49)))
    assert bool((out[:, 40:] == 0).all()) and bool((out[:, :40].max(-1).values == 255).all())


def test_shiftmax_rel_rejects_bad_x0_and_float() -> None:
    with pytest.raises(ValueError):
        ops.shiftmax_rel(torch.zeros(2, 3, dtype=torch.int16), 0)
    with pytest.raises(TypeError):
        ops.shiftmax_rel(torch.zeros(2, 3), -5)


def test_attn_normalize_matches_bigint() -> None:
    g = gen(48)
    p = torch.randint(0, 256, (2, 3, 20, 20), generator=g).to(torch.uint8)
    p[0, 0, 0] = 0  # fully masked row: P = 0
    p[0, 0, 1] = 255  # all at 255
    p[0, 0, 2] = 0
    p[0, 0, 2, 3] = 1  # P = 1: the value itself, 16 fractional bits
    v = _extreme_int8((2, 3, 20, 8), seed=49)
    acc = ops.int_matmul(p, v)
    out = ops.attn_normalize(acc, p)
    assert out.dtype == torch.int32 and out.shape == acc.shape
    for a_row, p_row, o_row in zip(rows(acc), rows(p), rows(out), strict=True):
        assert o_row == ref_attn_normalize(a_row, p_row)
    assert out[0, 0, 0].tolist() == [0] * 8
    assert torch.equal(out[0, 0, 2], v[0, 0, 3].to(torch.int32) << CTX_FRAC)
    # acc / P with 16 fractional bits: within 128 * P / 2**14 (the division's floor) + 1/2 LSB
    total = p.to(torch.int64).sum(-1, keepdim=True).clamp(min=1)
    ideal = acc.double() * 2**CTX_FRAC / total.double()
    assert bool(((out.double() - ideal).abs() <= total.double() / 128 + 0.5).all())


@pytest.mark.parametrize("n_tok", [1, 8, 197, 577])
def test_attn_normalize_extremes(n_tok: int) -> None:
    """p all 255 against v all -128 / 127 (the largest ``|acc| = 128 * P``), at up to 577 tokens."""
    p = torch.full((2, n_tok, n_tok), 255, dtype=torch.uint8)
    v = torch.full((2, n_tok, 4), -128, dtype=torch.int8)
    v[:, :, 1] = 127
    v[1, :, 2] = torch.where(torch.arange(n_tok) % 2 == 0, 127, -128).to(torch.int8)
    acc = ops.int_matmul(p, v)
    out = ops.attn_normalize(acc, p)
    for a_row, p_row, o_row in zip(rows(acc), rows(p), rows(out), strict=True):
        assert o_row == ref_attn_normalize(a_row, p_row)
    r = NORM_NUM // (255 * n_tok)
    assert r.bit_length() >= 13  # the docstring: R keeps >= 13 significant bits for N <= 577
    assert abs(int(out[0, 0, 0]) + 2**23) <= 2**23 // r + 1  # -128 with 16 fractional bits, up to 1/R
    assert int(out.abs().max()) <= 2**23


# softmax(scores) @ V against the float function: relative Frobenius error of the context.
ATTN_LENGTHS = [8, 49, 197, 577]
ATTN_STDS = [0.5, 1.0, 4.0, 8.0]  # flat (0.5, 1) and peaked (4, 8) rows


def attention_context_errors(length: int, std: float, seeds: int = 3) -> tuple[float, float]:
    """Worst over seeds of ``||ctx - softmax(S q) @ V||_F / ||softmax(S q) @ V||_F`` for the new path
    (``shiftmax_rel`` -> ``p @ v`` -> ``attn_normalize``) and the legacy one (Shiftmax k_out 8 -> ``p @ v``).
    Scores: 64 rows of std ``std`` at 16 bits; V: float ``(N, 64)``, int8 (per tensor) for the integer paths."""
    new = old = 0.0
    for seed in range(seeds):
        q, scale = attention_scores(64, length, std, seed=200 + seed)
        v = torch.randn(length, 64, generator=gen(300 + seed), dtype=torch.float64)
        s_v = float(v.abs().max()) / 127
        v8 = ops.quantize_symmetric(v, s_v, 8)
        ref = torch.softmax(scale * q.double(), dim=-1) @ v
        x0 = ops.shift_exp_x0(scale)
        p = ops.shiftmax_rel(q, x0)
        ctx = ops.attn_normalize(ops.int_matmul(p, v8), p).double() * s_v * 2.0**-CTX_FRAC
        p_old = ops.shiftmax(q, x0, ops.choose_shiftmax_n(x0, length), k_out=8)
        ctx_old = ops.int_matmul(p_old, v8).double() * s_v * 2.0**-7
        new = max(new, float((ctx - ref).norm() / ref.norm()))
        old = max(old, float((ctx_old - ref).norm() / ref.norm()))
    return new, old


@pytest.mark.parametrize("std", ATTN_STDS)
@pytest.mark.parametrize("length", ATTN_LENGTHS)
def test_attention_context_error_vs_float(length: int, std: float) -> None:
    """The stated bound: <= 5% at every length and score spread.  Measured (worst of 3 seeds), new / legacy:
    N=8: 2.7 / 3.1% (std 0.5) .. 1.2 / 1.3% (8); N=49: 2.8 / 11.6%, 3.2 / 8.4%, 1.8 / 2.2%, 1.4 / 1.6%;
    N=197: 2.3 / 49%, 2.9 / 28%, 2.0 / 3.0%, 1.5 / 2.0%; N=577: 2.7 / 96%, 3.1 / 59%, 2.3 / 3.9%, 1.8 / 2.7%
    (about 1% of it is V's int8 rounding)."""
    new, old = attention_context_errors(length, std)
    assert new <= 0.05
    if length >= 197 and std <= 1.0:  # flat long rows: the legacy absolute [0, 127] scale rounds most p to 0
        assert old >= 0.25 and new <= old / 8


# ---------------------------------------------------------------------------------------------
# ShiftGELU
# ---------------------------------------------------------------------------------------------

ALL_INT8 = torch.arange(-128, 128, dtype=torch.int8)
GELU_SCALES = [2.0, 1.0, 0.5, 0.1, 0.03, 1e-3, 1e-4, 1e-6]  # x0 = -1 ... -587545


@pytest.mark.parametrize("scale", GELU_SCALES)
def test_shiftgelu_all_int8_matches_bigint(scale: float) -> None:
    x0 = ops.shift_exp_x0(1.702 * scale)
    n = ops.choose_shiftgelu_n(x0)
    for k_out in (8, 16):
        out = ops.shiftgelu(ALL_INT8, x0, n, k_out=k_out)
        assert out.dtype == torch.int32
        want = [ref_shiftgelu(v, x0, n, k_out) for v in ALL_INT8.tolist()]
        assert out.tolist() == [w for w, _ in want]
        assert max(s for _, s in want) <= SUM_MAX
        pos = out[128:]
        assert bool((pos[1:] >= pos[:-1]).all())  # measured: strictly increasing for I >= 0
        assert bool((out[:128] <= 0).all()) and int(out[128]) == 0


@pytest.mark.parametrize("scale", [2.0, 1.0, 0.5, 0.1])
def test_shiftgelu_large_positive_is_identity(scale: float) -> None:
    x0 = ops.shift_exp_x0(1.702 * scale)
    n = ops.choose_shiftgelu_n(x0)
    big = ALL_INT8[1.702 * scale * ALL_INT8.double() >= 8]
    for k_out in (8, 16):
        full = 2 ** (k_out - 1)
        ratio = ops.shiftgelu(big, x0, n, k_out=k_out).double() / (big.double() * full)
        # sig saturates at (E1 * floor((2**62-1) / (E1+E2))) >> (63-k_out) <= 2**(k_out-1) - 1.
        assert float(ratio.max()) < 1.0  # measured 127/128 (k_out 8), 32767/32768 (16)
        # measured 0.9375 / 0.9412 (k_out 8 / 16; scale 2.0, x0 = -1: sigmoid(3) at I = 3); other
        # scales 0.99219 (k_out 8, = 127/128), >= 0.99222 (16)
        assert float(ratio.min()) >= (0.93 if scale == 2.0 else 0.99)


def test_shiftgelu_16bit_inputs_at_documented_limit() -> None:
    i = torch.tensor([2**15, -(2**15), 32767, -32767, 1, -1, 0], dtype=torch.int32)
    for scale in (1e-3, 1e-4):
        x0 = ops.shift_exp_x0(1.702 * scale)
        n = ops.choose_shiftgelu_n(x0)
        out = ops.shiftgelu(i, x0, n, k_out=16)
        assert out.dtype == torch.int32
        assert out.tolist() == [ref_shiftgelu(v, x0, n, 16)[0] for v in i.tolist()]


# (range R, k_out) -> bound on max |dequantized out - gelu(x)| over x = S * I, I in [-127, 127],
# S = R / 127.  n = 23 (choose_shiftgelu_n) for all three.
GELU_BOUNDS = {
    (3.0, 8): 0.045,  # measured 0.04035 (0.013 R)
    (3.0, 16): 0.029,  # measured 0.02535 (0.008 R)
    (8.0, 8): 0.07,  # measured 0.06250 (0.008 R)
    (8.0, 16): 0.048,  # measured 0.04295 (0.005 R)
    (20.0, 8): 0.17,  # measured 0.15625 (0.008 R, one output LSB of x * sig)
    (20.0, 16): 0.05,  # measured 0.04421 (0.002 R)
}


@pytest.mark.parametrize("rng,k_out", list(GELU_BOUNDS))
def test_shiftgelu_error_vs_gelu(rng: float, k_out: int) -> None:
    scale = rng / 127
    x0 = ops.shift_exp_x0(1.702 * scale)
    n = ops.choose_shiftgelu_n(x0)
    i = torch.arange(-127, 128, dtype=torch.int8)
    y = ops.shiftgelu(i, x0, n, k_out=k_out).double() * scale / 2 ** (k_out - 1)
    err = float((y - F.gelu(scale * i.double())).abs().max())
    assert err <= GELU_BOUNDS[(rng, k_out)]


# (range R, k_out) -> bound on max |sig - sigmoid(1.702 x)| with sig = out / I recovered exactly.
SIGMOID_BOUNDS = {
    (0.5, 8): 0.026,  # measured 0.02286
    (0.5, 16): 0.018,  # measured 0.01593
    (3.0, 8): 0.024,  # measured 0.02113
    (3.0, 16): 0.02,  # measured 0.01779
    (8.0, 8): 0.043,  # measured 0.03831 (x0 = -10: 1/|x0| vs 1.702 S adds 0.01)
    (8.0, 16): 0.035,  # measured 0.03074
}


@pytest.mark.parametrize("rng,k_out", list(SIGMOID_BOUNDS))
def test_shiftgelu_sigmoid_error_and_symmetry(rng: float, k_out: int) -> None:
    scale = rng / 127
    x0 = ops.shift_exp_x0(1.702 * scale)
    n = ops.choose_shiftgelu_n(x0)
    i = torch.cat([torch.arange(-127, 0), torch.arange(1, 128)])
    out = ops.shiftgelu(i, x0, n, k_out=k_out).to(torch.int64)
    sig = torch.div(out, i, rounding_mode="trunc")
    assert torch.equal(sig * i, out)  # out = I * sig exactly
    assert float((sig.double() / 2 ** (k_out - 1) - torch.sigmoid(1.702 * scale * i.double())).abs().max()) \
        <= SIGMOID_BOUNDS[(rng, k_out)]
    # sigmoid(t) + sigmoid(-t) = 1: E1 + E2 is the same for I and -I, so the two floors sum to
    # 2**(k_out-1) - 1 or - 2 (provable with factor >= 2**16 - 1; measured: always - 1 here).
    pair = sig[127:] + sig[:127].flip(0)
    assert bool(((pair == 2 ** (k_out - 1) - 1) | (pair == 2 ** (k_out - 1) - 2)).all())


def test_shiftgelu_sigmoid_at_zero_is_one_half() -> None:
    for rng in (0.5, 3.0, 8.0):
        scale = rng / 127
        x0 = ops.shift_exp_x0(1.702 * scale)
        n = ops.choose_shiftgelu_n(x0)
        sig1, sig_m1 = (v / 2**15 for v in ops.shiftgelu(torch.tensor([1, -1]), x0, n, k_out=16).tolist())
        # measured |sig(1) - sigmoid(1.702 S)|: 3e-5 (R 0.5), 1.4e-4 (3), 4.7e-4 (8)
        assert abs(sig1 - 1 / (1 + math.exp(-1.702 * scale))) <= 1e-3
        assert abs(-sig_m1 - 1 / (1 + math.exp(1.702 * scale))) <= 1e-3


# ---------------------------------------------------------------------------------------------
# I-LayerNorm
# ---------------------------------------------------------------------------------------------


def residual_tokens(n_tok: int, c: int, seed: int) -> Tensor:
    """Residual-stream-like float tokens: per-channel offsets and a few outlier channels."""
    g = gen(seed)
    x = torch.randn(n_tok, c, generator=g, dtype=torch.float64) * 2
    x = x + torch.randn(1, c, generator=g, dtype=torch.float64)
    x[:, :3] *= 20
    return x


def ln_case(c: int, seed: int) -> tuple[Tensor, float, Tensor, Tensor]:
    """(I int16, S_in, gamma, beta) for a realistic I-LayerNorm test case."""
    g = gen(seed + 1)
    x = residual_tokens(64, c, seed)
    s_in = float(x.abs().max()) / 32767
    gamma = torch.rand(c, generator=g, dtype=torch.float64) * 2 - 0.5
    beta = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    return ops.quantize_symmetric(x, s_in, 16), s_in, gamma, beta


@pytest.mark.parametrize("c", [192, 384, 768])
def test_ilayernorm_error_vs_layernorm(c: int) -> None:
    worst = 0.0
    for seed in range(3):
        q, s_in, gamma, beta = ln_case(c, seed=40 + seed)
        ref = F.layer_norm(s_in * q.double(), (c,), gamma, beta, eps=1e-6)
        s_out = float(ref.abs().max()) / 127
        mult, shift, offset = ln_constants(gamma, beta, s_out)
        out = ops.ilayernorm(q, mult, shift, offset, bits=8)
        assert out.dtype == torch.int8
        worst = max(worst, float((out.double() - ref / s_out).abs().max()))
    # In output LSBs: 0.5 (final rounding) + 0.5 (offset rounding) + tiny (isqrt / z truncation).
    assert worst <= 1.05  # measured 0.99466 (192), 0.99765 (384), 1.00232 (768); 3072 gives 0.99929


@pytest.mark.parametrize("c", [192, 3072])
def test_ilayernorm_matches_bigint(c: int) -> None:
    q, s_in, gamma, beta = ln_case(c, seed=50)
    q = q[:6]
    ref = F.layer_norm(s_in * q.double(), (c,), gamma, beta, eps=1e-6)
    mult, shift, offset = ln_constants(gamma, beta, float(ref.abs().max()) / 127)
    out = ops.ilayernorm(q, mult, shift, offset, bits=8)
    mb, sb, ob = mult.tolist(), shift.tolist(), offset.tolist()
    for r, row in enumerate(rows(q)):
        assert out[r].tolist() == ref_ilayernorm(row, mb, sb, ob, 8)[0]
    out16 = ops.ilayernorm(q, mult, shift, offset, bits=16)
    assert out16.dtype == torch.int16
    assert out16[0].tolist() == ref_ilayernorm(rows(q)[0], mb, sb, ob, 16)[0]


def test_ilayernorm_constant_tokens_give_offset() -> None:
    c = 384
    mult = randint(-(2**31) + 1, 2**31 - 1, (c,), seed=51)
    shift = randint(20, 62, (c,), seed=52)
    offset = randint(-300, 300, (c,), seed=53)  # some beyond qmax: clamped
    x = torch.stack([torch.full((c,), v, dtype=torch.int16) for v in (0, 1, -1, 32767, -32767, 1234)])
    out = ops.ilayernorm(x, mult, shift, offset, bits=8)
    assert out.tolist() == [offset.clamp(-127, 127).tolist()] * 6


def test_ilayernorm_extreme_rows_and_intermediate_bounds() -> None:
    """+-32767 residual rows, 3072 wide rows, one-element-differs rows; intermediates in range."""
    rnd = random.Random(54)
    cases: list[list[int]] = []
    for c in (192, 768, 3072):
        cases += [
            [32767] * (c // 2) + [-32767] * (c - c // 2),
            [(-1) ** j * 32767 for j in range(c)],
            [-32767] * (c - 1) + [32767],
            [5] * (c - 1) + [6],
            [5] * (c - 1) + [4],
            [-32767] * 7 + [-32766] + [-32767] * (c - 8),
            [rnd.choice((-32767, 32767, rnd.randint(-32767, 32767))) for _ in range(c)],
        ]
    cases.append([(-1) ** j * (2**24 - 1) for j in range(4095)])  # the docstring's outer limit
    cases.append([2**24 - 1] * 4094 + [-(2**24) + 1])
    for row in cases:
        c = len(row)
        mult = [2**31 - 1 if j % 2 else -(2**31) + 1 for j in range(c)]
        shift = [31 + j % 32 for j in range(c)]
        offset = [(-1) ** j * 50 for j in range(c)]
        want, st = ref_ilayernorm(row, mult, shift, offset, 8)
        assert st["var"] < 2**62
        assert st["max_y"] <= st["std"] and st["max_yf"] <= INT32_MAX
        assert st["max_z"] <= 2**LN_Z_BITS and st["max_zb"] < 2**51
        dtype = torch.int16 if max(abs(v) for v in row) <= 32767 else torch.int32
        got = ops.ilayernorm(torch.tensor([row], dtype=dtype), torch.tensor(mult), torch.tensor(shift),
                             torch.tensor(offset), bits=8)
        assert got.tolist() == [want]


def test_ilayernorm_one_element_differs_normalizes_to_sqrt_c() -> None:
    # y = [-d/C ...; d(C-1)/C]: the odd element normalizes to sqrt(C-1), the others to -1/sqrt(C-1).
    c = 768
    row = torch.full((1, c), -100, dtype=torch.int16)
    row[0, 3] = 20000
    s_out = math.sqrt(c - 1) / 127
    mult, shift, offset = ln_constants(torch.ones(c), torch.zeros(c), s_out)
    out = ops.ilayernorm(row, mult, shift, offset)
    assert int(out[0, 3]) == 127
    assert set(out[0, :3].tolist() + out[0, 4:].tolist()) == {round(-1 / math.sqrt(c - 1) / s_out)}


# ---------------------------------------------------------------------------------------------
# I-LayerNorm with 32-bit intermediates
# ---------------------------------------------------------------------------------------------


def ln32_case(n_tok: int, c: int, seed: int, outlier: float) -> tuple[Tensor, float, Tensor, Tensor]:
    """(I int16, S_in, gamma, beta): residual-like tokens (N(0, 2) + per-channel offsets); ``outlier > 1``
    multiplies three channels by it (the systematic outlier channels of ViT residual streams)."""
    g = gen(seed)
    x = torch.randn(n_tok, c, generator=g, dtype=torch.float64) * 2
    x = x + torch.randn(1, c, generator=g, dtype=torch.float64)
    if outlier > 1:
        x[:, 3:6] *= outlier
    s_in = float(x.abs().max()) / 32767
    g = gen(seed + 1)
    gamma = torch.rand(c, generator=g, dtype=torch.float64) * 2 - 0.5
    beta = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    return ops.quantize_symmetric(x, s_in, 16), s_in, gamma, beta


#: cases of ``ln32_case`` for the error tests: of seeds 0..39 (and 60..99 at 768 channels) they hold the worst
#: ones of the earlier floor-shifted variance, 22 at 3072 channels x64 and 70 at 768 x64 (now 1.1695 and 1.0343 LSB)
LN32_SEEDS = (2, 15, 22, 70)


@functools.cache
def ln32_errors(c: int, outlier: float) -> tuple[float, float, float, float]:
    """Over the ``LN32_SEEDS`` cases of 197 tokens: (max |ilayernorm32 - LN| in output LSBs, the same for
    ilayernorm, fraction of elements where the two integer ops agree, fraction of rows where they agree)."""
    w32 = w64 = 0.0
    same_el = same_rows = 0.0
    for seed in LN32_SEEDS:
        q, s_in, gamma, beta = ln32_case(197, c, seed, outlier)
        ref = F.layer_norm(s_in * q.double(), (c,), gamma, beta, eps=1e-6)
        s_out = float(ref.abs().max()) / 127
        mult, shift, offset = ln_constants(gamma, beta, s_out)
        o32 = ops.ilayernorm32(q, mult, shift, offset, bits=8)
        o64 = ops.ilayernorm(q, mult, shift, offset, bits=8)
        assert o32.dtype == torch.int8
        assert int((o32.to(torch.int16) - o64.to(torch.int16)).abs().max()) <= 1
        w32 = max(w32, float((o32.double() - ref / s_out).abs().max()))
        w64 = max(w64, float((o64.double() - ref / s_out).abs().max()))
        same_el += float((o32 == o64).double().mean()) / len(LN32_SEEDS)
        same_rows += float((o32 == o64).all(-1).double().mean()) / len(LN32_SEEDS)
    return w32, w64, same_el, same_rows


@pytest.mark.parametrize("c,outlier", [(768, 1.0), (768, 64.0), (3072, 1.0), (3072, 64.0)])
def test_ilayernorm32_error_vs_layernorm(c: int, outlier: float) -> None:
    """Within 1.2 output LSB of float LayerNorm (0.5 final rounding + 0.5 offset rounding + the std from the
    shifted deviations).  Measured over LN32_SEEDS, ilayernorm32 / ilayernorm: 768: 0.9991 / 0.9991,
    768 x64: 1.0343 / 1.0059, 3072: 1.0039 / 1.0039, 3072 x64: 1.1695 / 1.0029."""
    w32, w64, _, _ = ln32_errors(c, outlier)
    assert w64 <= 1.05
    assert w32 <= 1.2


@pytest.mark.parametrize("c,outlier", [(768, 1.0), (768, 64.0), (3072, 1.0), (3072, 64.0)])
def test_ilayernorm32_error_measured_bound(c: int, outlier: float) -> None:
    """What ilayernorm32 achieves today (see test_ilayernorm32_error_vs_layernorm): within 0.05 LSB of the
    64-bit ilayernorm without outlier channels, within 0.2 LSB with them."""
    w32, w64, _, _ = ln32_errors(c, outlier)
    assert w32 <= w64 + (0.05 if outlier == 1.0 else 0.2)


@pytest.mark.parametrize("c,outlier", [(768, 1.0), (768, 64.0), (3072, 1.0), (3072, 64.0)])
def test_ilayernorm32_agrees_with_ilayernorm(c: int, outlier: float) -> None:
    """The two differ only in z's rounding (floor vs half up) and the shifted variance: by at most 1 LSB
    (asserted in ``ln32_errors``), on well under 1% of the elements.  A 3072-wide row has many chances to
    differ once, so "equal rows" is only a majority at 768 channels.  Measured equal elements / rows: 99.91% / 56%
    (768), 99.96% / 75% (768 x64), 99.90% / 17% (3072), 99.94% / 29% (3072 x64)."""
    _, _, same_el, same_rows = ln32_errors(c, outlier)
    assert same_el >= 0.995
    if c == 768:
        assert same_rows >= 0.5


@pytest.mark.parametrize("c", [192, 768, 3072])
@pytest.mark.parametrize("outlier", [1.0, 64.0])
def test_ilayernorm32_matches_bigint(c: int, outlier: float) -> None:
    q, s_in, gamma, beta = ln32_case(8, c, seed=80, outlier=outlier)
    ref = F.layer_norm(s_in * q.double(), (c,), gamma, beta, eps=1e-6)
    mult, shift, offset = ln_constants(gamma, beta, float(ref.abs().max()) / 127)
    mb, sb, ob = mult.tolist(), shift.tolist(), offset.tolist()
    out = ops.ilayernorm32(q, mult, shift, offset, bits=8)
    out16 = ops.ilayernorm32(q, mult, shift, offset, bits=16)
    assert out16.dtype == torch.int16
    ks = set()
    for r, row in enumerate(rows(q)):
        want, st = ref_ilayernorm32(row, mb, sb, ob, 8)
        assert out[r].tolist() == want
        assert out16[r].tolist() == ref_ilayernorm32(row, mb, sb, ob, 16)[0]
        ks.add(st["k"])
    assert max(ks) > 0  # the rows do exercise the shifted variance


def test_ilayernorm32_extreme_rows_and_intermediate_bounds() -> None:
    """+-32767 rows up to the documented 8192 channels, one-element-differs rows, C = 1 and 2: exact, and every
    intermediate but the two 64-bit products inside int32 (asserted in ``ref_ilayernorm32``)."""
    rnd = random.Random(81)
    cases: list[list[int]] = [[5], [-32767], [32767, -32767], [3, 4]]
    for c in (192, 768, 2048, 3072, 8192):
        cases += [
            [32767] * (c // 2) + [-32767] * (c - c // 2),
            [(-1) ** j * 32767 for j in range(c)],
            [-32767] * (c - 1) + [32767],
            [32767] * (c - 1) + [-32767],
            [5] * (c - 1) + [6],
            [-32767] * 7 + [-32766] + [-32767] * (c - 8),
            [rnd.choice((-32767, 32767, rnd.randint(-32767, 32767))) for _ in range(c)],
        ]
    worst_var = 0
    for row in cases:
        c = len(row)
        mult = [2**31 - 1 if j % 2 else -(2**31) + 1 for j in range(c)]
        shift = [31 + j % 32 for j in range(c)]
        offset = [(-1) ** j * 50 for j in range(c)]
        want, st = ref_ilayernorm32(row, mult, shift, offset, 8)
        worst_var = max(worst_var, st["var"])
        got = ops.ilayernorm32(torch.tensor([row], dtype=torch.int16), torch.tensor(mult), torch.tensor(shift),
                               torch.tensor(offset), bits=8)
        assert got.tolist() == [want], c
    assert 2**30 < worst_var < 2**31  # the bound is nearly reached (alternating +-32767 rows of 2048)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_ilayernorm32_constant_tokens_give_offset(dtype: torch.dtype) -> None:
    c = 384
    mult = randint(-(2**31) + 1, 2**31 - 1, (c,), seed=82)
    shift = randint(20, 62, (c,), seed=83)
    offset = randint(-300, 300, (c,), seed=84)  # some beyond qmax: clamped
    info = torch.iinfo(dtype)
    vals = (0, 1, -1, info.max, -info.max, 100)
    x = torch.stack([torch.full((c,), v, dtype=dtype) for v in vals])
    out = ops.ilayernorm32(x, mult, shift, offset, bits=8)
    assert out.tolist() == [offset.clamp(-127, 127).tolist()] * len(vals)
    one = ops.ilayernorm32(torch.tensor([[100], [-7]], dtype=dtype), mult[:1], shift[:1], offset[:1], bits=16)
    assert one.tolist() == [[int(offset[0])], [int(offset[0])]]  # C = 1: y = 0 always


def test_ilayernorm32_one_element_differs_normalizes_to_sqrt_c() -> None:
    c = 768
    row = torch.full((1, c), -100, dtype=torch.int16)
    row[0, 3] = 20000
    s_out = math.sqrt(c - 1) / 127
    mult, shift, offset = ln_constants(torch.ones(c), torch.zeros(c), s_out)
    out = ops.ilayernorm32(row, mult, shift, offset)
    assert int(out[0, 3]) == 127
    assert set(out[0, :3].tolist() + out[0, 4:].tolist()) == {round(-1 / math.sqrt(c - 1) / s_out)}


# ---------------------------------------------------------------------------------------------
# dtypes, devices, batch independence
# ---------------------------------------------------------------------------------------------

_SM_X0 = ops.shift_exp_x0(7.6e-4)
_GELU_X0 = ops.shift_exp_x0(1.702 * 0.05)
C_TEST = 16
_LN_MULT, _LN_SHIFT, _LN_OFF = ln_constants(torch.linspace(0.5, 1.5, C_TEST), torch.linspace(-1, 1, C_TEST),
                                            0.05)
_W8 = randint(-127, 127, (5, C_TEST), seed=55, dtype=torch.int8)
_B32 = randint(-1000, 1000, (5,), seed=56, dtype=torch.int32)
_RQ_MULT = randint(1, 2**31 - 1, (C_TEST,), seed=57)
_RQ_SHIFT = randint(20, 40, (C_TEST,), seed=58)

# Each op as a function of one integer tensor (..., C_TEST), rows along the last dimension.
ROW_OPS: dict[str, tuple[Callable[[Tensor], Tensor], torch.dtype | None]] = {
    "requantize": (lambda x: ops.requantize(x, _RQ_MULT, _RQ_SHIFT, 8), torch.int8),
    "add_requantize": (lambda x: ops.add_requantize(x, x.flip(-1), _RQ_MULT, _RQ_SHIFT, _RQ_MULT.flip(0),
                                                    _RQ_SHIFT, 16), torch.int16),
    "shiftmax": (lambda x: ops.shiftmax(x, _SM_X0, ops.choose_shiftmax_n(_SM_X0, C_TEST)), torch.int8),
    "shiftmax16": (lambda x: ops.shiftmax(x, _SM_X0, 12, k_out=16), torch.int16),
    "shiftgelu": (lambda x: ops.shiftgelu(x, _GELU_X0, ops.choose_shiftgelu_n(_GELU_X0)), torch.int32),
    "ilayernorm": (lambda x: ops.ilayernorm(x, _LN_MULT, _LN_SHIFT, _LN_OFF), torch.int8),
    "ilayernorm32": (lambda x: ops.ilayernorm32(x, _LN_MULT, _LN_SHIFT, _LN_OFF), torch.int8),
    "shiftmax_rel": (lambda x: ops.shiftmax_rel(x, _SM_X0), torch.uint8),
    # acc rows normalized by the row sums of a uint8 p computed from the same row
    "attn_normalize": (lambda x: ops.attn_normalize(x, (x.to(torch.int64).abs() % 251).to(torch.uint8)),
                       torch.int32),
    "isqrt": (lambda x: ops.isqrt(x.abs()), torch.int64),
    "int_mean": (lambda x: ops.int_mean(x, -1), None),  # None: keeps the input dtype
    "int_linear": (lambda x: ops.int_linear(x.to(torch.int8), _W8, _B32), torch.int32),
    "embed_tokens": (lambda x: ops.embed_tokens(x.reshape(1, -1, C_TEST), _RQ_MULT, _RQ_SHIFT, None,
                                                torch.zeros(1, C_TEST, dtype=torch.int64)), torch.int16),
}
ROW_OP_NAMES = [k for k in ROW_OPS if k != "embed_tokens"]  # embed_tokens has a fixed 3-d layout


@pytest.mark.parametrize("name", list(ROW_OPS))
def test_ops_accept_int8_int16_int32_and_give_documented_dtype(name: str) -> None:
    fn, out_dtype = ROW_OPS[name]
    base = randint(-127, 127, (3, C_TEST), seed=59)
    results = []
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        out = fn(base.to(dtype))
        assert out.dtype == (out_dtype or dtype)
        results.append(out.to(torch.int64))
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("name", [k for k in ROW_OPS if k not in ("int_linear", "isqrt")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bool])
def test_ops_reject_float_inputs(name: str, dtype: torch.dtype) -> None:
    fn, _ = ROW_OPS[name]
    with pytest.raises(TypeError):
        fn(torch.ones(3, C_TEST, dtype=dtype))


def test_constant_arguments_reject_float_tensors() -> None:
    x = torch.ones(2, C_TEST, dtype=torch.int32)
    with pytest.raises(TypeError):
        ops.requantize(x, _RQ_MULT.double(), _RQ_SHIFT, 8)
    with pytest.raises(TypeError):
        ops.ilayernorm(x, _LN_MULT, _LN_SHIFT, _LN_OFF.double())


LEADING_SHAPES = [(1,), (2,), (5,), (2, 5), (1, 2, 5)]


@pytest.mark.parametrize("lead", LEADING_SHAPES)
@pytest.mark.parametrize("name", ROW_OP_NAMES)
def test_rows_do_not_depend_on_the_batch(name: str, lead: tuple[int, ...]) -> None:
    fn, _ = ROW_OPS[name]
    x = randint(-32767, 32767, (*lead, C_TEST), seed=60, dtype=torch.int16)
    if name in ("int_linear",):
        x = x.clamp(-128, 127)
    out = fn(x)
    assert out.shape[: len(lead)] == lead
    for idx in itertools.product(*(range(d) for d in lead)):
        assert torch.equal(out[idx], fn(x[idx])), idx
        assert torch.equal(out[idx], fn(x[idx].unsqueeze(0))[0]), idx
    assert torch.equal(fn(x.flip(0)), out.flip(0))


@pytest.mark.parametrize("lead", LEADING_SHAPES)
def test_int_matmul_batches_are_independent(lead: tuple[int, ...]) -> None:
    a = randint(-128, 127, (*lead, 4, 24), seed=61, dtype=torch.int8)
    b = randint(-128, 127, (*lead, 3, 24), seed=62, dtype=torch.int8)
    out = ops.int_matmul(a, b, transpose_b=True)
    assert out.shape == (*lead, 4, 3)
    for idx in itertools.product(*(range(d) for d in lead)):
        assert torch.equal(out[idx], ops.int_matmul(a[idx], b[idx], transpose_b=True))


def _device_cases() -> list[tuple[str, Callable[[torch.device], Tensor]]]:
    x16 = randint(-32767, 32767, (3, 197), seed=63, dtype=torch.int16)
    x8 = randint(-128, 127, (2, 4, 64), seed=64, dtype=torch.int8)
    w8 = randint(-127, 127, (6, 64), seed=65, dtype=torch.int8)
    ln_q, _, _, _ = ln_case(192, seed=66)
    ln_m, ln_s, ln_o = ln_constants(torch.ones(192), torch.zeros(192), 0.05)
    sm_n = ops.choose_shiftmax_n(_SM_X0, 197)
    gelu_n = ops.choose_shiftgelu_n(_GELU_X0)
    px = randint(0, 255, (1, 3, 32, 32), seed=67, dtype=torch.uint8)
    p8 = ops.shiftmax_rel(x16.reshape(3, 1, 197)[:, :, :64].expand(3, 64, 64).contiguous(), _SM_X0)
    v8 = randint(-128, 127, (3, 64, 32), seed=68, dtype=torch.int8)
    return [
        ("shiftmax", lambda d: ops.shiftmax(x16.to(d), _SM_X0, sm_n)),
        ("shiftgelu", lambda d: ops.shiftgelu(x8.to(d), _GELU_X0, gelu_n)),
        ("ilayernorm", lambda d: ops.ilayernorm(ln_q.to(d), ln_m.to(d), ln_s.to(d), ln_o.to(d))),
        ("ilayernorm32", lambda d: ops.ilayernorm32(ln_q.to(d), ln_m.to(d), ln_s.to(d), ln_o.to(d))),
        ("shiftmax_rel", lambda d: ops.shiftmax_rel(x16.to(d), _SM_X0)),
        ("attn_normalize", lambda d: ops.attn_normalize(
            ops.int_matmul(p8.to(d), v8.to(d)), p8.to(d))),
        ("int_matmul_u8", lambda d: ops.int_matmul(p8.to(d), v8.to(d))),
        ("isqrt", lambda d: ops.isqrt(torch.tensor(_isqrt_hard_values()[:2000], device=d))),
        ("int_linear", lambda d: ops.int_linear(x8.to(d), w8.to(d))),
        ("int_matmul", lambda d: ops.int_matmul(x8.to(d), x8.to(d), transpose_b=True)),
        ("requantize", lambda d: ops.requantize(x16.to(d), torch.tensor(1 << 30, device=d),
                                                torch.tensor(37, device=d), 8)),
        ("patchify", lambda d: ops.patchify(px.to(d), 16)),
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", _device_cases(), ids=lambda c: c[0])
def test_ops_on_cuda_equal_cpu(case: tuple[str, Callable[[torch.device], Tensor]]) -> None:
    _, fn = case
    cpu = fn(torch.device("cpu"))
    gpu = fn(torch.device("cuda"))
    assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
    assert torch.equal(gpu.cpu(), cpu)
