"""One TOSA lowering per op of the op set (``ivit.ir.opset.OPSET``), fused ops included.

A lowering ``fn(ctx, *inputs) -> output`` appends TOSA operators to ``ctx.g`` (``graph.Graph``) that compute
the op's reference semantics (``ivit.ops``) exactly, in int8/int16/int32 only, and returns the output tensor in
the op's storage type (uint8 values as int8 ``u - 128``, see ``graph``).  Fused ops call the lowerings of the ops
they fuse, so each op's arithmetic is written once.

Rounding and range traps, and how they are handled (the README's table lists them per op):

* ``round_shift(x * b, c)`` (every requantization) is ``RESCALE`` with ``SINGLE_ROUND``, which is exactly our
  round half up.  ``RESCALE`` wants ``b >= 0``: channels with ``b < 0`` are negated first
  (``round_shift(x * b, c) = round_shift((-x) * |b|, c)``).  It wants ``2 <= c <= 62``: ``b`` is doubled and
  ``c`` raised while ``b < 2**30`` (exact).  It wants ``|x| < 2**(c-1)``: when the interval does not prove it,
  ``x`` is first clamped to where the (clamped) result saturates, which changes no output; when even that does
  not prove it, the product is computed by ``MUL`` with a shift (an exact 64-bit product, round half up),
  one ``MUL`` per distinct shift, on inputs clamped strictly inside the saturation points (so ``MUL``'s result
  fits int32), the saturated positions being set by ``GREATER`` + ``SELECT``.  So every requantization lowers.
* Our clamp is ``[-qmax, qmax]``, one above the type minimum: ``CLAMP`` (int8) or ``MAXIMUM``/``MINIMUM``
  (int32) after the ``RESCALE``'s saturation, or folded into a ``TABLE``.
* Floor divisions: ``INTDIV`` truncates toward zero, so a negative dividend is first shifted up by a multiple
  of the divisor; ``ARITHMETIC_RIGHT_SHIFT`` is floor (``round=False``) or round half up (``round=True``).
* ``MUL`` with shift 0, ``LOGICAL_LEFT_SHIFT``, ``CAST`` and the ``MATMUL`` accumulator wrap silently: each use
  is checked against the interval validation proved (``graph``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ... import ops
from ...errors import IvitError
from ...ir.opset import OPSET, PROBS_REL8, Check
from ...ir.program import Node
from ...ir.types import TType
from .graph import BOOL, I8, I16, I32, INT32_MAX, INT32_MIN, Graph, T, round_shift

__all__ = ["Ctx", "LOWERINGS", "TOSA_OPS_BY_OP", "UNSUPPORTED", "LEGACY_REASON", "lowering_table", "stored_dtype",
           "stored_range", "isqrt_iterations"]

#: why the 64-bit legacy ops have no TOSA lowering
LEGACY_REASON = ("needs 64-bit intermediates; re-freeze with ivit >= 0.2 (QuantConfig defaults: layernorm=int32, "
                 "probs=rel8)")
#: ops of the op set that have no lowering, with the reason (a program using one is refused before writing)
UNSUPPORTED: dict[str, str] = {"layernorm": LEGACY_REASON, "shiftmax": LEGACY_REASON}


def stored_dtype(dt: torch.dtype) -> str:
    """The TOSA element type holding a program dtype (uint8 as int8 ``u - 128``)."""
    return {torch.uint8: I8, torch.int8: I8, torch.int16: I16, torch.int32: I32}[dt]


def stored_range(t: TType) -> tuple[int, int]:
    off = 128 if t.dtype == torch.uint8 else 0
    return t.lo - off, t.hi - off


@dataclass
class Ctx:
    """What a lowering sees of one program node: the graph, attributes, constants, validated input and output
    types, and the static batch."""

    g: Graph
    attrs: dict[str, Any]
    consts: dict[str, Tensor]
    ins: list[TType]
    out: TType
    batch: int
    where: str

    def a(self, name: str, default: Any = None) -> Any:
        v = self.attrs.get(name, default)
        return int(v) if isinstance(v, bool) else v

    def c(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return None if t is None else t.detach().cpu().to(torch.int64).numpy()

    def shape(self, t: TType) -> tuple[int, ...]:
        return t.concrete(self.batch)

    def fail(self, msg: str) -> IvitError:
        return IvitError(f"tosa export: {self.where}: {msg}")


Lowering = Callable[..., T]
LOWERINGS: dict[str, Lowering] = {}
#: the TOSA operators each lowering may emit (for the README table; the tests check emitted ones are listed)
TOSA_OPS_BY_OP: dict[str, tuple[str, ...]] = {}


def _lower(name: str, tosa_ops: tuple[str, ...]) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        if name not in OPSET:
            raise KeyError(f"lowering for unknown op {name!r}")
        LOWERINGS[name] = fn
        TOSA_OPS_BY_OP[name] = tuple(dict.fromkeys(tosa_ops))
        return fn
    return deco


def lowering_table() -> dict[str, Lowering]:
    return dict(LOWERINGS)


# ---------------------------------------------------------------------------------------------
# Shared pieces: requantization, floor division, integer square root
# ---------------------------------------------------------------------------------------------

#: what ``requant`` may emit
_REQ_OPS = ("RESCALE", "CAST", "MAXIMUM", "MINIMUM", "MUL", "ADD", "CLAMP", "GREATER", "SELECT")


def _ceil_div(p: int, q: int) -> int:
    return -((-p) // q)


def _saturation(b: int, c: int, lo_out: int, hi_out: int) -> tuple[int, int] | None:
    """``[x_lo, x_hi]`` such that ``clamp(round_shift(x * b, c), lo_out, hi_out)`` is the same for every
    ``x <= x_lo`` and for every ``x >= x_hi`` (None for ``b = 0``: the result is 0)."""
    n, h = 1 << c, 1 << (c - 1)
    k_hi = hi_out * n - h  # round_shift(x b, c) >= hi_out  <=>  x b >= k_hi
    k_lo = (lo_out + 1) * n - h - 1  # round_shift(x b, c) <= lo_out  <=>  x b <= k_lo
    if b > 0:
        return k_lo // b, _ceil_div(k_hi, b)
    if b < 0:
        return k_hi // b, _ceil_div(k_lo, b)
    return None


def _normalize(b: int, c: int) -> tuple[int, int]:
    """``(m, s)`` with ``m = |b| * 2**k``, ``s = c + k`` (the same ``round_shift`` exactly), ``m`` raised towards
    ``[2**30, 2**31)`` while ``s <= 62``."""
    m, s = abs(b), c
    if m == 0:
        return 0, 62
    while m < (1 << 30) and s < 62:
        m, s = m << 1, s + 1
    return m, s


def _channel_bounds(lo: int, hi: int, sat: Sequence[tuple[int, int] | None] | None, n: int) -> list[tuple[int, int]]:
    if sat is None:
        return [(lo, hi)] * n
    out = []
    for s in sat:
        if s is None:
            out.append((lo, hi))
        else:
            out.append((min(max(lo, s[0]), s[1]), min(max(hi, s[0]), s[1])))
    return out


def requant(g: Graph, x: T, mult: np.ndarray, shift: np.ndarray, lo_out: int, hi_out: int, out: str,
            where: str) -> T:
    """``clamp(round_shift(x * mult, shift), lo_out, hi_out)`` exactly, per tensor or per channel (last axis).

    ``out`` is ``int8`` (``lo_out``/``hi_out`` within int8) or ``int32``.  Emits ``RESCALE`` when its REQUIREs can
    be proven, on the raw or the pre-clamped input (see the module docstring), otherwise ``MUL`` with a shift per
    distinct shift value."""
    bl = [int(v) for v in np.asarray(mult).reshape(-1)]
    cl = [int(v) for v in np.asarray(shift).reshape(-1)]
    n = len(bl)
    sat = [_saturation(b, c, lo_out, hi_out) for b, c in zip(bl, cl, strict=True)]

    def f(v: int, b: int, c: int) -> int:
        return min(max(round_shift(v * b, c), lo_out), hi_out)

    # clamp points for RESCALE's pre-clamp: the saturation points, and -2**31 + 1 on negated channels where that
    # changes no result (-(-2**31) leaves int32)
    clip = list(sat)
    for j, (b, c) in enumerate(zip(bl, cl, strict=True)):
        sj = clip[j]
        if b < 0 and sj is not None and f(INT32_MIN, b, c) == f(INT32_MIN + 1, b, c):
            clip[j] = (max(sj[0], INT32_MIN + 1), sj[1])
    norm = [_normalize(b, c) for b, c in zip(bl, cl, strict=True)]
    neg = any(b < 0 for b in bl)

    def rescale_ok(bounds: list[tuple[int, int]]) -> bool:
        for (_, s), b, (lo, hi) in zip(norm, bl, bounds, strict=True):
            vlo, vhi = (-hi, -lo) if b < 0 else (lo, hi)
            if s < 2 or vlo < -(1 << (s - 1)) or vhi >= (1 << (s - 1)) or (b < 0 and lo == INT32_MIN):
                return False
        return True

    raw = _channel_bounds(x.lo, x.hi, None, n)
    clamped = _channel_bounds(x.lo, x.hi, clip, n)

    def pre_clamp(v: T) -> T:
        v = g.cast(v, I32)
        los = [max(sa[0], INT32_MIN) if sa is not None else INT32_MIN for sa in clip]
        his = [min(sa[1], INT32_MAX) if sa is not None else INT32_MAX for sa in clip]
        if max(los) > v.lo:
            v = g.maximum(v, g.channels(los, I32, v.rank) if n > 1 else g.scalar(los[0], I32, v.rank))
        if min(his) < v.hi:
            v = g.minimum(v, g.channels(his, I32, v.rank) if n > 1 else g.scalar(his[0], I32, v.rank))
        return v

    def post(v: T) -> T:
        if out == I8:
            if v.dtype == I32:
                v = g.cast(g.clip32(v, lo_out, hi_out), I8)
            return g.clamp8(v, lo_out, hi_out)
        return g.clip32(v, lo_out, hi_out)

    for bounds, clamp in ((raw, False), (clamped, True)):
        if not rescale_ok(bounds):
            continue
        v = pre_clamp(x) if clamp else x
        if neg:
            v = g.cast(v, I32)
            signs = [-1 if b < 0 else 1 for b in bl]
            sign_t = g.channels(signs, I32, v.rank) if n > 1 else g.scalar(signs[0], I32, v.rank)
            vb = [(-hi, -lo) if b < 0 else (lo, hi) for b, (lo, hi) in zip(bl, bounds, strict=True)]
            v = g.mul(v, sign_t, 0, proven=(min(lo for lo, _ in vb), max(hi for _, hi in vb)))
        else:
            vb = bounds
        r = g.rescale(v, [m for m, _ in norm], [s for _, s in norm], I8 if out == I8 else I32, v_bounds=vb)
        g.requant_paths["clamp+RESCALE" if clamp else "RESCALE"] += 1
        return post(r)

    # MUL with a shift: round_shift of the exact 64-bit product, one MUL per distinct shift (the other channels'
    # multipliers are 0 there), summed; MUL REQUIREs each result to fit int32.  Where the interval does not prove
    # that, x is clamped strictly inside the saturation points (so every product result lies strictly inside
    # (lo_out, hi_out)) and the saturated positions are set by comparisons.
    v = g.cast(x, I32)
    res = [sorted((round_shift(lo * b, c), round_shift(hi * b, c))) for b, c, (lo, hi) in zip(bl, cl, raw, strict=True)]
    rlo, rhi = min(r[0] for r in res), max(r[1] for r in res)
    inner = rlo < INT32_MIN or rhi > INT32_MAX
    bm = list(bl)
    if inner:
        tl = [sa[0] if sa is not None else INT32_MIN for sa in sat]
        th = [sa[1] if sa is not None else INT32_MAX for sa in sat]
        bm = [0 if t1 + 1 > t2 - 1 else b for b, t1, t2 in zip(bl, tl, th, strict=True)]  # no interior: select only

        def per(vals: list[int]) -> T:
            vals = [min(max(t, INT32_MIN), INT32_MAX) for t in vals]
            return g.channels(vals, I32, v.rank) if n > 1 else g.scalar(vals[0], I32, v.rank)

        xc = g.minimum(g.maximum(v, per([t + 1 for t in tl])), per([t - 1 for t in th]))
        rlo, rhi = lo_out, hi_out
    else:
        xc = v
    total: T | None = None
    for c in sorted(set(cl)):
        bg = [b if cc == c else 0 for b, cc in zip(bm, cl, strict=True)]
        bt = g.channels(bg, I32, v.rank) if n > 1 else g.scalar(bg[0], I32, v.rank)
        # channels of other shifts give 0 here; every element of the sum is one channel's own result
        part = g.mul(xc, bt, c, proven=(min(rlo, 0), max(rhi, 0)))
        total = part if total is None else g.add(total, part, proven=(min(rlo, 0), max(rhi, 0)))
    assert total is not None
    if inner:
        zero = min(max(0, lo_out), hi_out)  # b = 0 channels: the result is clamp(0)
        at_lo = [zero if b == 0 else (hi_out if b < 0 else lo_out) for b in bl]  # value where x <= tl
        at_hi = [zero if b == 0 else (lo_out if b < 0 else hi_out) for b in bl]  # value where x >= th
        total = g.select(g.greater(per([t + 1 for t in tl]), v), per(at_lo), total)
        total = g.select(g.greater(v, per([t - 1 for t in th])), per(at_hi), total)
    g.requant_paths["MUL"] += 1
    return post(total)


def affine32(g: Graph, x: T, mult: np.ndarray, shift: np.ndarray, add: np.ndarray, q: int, where: str) -> T:
    """``clamp(round_shift(x * mult, shift) + add, -q, q)`` in int32 (``add`` broadcast over the trailing dims).

    The product is first clamped to ``[-q - max(add), q - min(add)]``, outside which the final clamp saturates
    anyway, so the sum stays in int32 whatever ``x`` is."""
    amin, amax = int(add.min()), int(add.max())
    lo_u, hi_u = -q - amax, q - amin
    if lo_u < INT32_MIN or hi_u > INT32_MAX:
        raise IvitError(f"tosa export: {where}: the added constants (up to {max(-amin, amax)}) leave no int32 headroom")
    u = requant(g, x, mult, shift, lo_u, hi_u, I32, where)
    a = g.const(add.reshape((1,) * (x.rank - add.ndim) + add.shape), I32)
    return g.clip32(g.add(u, a), -q, q)


def requant_affine(g: Graph, x: T, mult: np.ndarray, shift: np.ndarray, add: np.ndarray | None, bits: int,
                   where: str) -> T:
    """``clamp(round_shift(x * mult, shift) [+ add], -qmax, qmax)`` in the storage type of ``bits``."""
    q = ops.qmax(bits)
    st = stored_dtype(ops.storage_dtype(bits))
    if add is None:
        return g.cast(requant(g, x, mult, shift, -q, q, I8 if st == I8 else I32, where), st)
    return g.cast(affine32(g, x, mult, shift, add, q, where), st)


def floor_div(g: Graph, t: T, d: int) -> T:
    """``floor(t / d)`` for a constant ``d >= 1`` with ``INTDIV`` (which truncates toward zero)."""
    if d == 1:
        return t
    dv = g.scalar(d, I32, t.rank)
    if t.lo >= 0:
        return g.intdiv(t, dv)
    k = _ceil_div(-t.lo, d)  # t + k d >= 0, where truncation is floor; floor((t + k d) / d) - k = floor(t / d)
    if t.hi + k * d <= INT32_MAX:
        return g.add_k(g.intdiv(g.add_k(t, k * d), dv), -k)
    neg = g.greater(g.scalar(0, I32, t.rank), t)  # t < 0: floor(t / d) = trunc((t - d + 1) / d)
    return g.intdiv(g.select(neg, g.add_k(t, -(d - 1)), t), dv)


def isqrt_iterations() -> int:
    """Newton steps that reach ``floor(sqrt(v))`` from ``2**ceil(bitlen(v) / 2)`` for every ``0 <= v < 2**31``
    (``ops.isqrt``'s algorithm; checked exhaustively: at most 5 steps change ``k``)."""
    return 5


def isqrt(g: Graph, v: T) -> T:
    """``ops.isqrt`` for int32 ``0 <= v < 2**31``: fixed Newton steps from above (extra steps keep the fixed point)."""
    assert 0 <= v.lo and v.hi <= INT32_MAX
    bl = g.sub(g.scalar(32, I32, v.rank), g.clz(v))  # bitlen(v) in [0, 31]
    e = g.ars_k(g.add_k(bl, 1), 1)
    k = g.lls(g.scalar(1, I32, v.rank), e)  # 2**ceil(bitlen / 2) >= sqrt(v)
    one = g.scalar(1, I32, v.rank)
    kmax = k.hi
    for _ in range(isqrt_iterations()):
        quot = g.intdiv(v, g.maximum(k, one))
        # from above k >= floor(sqrt(v)) >= 1 (v >= 1), so v // k <= floor(sqrt(v)) + 2 <= 2**16 + 2 (v = 0: 0)
        quot = g.assume(quot, 0, kmax + 2)
        k = g.minimum(k, g.ars_k(g.add(k, quot), 1))
    return g.assume(k, 0, 46340)


def _i32(g: Graph, x: T) -> T:
    return g.cast(x, I32)


def _concat(g: Graph, parts: list[T], axis: int) -> T:
    """CONCAT (PRO-INT: int8/int32), widening int16 through int32."""
    if parts[0].dtype == I16:
        return g.cast(g.concat([g.cast(p, I32) for p in parts], axis), I16)
    return g.concat(parts, axis)


# ---------------------------------------------------------------------------------------------
# Input, linear algebra, requantization
# ---------------------------------------------------------------------------------------------

@_lower("patchify", ("RESHAPE", "TRANSPOSE"))
def _patchify(ctx: Ctx, x: T) -> T:
    # pixels are held as u - 128, which is exactly patchify's value: only the layout changes
    g, p = ctx.g, ctx.a("patch")
    b, c, h, w = x.shape
    t = g.reshape(x, (b, c, h // p, p, w // p, p))
    t = g.transpose(t, (0, 2, 4, 1, 3, 5))  # (B, gh, gw, C, p, p)
    return g.reshape(t, (b, (h // p) * (w // p), c * p * p))


def _gemm(g: Graph, a: T, b: T, a_zp: int, bound: int, out_shape: tuple[int, ...]) -> T:
    acc = g.matmul(a, b, a_zp, 0, bound)
    return g.reshape(acc, out_shape)


@_lower("linear", ("RESHAPE", "MATMUL", "ADD"))
def _linear(ctx: Ctx, x: T) -> T:
    g = ctx.g
    w = ctx.c("weight")
    n, k = w.shape
    m = int(np.prod(x.shape[:-1]))
    a = g.reshape(x, (1, m, k))
    wt = g.const(w.T.reshape(1, k, n), I8)
    acc = g.matmul(a, wt, 0, 0, k * ctx.ins[0].amax * int(np.abs(w).max(initial=0)))
    bias = ctx.c("bias")
    if bias is not None:
        acc = g.add(acc, g.const(bias.reshape(1, 1, n), I32))
    return g.reshape(acc, (*x.shape[:-1], n))


@_lower("matmul", ("RESHAPE", "TRANSPOSE", "MATMUL"))
def _matmul(ctx: Ctx, a: T, b: T) -> T:
    g = ctx.g
    tb = ctx.a("transpose_b")
    lead = a.shape[:-2]
    nb = int(np.prod(lead)) if lead else 1
    mm, k = a.shape[-2:]
    b3 = g.reshape(b, (nb, *b.shape[-2:]))
    if tb:
        b3 = g.transpose(b3, (0, 2, 1))
    n = b3.shape[2]
    uint8 = ctx.ins[0].dtype == torch.uint8  # held as u - 128: A_zp = -128 reads u back
    bound = k * ctx.ins[0].amax * ctx.ins[1].amax
    acc = g.matmul(g.reshape(a, (nb, mm, k)), b3, -128 if uint8 else 0, 0, bound)
    return g.reshape(acc, (*lead, mm, n))


@_lower("requantize", _REQ_OPS)
def _requantize(ctx: Ctx, x: T) -> T:
    return requant_affine(ctx.g, x, ctx.c("mult"), ctx.c("shift"), None, ctx.a("bits"), ctx.where)


@_lower("add_requantize", _REQ_OPS)
def _add_requantize(ctx: Ctx, a: T, b: T) -> T:
    g = ctx.g
    ya = requant(g, a, ctx.c("mult_a"), ctx.c("shift_a"), INT32_MIN, INT32_MAX, I32, ctx.where)
    yb = requant(g, b, ctx.c("mult_b"), ctx.c("shift_b"), INT32_MIN, INT32_MAX, I32, ctx.where)
    # the op set proves each branch and their sum within +-2**30
    bits = ctx.a("bits")
    q = ops.qmax(bits)
    return g.cast(g.clip32(g.add(ya, yb), -q, q), stored_dtype(ops.storage_dtype(bits)))


@_lower("add_const", ("CAST", "ADD"))
def _add_const(ctx: Ctx, x: T) -> T:
    g = ctx.g
    k = ctx.c("const")
    return g.add(_i32(g, x), g.const(k.reshape((1,) * (x.rank - k.ndim) + k.shape), I32))


@_lower("embed", _REQ_OPS + ("TILE", "CONCAT"))
def _embed(ctx: Ctx, x: T) -> T:
    g = ctx.g
    bits = ctx.a("bits")
    q = ops.qmax(bits)
    b = x.shape[0]
    tok = affine32(g, x, ctx.c("mult"), ctx.c("shift"), ctx.c("pos"), q, ctx.where)  # (B, L, C) int32
    prefix = ctx.c("prefix")
    if prefix is not None:  # class token rows, clamped like the rest
        pre = g.const(np.clip(prefix, -q, q).reshape(1, *prefix.shape), I32)
        tok = g.concat([g.tile(pre, (b, 1, 1)), tok], 1)
    return g.cast(tok, stored_dtype(ops.storage_dtype(bits)))


# ---------------------------------------------------------------------------------------------
# I-LayerNorm (32-bit)
# ---------------------------------------------------------------------------------------------

@_lower("layernorm32", _REQ_OPS + ("REDUCE_SUM", "SUB", "INTDIV", "ABS", "REDUCE_MAX", "CLZ", "ARITHMETIC_RIGHT_SHIFT",
                                   "LOGICAL_LEFT_SHIFT"))
def _layernorm32(ctx: Ctx, x: T) -> T:
    g = ctx.g
    r = x.rank
    c = x.shape[-1]
    xi = _i32(g, x)
    s = g.reduce_sum(xi, r - 1)  # (..., 1), |s| <= 8192 * 2**15
    mean = g.assume(floor_div(g, g.add_k(s, c >> 1), c), x.lo, x.hi)  # a rounded mean lies within the values
    y = g.sub(xi, mean)
    bc = ops._ln_bits(c)  # B_C
    k = g.maximum(g.sub(g.scalar(32 - bc, I32, r), g.clz(g.reduce_max(g.abs(y), r - 1))), g.scalar(0, I32, r))
    kmax = k.hi
    # bitlen(max|y|) <= B_C + k, so |y| < 2**(B_C + k) and -2**B_C <= y >> k < 2**B_C; 0 <= r < 2**k
    yp = g.assume(g.ars(y, k, False), -(1 << bc), (1 << bc) - 1)
    rem = g.assume(g.sub(y, g.lls(yp, k)), 0, (1 << kmax) - 1)
    a = g.reduce_sum(g.mul(yp, rem), r - 1)
    qq = g.reduce_sum(g.mul(rem, rem), r - 1)
    # sum(y'**2) < C * 2**(2 B_C) <= 2**31 (the y' of one row cannot all be -2**B_C: they sum to about 0)
    sq = g.reduce_sum(g.mul(yp, yp), r - 1, proven=(0, INT32_MAX))
    # V = floor(sum(y**2) / 4**k) < 2**31 (ops.ilayernorm32)
    v = g.add(sq, g.ars(g.add(g.add(a, a), g.ars(qq, k, False)), k, False), proven=(0, INT32_MAX))
    std = isqrt(g, v)
    f = g.ars(g.intdiv(g.scalar(INT32_MAX, I32, r), g.maximum(std, g.scalar(1, I32, r))), k, False)
    # z = round_shift(y * F, 11): MUL's exact 64-bit product; |z| <= 2**21 (ops.ilayernorm32)
    z = g.mul(y, f, 31 - ops.LN_Z_BITS, proven=(-(1 << 21), 1 << 21))
    off = ctx.c("offset").reshape(-1)
    off = np.broadcast_to(off, (c,)) if off.size == 1 else off
    return requant_affine(g, z, ctx.c("mult"), ctx.c("shift"), off, ctx.a("bits"), ctx.where)


# ---------------------------------------------------------------------------------------------
# Shiftmax-rel, attention normalization, ShiftGELU
# ---------------------------------------------------------------------------------------------

def _mask_cond(ctx: Ctx, x: T) -> tuple[T, tuple[int, ...]] | None:
    """The mask as a bool constant ``(1, nW, 1, N, N)`` and the 5-D view ``(B, nW, H, N, N)`` of the scores
    ``(B * nW, H, N, N)`` (window ``w`` of image ``b`` is row ``b * nW + w``, ``ivit.ir.opset.expand_window_mask``)."""
    mask = ctx.consts.get("mask")
    if mask is None:
        return None
    m = mask.detach().cpu().numpy().astype(bool)
    nw, n = m.shape[0], m.shape[-1]
    return ctx.g.const(m.reshape(1, nw, 1, n, n), BOOL), (x.shape[0] // nw, nw, x.shape[1], n, n)


def _shiftmax_rel_core(ctx: Ctx, x: T, x0: int) -> T:
    g = ctx.g
    xi = _i32(g, x)
    mk = _mask_cond(ctx, xi)
    if mk is not None:
        xi = g.reshape(xi, mk[1])
    r = xi.rank
    zero = g.scalar(0, I32, r)
    src = xi
    if mk is not None:  # masked positions may not win the row maximum: fill with the smallest possible score
        src = g.select(mk[0], g.scalar(xi.lo, I32, r), xi)
    d = g.minimum(g.sub(xi, g.reduce_max(src, r - 1)), zero)
    # d <= 0 gives d >> 1 <= d >> 4 <= 0, so I_p <= d <= 0
    xp = g.assume(g.sub(g.add(d, g.ars_k(d, 1)), g.ars_k(d, 4)), d.lo + (d.lo >> 1), 0)
    xp = g.maximum(xp, g.scalar(ops._REL_QMAX * x0, I32, r))
    x0t = g.scalar(x0, I32, r)
    q = g.intdiv(xp, x0t)  # xp <= 0 and x0 < 0: the quotient is >= 0, so truncation is floor; q in [0, 9]
    rem = g.assume(g.sub(xp, g.mul(q, x0t)), x0 + 1, 0)  # r = xp - q x0 in (x0, 0]
    e = g.sub(g.ars_k(rem, 1), x0t)  # (r >> 1) - x0 in (0, |x0|]
    mult = (255 << ops._REL_MULT_SHIFT) // (-x0)
    em = g.mul(e, g.scalar(mult, I32, r))  # <= 255 * 2**22 < 2**30
    p = g.ars(em, g.add_k(q, ops._REL_MULT_SHIFT), True)  # round half up by 22 + q in [22, 31]
    p = g.minimum(p, g.scalar(255, I32, r))
    if mk is not None:
        p = g.reshape(g.select(mk[0], zero, p), x.shape)
    return p


@_lower("shiftmax_rel", ("CAST", "RESHAPE", "SELECT", "REDUCE_MAX", "SUB", "MINIMUM", "ADD",
                         "ARITHMETIC_RIGHT_SHIFT", "MAXIMUM", "INTDIV", "MUL", "RESCALE"))
def _shiftmax_rel(ctx: Ctx, x: T) -> T:
    p = _shiftmax_rel_core(ctx, x, ctx.a("x0"))
    return ctx.g.rescale(p, [1 << 30], [30], I8, out_zp=-128)  # uint8 p held as p - 128


@_lower("attn_normalize", ("CAST", "REDUCE_SUM", "ADD", "MAXIMUM", "INTDIV", "MUL"))
def _attn_normalize(ctx: Ctx, acc: T, p: T) -> T:
    g = ctx.g
    r = p.rank
    n = p.shape[-1]
    total = g.add_k(g.reduce_sum(_i32(g, p), r - 1), 128 * n)  # sum of (p - 128) + 128 N
    total = g.maximum(total, g.scalar(1, I32, r))
    rr = g.intdiv(g.scalar(1 << ops._NORM_NUM_BITS, I32, r), total)
    # acc = p @ v with int8 v: |acc| <= 128 P, so |round_shift(acc R, 14)| <= 2**23 (ops.attn_normalize)
    bound = 128 << ops.CTX_FRAC_BITS
    return g.mul(acc, rr, ops._NORM_NUM_BITS - ops.CTX_FRAC_BITS, proven=(-bound, bound))


@_lower("shiftgelu", ("CAST", "ADD", "RESHAPE", "GATHER"))
def _shiftgelu(ctx: Ctx, x: T) -> T:
    # an elementwise function of one int8: the reference op evaluated at all 256 values, looked up by GATHER
    g = ctx.g
    table = OPSET["shiftgelu"].reference(torch.arange(-128, 128, dtype=torch.int8), **ctx.attrs)
    vals = g.const(table.to(torch.int64).numpy().reshape(1, 256, 1), I32)
    idx = g.reshape(g.add_k(_i32(g, x), 128), (1, int(np.prod(x.shape))))
    return g.reshape(g.gather(vals, idx), x.shape)


# ---------------------------------------------------------------------------------------------
# Data movement and pooling
# ---------------------------------------------------------------------------------------------

@_lower("slice", ("SLICE",))
def _slice(ctx: Ctx, x: T) -> T:
    d = ctx.a("dim") % x.rank
    return ctx.g.slice_axis(x, d, ctx.a("start"), ctx.a("end"))


@_lower("reshape", ("RESHAPE",))
def _reshape(ctx: Ctx, x: T) -> T:
    return ctx.g.reshape(x, ctx.shape(ctx.out))


@_lower("permute", ("TRANSPOSE",))
def _permute(ctx: Ctx, x: T) -> T:
    return ctx.g.transpose(x, ctx.a("perm"))


@_lower("roll", ("SLICE", "CONCAT", "CAST"))
def _roll(ctx: Ctx, x: T) -> T:
    g = ctx.g
    for s, d in zip(ctx.a("shifts"), ctx.a("dims"), strict=True):
        d %= x.rank
        n = x.shape[d]
        s %= n
        if s:  # out[j] = x[(j - s) mod n]
            x = _concat(g, [g.slice_axis(x, d, n - s, n), g.slice_axis(x, d, 0, n - s)], d)
    return x


@_lower("pad", ("PAD",))
def _pad(ctx: Ctx, x: T) -> T:
    pads = list(ctx.a("pads"))
    per = [(0, 0)] * x.rank
    for i in range(len(pads) // 2):
        per[x.rank - 1 - i] = (pads[2 * i], pads[2 * i + 1])
    zero = -128 if ctx.ins[0].dtype == torch.uint8 else 0  # uint8 0 is held as -128
    return ctx.g.pad(x, per, zero)


@_lower("select", ("SLICE", "RESHAPE"))
def _select(ctx: Ctx, x: T) -> T:
    d = ctx.a("dim") % x.rank
    i = ctx.a("index") % x.shape[d]
    t = ctx.g.slice_axis(x, d, i, i + 1)
    return ctx.g.reshape(t, x.shape[:d] + x.shape[d + 1:])


@_lower("mean", ("CAST", "REDUCE_SUM", "ADD", "INTDIV", "GREATER", "SELECT", "RESHAPE", "ARITHMETIC_RIGHT_SHIFT",
                 "LOGICAL_LEFT_SHIFT", "SUB", "MUL"))
def _mean(ctx: Ctx, x: T) -> T:
    g = ctx.g
    d = ctx.a("dim") % x.rank
    n = x.shape[d]
    xi = _i32(g, x)
    if 2 * n * x.amax + n <= INT32_MAX:
        s = g.reduce_sum(xi, d)
        # floor((2 s + n) / (2 n)); for even n that is floor((s + n/2) / n)
        m = floor_div(g, g.add_k(s, n // 2), n) if n % 2 == 0 else floor_div(g, g.add_k(g.add(s, s), n), 2 * n)
    elif n <= 8192:
        # the sum may leave int32: x = 2**16 h + l (0 <= l < 2**16), S_h = n a + b (0 <= b < n), and
        # floor((2 S + n) / (2 n)) = 2**16 a + floor((2**17 b + 2 S_l + n) / (2 n)), every term within int32
        h = g.ars_k(xi, 16)
        sixteen = g.scalar(16, I32, x.rank)
        lo16 = g.sub(xi, g.lls(h, sixteen), proven=(0, (1 << 16) - 1))
        sh, sl = g.reduce_sum(h, d), g.reduce_sum(lo16, d)
        a = g.assume(floor_div(g, sh, n), h.lo, h.hi)  # floor of a mean of the h values
        b = g.assume(g.sub(sh, g.mul(a, g.scalar(n, I32, x.rank))), 0, n - 1)
        num = g.add_k(g.add(g.mul(b, g.scalar(1 << 17, I32, x.rank)), g.add(sl, sl)), n)
        m = g.add(g.lls(a, sixteen), g.intdiv(num, g.scalar(2 * n, I32, x.rank)), proven=(x.lo, x.hi))
    else:
        raise ctx.fail(f"a mean over {n} int32 values is not supported (at most 8192)")
    m = g.assume(m, x.lo, x.hi)  # a mean lies within the values
    return g.cast(g.reshape(m, x.shape[:d] + x.shape[d + 1:]), x.dtype)


# ---------------------------------------------------------------------------------------------
# Fused ops
# ---------------------------------------------------------------------------------------------

def _infer(op: str, ins: list[TType], consts: dict[str, Tensor], attrs: dict[str, Any],
           producers: Sequence[Any] = (), names: Sequence[str] = ()) -> TType:
    return OPSET[op].infer(Check(f"op {op}", ins, consts, attrs, producers, names))


def _sub(ctx: Ctx, op: str, args: list[T], ins: list[TType], consts: dict[str, Tensor], attrs: dict[str, Any],
         producers: Sequence[Any] = (), names: Sequence[str] = ()) -> tuple[T, TType]:
    """Lower op ``op`` inside a fused op; returns its tensor (interval narrowed to the inferred type) and type."""
    out_t = _infer(op, ins, consts, attrs, producers, names)
    sub = Ctx(ctx.g, attrs, consts, ins, out_t, ctx.batch, f"{ctx.where} > {op}")
    y = LOWERINGS[op](sub, *args)
    lo, hi = stored_range(out_t)
    return ctx.g.assume(y, lo, hi), out_t


@_lower("attention", _REQ_OPS + ("MATMUL", "RESHAPE", "TRANSPOSE", "REDUCE_MAX", "SUB", "ARITHMETIC_RIGHT_SHIFT",
                                 "INTDIV", "REDUCE_SUM"))
def _attention(ctx: Ctx, q: T, k: T, v: T) -> T:
    if ctx.a("probs") != PROBS_REL8:
        raise ctx.fail(f"attention with probs=0 (Shiftmax) cannot be lowered: {LEGACY_REASON}")
    tq, tk, tv = ctx.ins
    s, ts = _sub(ctx, "matmul", [q, k], [tq, tk], {}, {"transpose_b": 1})
    if "bias" in ctx.consts:
        s, ts = _sub(ctx, "add_const", [s], [ts], {"const": ctx.consts["bias"]}, {})
    s, ts = _sub(ctx, "requantize", [s], [ts], {"mult": ctx.consts["score_mult"], "shift": ctx.consts["score_shift"]},
                 {"bits": ctx.a("score_bits")})
    mconst = {"mask": ctx.consts["mask"]} if "mask" in ctx.consts else {}
    p, tp = _sub(ctx, "shiftmax_rel", [s], [ts], mconst, {"x0": ctx.a("x0")})
    acc, tacc = _sub(ctx, "matmul", [p, v], [tp, tv], {}, {"transpose_b": 0})
    prod = Node("matmul", ("p", "v"), "acc", {}, {"transpose_b": 0})
    out, _ = _sub(ctx, "attn_normalize", [acc, p], [tacc, tp], {}, {}, [prod, None], ["acc", "p"])
    return out


@_lower("requantize_table", _REQ_OPS + ("TABLE",))
def _requantize_table(ctx: Ctx, x: T) -> T:
    g = ctx.g
    # RESCALE saturates to [-128, 127]; our clamp is [-127, 127], so entry -128 repeats entry -127
    y = requant(g, x, ctx.c("mult"), ctx.c("shift"), -128, 127, I8, ctx.where)
    table = ctx.c("table").reshape(-1).copy()
    table[0] = table[1]
    return g.table(y, table)

