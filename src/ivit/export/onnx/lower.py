"""One ONNX lowering per op of the op set (``ivit.ir.opset.OPSET``), fused ops included.

A lowering ``fn(ctx, *inputs) -> output`` appends integer ONNX nodes to ``ctx.g`` that compute the op's
reference semantics exactly (``ivit.ops``) on the ONNX values ``inputs`` and returns the ONNX value of
the op's output, in the op's storage dtype.  Fused ops call the lowerings of the ops they fuse, so each
op's arithmetic is written once.

Working types: int64 wherever the specification has 64-bit intermediates (requantization products,
ShiftExp sums, I-LayerNorm products); int32 wherever the intervals allow (``shiftmax_rel`` throughout,
I-LayerNorm means, every clamp after a requantizing shift); int8/uint8/int16 only for data movement,
``Cast`` and ``MatMulInteger``.  ``graph.Graph`` makes floor
divisions, shifts and rounding exact and refuses any op whose interval could leave its dtype; the
bounds a lowering asserts with ``assume``/``proven`` are the ones ``ivit.ops`` proves (cited inline).

GEMMs (``gemm`` option): ``"u8u8"`` (default) lifts both int8 operands to uint8 with zero point 128, which
ONNX Runtime computes exactly on every CPU; ``"u8s8"`` keeps int8 weights (faster on AVX512-VNNI/AVX-VNNI
and ARM, but ONNX Runtime's AVX2 u8s8 kernel may saturate 16-bit pair sums on other x86 CPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ... import ops
from ...ir.opset import OPSET, PROBS_REL8
from ...ir.types import TType
from .graph import BOOL, I8, I16, I32, I64, U8, Graph, OverflowRisk, np_dtype

__all__ = ["Ctx", "LOWERINGS", "lowering_table", "ONNX_OPS_BY_OP", "GEMM_MODES"]

GEMM_MODES = ("u8u8", "u8s8")


@dataclass
class Ctx:
    """What a lowering sees of one program node: the graph, attributes, constants, input types, options."""

    g: Graph
    attrs: dict[str, Any]
    consts: dict[str, Tensor]
    ins: list[TType]
    options: dict[str, Any] = field(default_factory=dict)

    def a(self, name: str, default: Any = None) -> Any:
        v = self.attrs.get(name, default)
        return int(v) if isinstance(v, bool) else v

    def c(self, name: str, dtype: Any = np.int64) -> np.ndarray | None:
        t = self.consts.get(name)
        return None if t is None else t.detach().cpu().numpy().astype(dtype)

    def sub(self, attrs: dict[str, Any], consts: dict[str, Tensor], ins: list[TType]) -> Ctx:
        """The context of an op inside a fused op."""
        return Ctx(self.g, attrs, consts, ins, self.options)


Lowering = Callable[..., str]
LOWERINGS: dict[str, Lowering] = {}
#: the ONNX ops each lowering emits (for the README table and the tests)
ONNX_OPS_BY_OP: dict[str, tuple[str, ...]] = {}


def _lower(name: str, onnx_ops: tuple[str, ...]) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        if name not in OPSET:
            raise KeyError(f"lowering for unknown op {name!r}")
        LOWERINGS[name] = fn
        ONNX_OPS_BY_OP[name] = tuple(dict.fromkeys(onnx_ops))
        return fn
    return deco


def lowering_table() -> dict[str, Lowering]:
    return dict(LOWERINGS)


def _storage(bits: int) -> np.dtype:
    return np_dtype(ops.storage_dtype(bits))


_REQ = ("Cast", "Mul", "Add", "BitShift", "Sub", "Clip", "Mod", "Div")  # round_shift of a product, clamped


def _requant(g: Graph, x: str, mult: np.ndarray, shift: np.ndarray) -> str:
    """``round_shift(int64(x) * mult, shift)`` (unclamped; int32 where its interval fits, else int64);
    ``mult``/``shift`` broadcast on the last dim."""
    return g.round_shift(g.mul(g.cast(x, I64), mult.astype(np.int64)), shift.astype(np.int64), narrow=True)


def _clamp_store(g: Graph, v: str, bits: int) -> str:
    m = ops.qmax(bits)
    return g.store(g.clip(v, -m, m), _storage(bits))


def _add_table(g: Graph, v: str, arr: np.ndarray) -> str:
    """``v + arr`` for an int32 constant ``arr``, in int64 where an int32 sum could overflow."""
    (lo, hi), i32 = g.lohi(v), np.iinfo(np.int32)
    if g.dtype(v) == I32 and (lo + int(arr.min()) < i32.min or hi + int(arr.max()) > i32.max):
        v = g.cast(v, I64)
    return g.add(v, arr.astype(g.dtype(v)))


def _gemm(ctx: Ctx, a: str, b: str | np.ndarray, k: int) -> str:
    """``MatMulInteger`` of int8/uint8 ``a (..., M, K)`` and int8 ``b (..., K, N)`` (a value or a constant) -> int32."""
    g = ctx.g
    mode = ctx.options.get("gemm", "u8u8")
    alo, ahi = g.lohi(a)
    blo, bhi = (int(b.min()), int(b.max())) if isinstance(b, np.ndarray) else g.lohi(b)
    bound = k * max(abs(alo), abs(ahi)) * max(abs(blo), abs(bhi))
    if bound > 2**31 - 1:  # validation proves this bound for every GEMM of a valid program
        raise OverflowRisk(f"{g.scope}: int32 GEMM accumulator bound {bound}")
    au, za = g.to_u8(a)
    if isinstance(b, np.ndarray):
        bv, zb = ((g.const((b.astype(np.int16) + 128).astype(np.uint8), U8), 128) if mode == "u8u8"
                  else (g.const(b, I8), 0))
    else:
        bv, zb = g.to_u8(b) if mode == "u8u8" else (b, 0)
    inputs = [au, bv]
    if za or zb:
        inputs.append(g.const(za, U8) if za else "")
    if zb:
        inputs.append(g.const(zb, U8))
    return g.op("MatMulInteger", inputs, I32, (-bound, bound))  # exact: validation bounds |acc| < 2**31


# ---------------------------------------------------------------------------------------------
# Input, linear algebra, requantization
# ---------------------------------------------------------------------------------------------

@_lower("patchify", ("Reshape", "Transpose", "Cast", "Sub"))
def _patchify(ctx: Ctx, x: str) -> str:
    g = ctx.g
    p = ctx.a("patch")
    _, ch, h, w = ctx.ins[0].shape
    v = g.op("Reshape", [x, g.const([0, ch, h // p, p, w // p, p])], U8, g.lohi(x))  # (B, C, gh, p, gw, p)
    v = g.op("Transpose", [v], U8, g.lohi(x), perm=[0, 2, 4, 1, 3, 5])  # (B, gh, gw, C, p, p)
    u = g.op("Reshape", [v, g.const([0, (h // p) * (w // p), ch * p * p])], U8, g.lohi(x))  # (B, L, C*p*p)
    out = g.cast(g.sub(g.cast(u, I16), 128), I8)  # p - 128
    g.u8_twin[out] = (u, 128)  # a GEMM takes the pixels themselves with zero point 128
    return out


@_lower("linear", ("MatMulInteger", "Cast", "Add"))
def _linear(ctx: Ctx, x: str) -> str:
    g = ctx.g
    wt = np.ascontiguousarray(ctx.c("weight", np.int8).T)  # (K, N)
    acc = _gemm(ctx, x, wt, wt.shape[0])
    bias = ctx.c("bias", np.int32)
    return acc if bias is None else g.add(acc, bias)


@_lower("matmul", ("Transpose", "MatMulInteger", "Cast", "Add"))
def _matmul(ctx: Ctx, a: str, b: str) -> str:
    g = ctx.g
    bt = ctx.ins[1]
    if ctx.a("transpose_b", 0):
        r = bt.rank
        b = g.op("Transpose", [b], I8, g.lohi(b), perm=[*range(r - 2), r - 1, r - 2])
    return _gemm(ctx, a, b, ctx.ins[0].shape[-1])


@_lower("requantize", _REQ)
def _requantize(ctx: Ctx, x: str) -> str:
    v = _requant(ctx.g, x, ctx.c("mult"), ctx.c("shift"))
    return _clamp_store(ctx.g, v, ctx.a("bits"))


@_lower("add_requantize", _REQ)
def _add_requantize(ctx: Ctx, a: str, b: str) -> str:
    g = ctx.g
    va = _requant(g, a, ctx.c("mult_a"), ctx.c("shift_a"))
    vb = _requant(g, b, ctx.c("mult_b"), ctx.c("shift_b"))
    va, vb = g.widen(va, vb)
    return _clamp_store(g, g.add(va, vb), ctx.a("bits"))  # validated: |va| + |vb| <= 2**30


@_lower("add_const", ("Cast", "Add"))
def _add_const(ctx: Ctx, x: str) -> str:
    g = ctx.g  # validation bounds |x| + |const| < 2**31: an int32 add is exact
    return g.add(g.cast(x, I32), ctx.c("const", np.int32))


@_lower("embed", (*_REQ, "Shape", "Concat", "Expand"))
def _embed(ctx: Ctx, x: str) -> str:
    g = ctx.g
    tok = _add_table(g, _requant(g, x, ctx.c("mult"), ctx.c("shift")), ctx.c("pos"))  # (B, L, C)
    dt = g.dtype(tok)
    prefix = ctx.c("prefix")
    if prefix is not None:
        n_pre, ch = prefix.shape
        pre_c = g.const(prefix[None], dt)
        batch = g.op("Shape", [x], I64, start=0, end=1)  # (1,)
        shape = g.op("Concat", [batch, g.const([n_pre, ch])], I64, axis=0)
        pre = g.op("Expand", [pre_c, shape], dt, g.lohi(pre_c))  # (B, P, C)
        lo, hi = g.lohi(tok)
        tok = g.op("Concat", [pre, tok], dt, (min(lo, int(prefix.min())), max(hi, int(prefix.max()))), axis=1)
    return _clamp_store(g, tok, ctx.a("bits"))


# ---------------------------------------------------------------------------------------------
# I-LayerNorm
# ---------------------------------------------------------------------------------------------

_LN = ("Cast", "ReduceSum", "Mul", "Add", "Div", "Sub", "Unsqueeze", "GreaterOrEqual", "Gather", "Max", "Min",
       "BitShift", "Clip")


def _ln_out(ctx: Ctx, z: str) -> str:
    """``clamp(round_shift(z * b, c) + offset)`` -> storage dtype."""
    g = ctx.g
    out = g.round_shift(g.mul(z, ctx.c("mult")), ctx.c("shift"), narrow=True)
    return _clamp_store(g, _add_table(g, out, ctx.c("offset")), ctx.a("bits"))


def _ln_center(g: Graph, x: str, c: int, rounded: bool) -> str:
    """``y = I - mean`` with the round-half-up row mean ``floor((2 s + C) / 2C)`` (``ilayernorm``) or
    ``floor((s + C // 2) / C)`` (``ilayernorm32``; the same integer).  int32 (``|I| < 2**15``, ``C <= 8192``:
    ``|s| < 2**28``, ``|y| < 2**16``), returned as int64."""
    xi = g.cast(x, I32)
    s = g.reduce_sum(xi, [-1], c)
    if rounded:
        mean = g.floor_div(g.add(g.mul(s, 2), c), 2 * c)
    else:
        mean = g.floor_div(g.add(s, c >> 1), c)
    return g.sub(xi, mean)


@_lower("layernorm", _LN)
def _layernorm(ctx: Ctx, x: str) -> str:
    g = ctx.g
    c = ctx.ins[0].shape[-1]
    y = g.cast(_ln_center(g, x, c, rounded=True), I64)
    var = g.reduce_sum(g.square(y), [-1], c)  # < 2**45
    std = g.isqrt(var, 62)
    factor = g.div_nonneg_quotient(g.const(ops.INT32_MAX), g.maximum(std, 1))
    z = g.shift_right(g.mul(y, factor), 31 - ops.LN_Z_BITS)  # arithmetic >> 11
    z = g.assume(z, -(1 << ops.LN_Z_BITS), 1 << ops.LN_Z_BITS)  # ops.ilayernorm: |y| <= std gives |z| <= 2**20
    return _ln_out(ctx, z)


@_lower("layernorm32", (*_LN, "ReduceMax", "Abs"))
def _layernorm32(ctx: Ctx, x: str) -> str:
    g = ctx.g
    c = ctx.ins[0].shape[-1]
    b_c = (31 - max(0, (c - 1).bit_length())) // 2  # ops._ln_bits
    y32 = _ln_center(g, x, c, rounded=False)  # |y| < 2**16
    amax = g.cast(g.reduce_max(g.abs(y32), [-1]), I64)
    y = g.cast(y32, I64)
    k = g.maximum(g.sub(g.bit_length(amax, 17), b_c), 0)  # (.., 1) in [0, 17 - B_C]
    # ops.ilayernorm32 step 3 computes, in 32-bit pieces, V = floor(sum(y**2) / 4**k) exactly; in int64 it is
    # that formula itself (sum(y**2) < 2**45)
    var = g.shift_right(g.reduce_sum(g.square(y), [-1], c), g.mul(k, 2))
    var = g.assume(var, 0, 1 << 31)  # ops.ilayernorm32: V < 2**31
    std = g.isqrt(var, 32)
    f = g.shift_right(g.div_nonneg_quotient(g.const(ops.INT32_MAX), g.maximum(std, 1)), k)
    z = g.round_shift(g.mul(y, f), 31 - ops.LN_Z_BITS)
    z = g.assume(z, -(1 << 21), 1 << 21)  # ops.ilayernorm32: |z| <= 2**21
    return _ln_out(ctx, z)


# ---------------------------------------------------------------------------------------------
# Shiftmax, ShiftGELU
# ---------------------------------------------------------------------------------------------

def _mask_apply(ctx: Ctx, x: str, mask: np.ndarray, fill: int) -> str:
    """``where(mask, fill, x)`` for scores ``x`` ``(B*nW, H, N, N)`` and ``mask`` ``(nW, N, N)``: window ``w`` of image
    ``b`` (row ``b*nW + w``) uses ``mask[w]`` (``ivit.ir.opset.expand_window_mask``)."""
    g = ctx.g
    dt = g.dtype(x)
    nw, n, _ = mask.shape
    h = ctx.ins[0].shape[1]
    x5 = g.op("Reshape", [x, g.const([-1, nw, h, n, n])], dt, g.lohi(x))  # (B, nW, H, N, N)
    y = g.where(g.const(mask.reshape(1, nw, 1, n, n), BOOL), fill, x5, dt)
    return g.op("Reshape", [y, g.const([-1, h, n, n])], dt, g.lohi(y))  # (B*nW, H, N, N)


def _exp_parts(g: Graph, xd: str, x0: int, n: int) -> tuple[str, str]:
    """ShiftExp of ``xd <= 0`` up to its final shift: ``(q, e)`` with ``q = floor(I_p / x0)`` in ``[0, n]`` and
    ``e = (r >> 1) - x0`` in ``[1, |x0|]`` (``ops.shift_exp`` steps 1-4; ``ops.shiftmax_rel`` steps 2-4)."""
    xp = g.log2e_mul(xd)  # I + (I >> 1) - (I >> 4), <= 0 for I <= 0
    xp = g.maximum(xp, n * x0)
    q = g.div_nonneg_quotient(xp, x0)  # xp <= 0, x0 < 0: a non-negative quotient, truncation = floor
    r = g.assume(g.sub(xp, g.mul(q, x0)), x0 + 1, 0)  # xp - q * x0 in (x0, 0]
    return q, g.sub(g.shift_right(r, 1), x0)


@_lower("shiftmax", ("Cast", "Reshape", "Where", "ReduceMax", "ReduceSum", "Sub", "Add", "BitShift", "Div", "Mul",
                     "Max", "Min"))
def _shiftmax(ctx: Ctx, x: str) -> str:
    g = ctx.g
    x0, n, k_out = ctx.a("x0"), ctx.a("n"), ctx.a("k_out")
    n_tok = ctx.ins[0].shape[-1]
    mask = ctx.c("mask", np.bool_)
    xi = g.cast(x, I64)
    if mask is not None:
        xi = _mask_apply(ctx, xi, mask, -(2**40))
    xd = g.minimum(g.sub(xi, g.reduce_max(xi, [-1])), 0)
    q, e = _exp_parts(g, xd, x0, n)
    e = g.shift_left_nonneg(e, g.rsub(n, q))  # E = e << (n - q) <= |x0| * 2**n
    if mask is not None:
        e = _mask_apply(ctx, e, mask, 0)
    total = g.maximum(g.reduce_sum(e, [-1], n_tok), 1)  # <= N |x0| 2**n <= 2**62 (validated)
    factor = g.div_nonneg_quotient(g.const(ops.DIV_NUM), total)
    prod = g.mul(e, factor, proven=(0, ops.DIV_NUM))  # ops.shiftmax: e <= sum(E) gives e * factor <= 2**62 - 1
    out = g.round_shift(prod, 63 - k_out, narrow=True)
    return g.cast(g.minimum(out, ops.qmax(k_out)), _storage(k_out))


@_lower("shiftmax_rel", ("Cast", "Reshape", "Where", "ReduceMax", "Sub", "Add", "BitShift", "Div", "Mul", "Max",
                         "Min"))
def _shiftmax_rel(ctx: Ctx, x: str) -> str:
    """int32 throughout (``|x| < 2**24``, ``|x0| <= 2**27``).  Masked positions enter the row max as
    ``-2**24`` (below every real score, so the max of a partially masked row is that of its unmasked
    scores, as in the reference) and leave as 0."""
    g = ctx.g
    x0 = ctx.a("x0")
    mask = ctx.c("mask", np.bool_)
    xi = g.cast(x, I32)
    xm = xi if mask is None else _mask_apply(ctx, xi, mask, -(2**24))
    d = g.minimum(g.sub(xi, g.reduce_max(xm, [-1])), 0)  # |d| < 2**25
    q, e = _exp_parts(g, d, x0, ops._REL_QMAX)
    m = (255 << ops._REL_MULT_SHIFT) // (-x0)
    # p = round_shift(e * M, 22 + q): e * M <= 255 * 2**22 and 2**(21 + q) <= 2**30, so every term fits uint32
    half = g.shift_left_nonneg(g.const(1 << (ops._REL_MULT_SHIFT - 1), I32), q)
    p = g.shift_right(g.add(g.mul(e, m), half), g.add(q, ops._REL_MULT_SHIFT))
    p = g.minimum(p, 255)
    if mask is not None:
        p = _mask_apply(ctx, p, mask, 0)
    return g.cast(p, U8)


@_lower("attn_normalize", ("MatMulInteger", "Max", "Div", "Cast", "Mul", "Add", "BitShift", "Sub"))
def _attn_normalize(ctx: Ctx, acc: str, p: str) -> str:
    g = ctx.g
    n_tok = ctx.ins[1].shape[-1]
    # row sums P <= 255 N as a GEMM with a column of ones (faster in ONNX Runtime than an integer ReduceSum)
    rows = g.op("MatMulInteger", [p, g.const(np.ones((n_tok, 1), np.uint8), U8)], I32, (0, 255 * n_tok))
    total = g.maximum(rows, 1)
    r = g.cast(g.div_nonneg_quotient(g.const(1 << ops._NORM_NUM_BITS, I32), total), I64)
    # ops.attn_normalize: |acc| <= 128 P, so |acc * R| <= 2**37 and |out| <= 2**23
    prod = g.mul(g.cast(acc, I64), r, proven=(-(2**37), 2**37))
    out = g.round_shift(prod, ops._NORM_NUM_BITS - ops.CTX_FRAC_BITS, narrow=True)
    return g.cast(out, I32)


def _rolled_table(values: Tensor) -> np.ndarray:
    """A 256-entry table indexed by an int8 value ``v`` itself (``GatherElements``: negative indices count from
    the end): entry ``v mod 256`` holds ``values[v + 128]``."""
    t = values.detach().cpu().numpy()
    return np.ascontiguousarray(np.concatenate([t[128:], t[:128]]))


@_lower("shiftgelu", ("Cast", "Reshape", "GatherElements", "Shape"))
def _shiftgelu(ctx: Ctx, x: str) -> str:
    """A function of one int8 value: a 256-entry int32 table computed with the op's reference at export time."""
    g = ctx.g
    v = torch.arange(-128, 128, dtype=torch.int8)
    table = OPSET["shiftgelu"].reference(v, **ctx.attrs).to(torch.int32)
    return g.lookup(_rolled_table(table), g.cast(x, I32))


# ---------------------------------------------------------------------------------------------
# Data movement and pooling
# ---------------------------------------------------------------------------------------------

def _same(g: Graph, op_type: str, inputs: list[str], x: str, **attrs: Any) -> str:
    """Data movement of ``x`` (``inputs[0]``): same dtype and interval."""
    return g.move(op_type, x, inputs[1:], **attrs)


@_lower("slice", ("Slice",))
def _slice(ctx: Ctx, x: str) -> str:
    g = ctx.g
    return _same(g, "Slice", [x, g.const([ctx.a("start")]), g.const([ctx.a("end")]), g.const([ctx.a("dim")])], x)


@_lower("reshape", ("Reshape",))
def _reshape(ctx: Ctx, x: str) -> str:
    g = ctx.g  # our attribute has ONNX semantics (0 copies, one -1 inferred; allowzero = 0)
    return _same(g, "Reshape", [x, g.const(list(ctx.a("shape")))], x)


@_lower("permute", ("Transpose",))
def _permute(ctx: Ctx, x: str) -> str:
    return _same(ctx.g, "Transpose", [x], x, perm=list(ctx.a("perm")))


@_lower("roll", ("Slice", "Concat"))
def _roll(ctx: Ctx, x: str) -> str:
    g = ctx.g
    t = ctx.ins[0]
    for s, d in zip(ctx.a("shifts"), ctx.a("dims"), strict=True):
        d %= t.rank
        size = t.shape[d]
        s %= size
        if s == 0:
            continue
        tail = _same(g, "Slice", [x, g.const([size - s]), g.const([size]), g.const([d])], x)
        head = _same(g, "Slice", [x, g.const([0]), g.const([size - s]), g.const([d])], x)
        x = g.op("Concat", [tail, head], g.dtype(x), g.lohi(x), axis=d)
    return x


@_lower("pad", ("Pad", "Cast"))
def _pad(ctx: Ctx, x: str) -> str:
    g = ctx.g
    rank = ctx.ins[0].rank
    pads = list(ctx.a("pads"))
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):  # torch order: (last_lo, last_hi, prev_lo, prev_hi, ...)
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    dt = g.dtype(x)
    lo, hi = g.lohi(x)
    w = g.cast(x, I32) if dt == I16 else x  # ONNX Runtime's Pad has no int16 kernel
    y = g.op("Pad", [w, g.const(begin + end)], g.dtype(w), (min(lo, 0), max(hi, 0)), mode="constant")
    return g.cast(y, dt)


@_lower("select", ("Gather",))
def _select(ctx: Ctx, x: str) -> str:
    g = ctx.g  # a 0-d index drops the axis; negative indices count from the end as in torch
    return _same(g, "Gather", [x, g.const(ctx.a("index"))], x, axis=ctx.a("dim"))


@_lower("mean", ("Cast", "ReduceSum", "Mul", "Add", "Div", "Sub"))
def _mean(ctx: Ctx, x: str) -> str:
    g = ctx.g
    t = ctx.ins[0]
    d = ctx.a("dim") % t.rank
    n = t.shape[d]
    s = g.reduce_sum(g.cast(x, I64), [d], n, keepdims=False)
    return g.cast(g.floor_div(g.add(g.mul(s, 2), n), 2 * n), g.dtype(x))  # round half up


# ---------------------------------------------------------------------------------------------
# Fused ops: the lowerings of the ops they fuse
# ---------------------------------------------------------------------------------------------

@_lower("attention", ONNX_OPS_BY_OP["matmul"] + ONNX_OPS_BY_OP["add_const"] + _REQ + ONNX_OPS_BY_OP["shiftmax_rel"]
        + ONNX_OPS_BY_OP["attn_normalize"] + ONNX_OPS_BY_OP["shiftmax"])
def _attention(ctx: Ctx, q: str, k: str, v: str) -> str:
    qt, kt, vt = ctx.ins
    b, h, n, _ = qt.shape
    scores_t = TType.of(torch.int32, (b, h, n, n), 0)
    s = _matmul(ctx.sub({"transpose_b": 1}, {}, [qt, kt]), q, k)
    if "bias" in ctx.consts:
        s = _add_const(ctx.sub({}, {"const": ctx.consts["bias"]}, [scores_t]), s)
    s = _requantize(ctx.sub({"bits": ctx.a("score_bits")},
                            {"mult": ctx.consts["score_mult"], "shift": ctx.consts["score_shift"]}, [scores_t]), s)
    s_t = TType.of(ops.storage_dtype(ctx.a("score_bits")), (b, h, n, n), 0)
    mask = {"mask": ctx.consts["mask"]} if "mask" in ctx.consts else {}
    if ctx.a("probs") == PROBS_REL8:
        p = _shiftmax_rel(ctx.sub({"x0": ctx.a("x0")}, mask, [s_t]), s)
        acc = _matmul(ctx.sub({"transpose_b": 0}, {}, [TType.of(torch.uint8, s_t.shape, 0), vt]), p, v)
        return _attn_normalize(ctx.sub({}, {}, [qt, TType.of(torch.uint8, s_t.shape, 0)]), acc, p)
    p = _shiftmax(ctx.sub({"x0": ctx.a("x0"), "n": ctx.a("n"), "k_out": 8}, mask, [s_t]), s)
    return _matmul(ctx.sub({"transpose_b": 0}, {}, [TType.of(torch.int8, s_t.shape, 0), vt]), p, v)


@_lower("requantize_table", (*_REQ, "Reshape", "GatherElements", "Shape"))
def _requantize_table(ctx: Ctx, x: str) -> str:
    g = ctx.g  # the requantized int64 value in [-127, 127] indexes the rolled table directly
    idx = g.clip(_requant(g, x, ctx.c("mult"), ctx.c("shift")), -127, 127)
    return g.lookup(_rolled_table(ctx.consts["table"]), idx)

