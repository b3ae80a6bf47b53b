"""The integer op set: every op of the program IR, defined once.

Each ``OpDef`` states an op's value inputs, its integer constants and attributes (dtypes, shapes and
allowed ranges), a static rule ``infer`` that checks a node and gives the type of its output (dtype,
shape with a symbolic batch, value interval), and its reference semantics (``reference``, built
from ``ivit.ops``, the specification).  Program validation, the engine, every backend and every
exporter look ops up in ``OPSET``; nothing else keeps its own list (a test checks it).

Fused ops (``fused=True``: ``attention``, ``requantize_table``) are produced by passes
(``ivit.ir.passes``) from chains of basic ops; their reference semantics is the chain's, so any
backend or exporter can run them.  Legacy ops (``legacy=True``: ``layernorm``, ``shiftmax``) keep
the numerics of ``.ivit`` files written before format 2, which still load and give the same integers.

Calling convention of ``reference`` and of every backend kernel:
``kernel(*inputs, **consts, **attrs)``; an absent optional constant is not passed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .types import DTYPE_NAMES, ProgramError, TType

__all__ = ["OpDef", "ConstSpec", "AttrSpec", "Check", "OPSET", "op_names", "get_op", "expand_window_mask",
           "INT32_LIMIT"]

INT32_LIMIT = 2**31 - 1
_I8, _U8, _I16, _I32, _BOOL = torch.int8, torch.uint8, torch.int16, torch.int32, torch.bool


@dataclass(frozen=True)
class ConstSpec:
    """A constant tensor of an op: its name and the dtypes it may have."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    optional: bool = False


@dataclass(frozen=True)
class AttrSpec:
    """An integer attribute: ``kind`` is ``"int"`` (bool accepted as 0/1) or ``"ints"`` (a list)."""

    name: str
    kind: str = "int"
    lo: int = -(2**31)
    hi: int = 2**31 - 1
    min_len: int = 1
    max_len: int = 8
    optional: bool = False


@dataclass(frozen=True)
class OpDef:
    """One op of the integer IR (see the module docstring)."""

    name: str
    inputs: tuple[str, ...]
    consts: tuple[ConstSpec, ...]
    attrs: tuple[AttrSpec, ...]
    infer: Callable[[Check], TType]
    reference: Callable[..., Tensor]
    doc: str
    fused: bool = False
    legacy: bool = False
    since: int = 1
    const_names: frozenset[str] = field(init=False)
    attr_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "const_names", frozenset(c.name for c in self.consts))
        object.__setattr__(self, "attr_names", frozenset(a.name for a in self.attrs))


class Check:
    """What ``infer`` sees of one node: input types, constants, attributes, and the producers of inputs.

    Every helper raises ``ProgramError`` with the node's position and op in the message.
    """

    def __init__(self, where: str, inputs: Sequence[TType], consts: Mapping[str, Tensor], attrs: Mapping[str, Any],
                 producers: Sequence[Any] = (), input_names: Sequence[str] = ()) -> None:
        self.where = where
        self.x = list(inputs)
        self.consts = consts
        self.attrs = attrs
        self.producers = list(producers)
        self.input_names = list(input_names)

    def fail(self, msg: str) -> ProgramError:
        return ProgramError(f"{self.where}: {msg}")

    def attr(self, name: str, default: Any = None) -> Any:
        v = self.attrs.get(name, default)
        return int(v) if isinstance(v, bool) else v

    def const(self, name: str) -> Tensor | None:
        return self.consts.get(name)

    def input(self, i: int, dtypes: tuple[torch.dtype, ...], min_rank: int = 1) -> TType:
        t = self.x[i]
        if t.dtype not in dtypes:
            names = "/".join(DTYPE_NAMES[d] for d in dtypes)
            raise self.fail(f"input {i} must be {names}, got {t.describe()}")
        if t.rank < min_rank:
            raise self.fail(f"input {i} must have rank >= {min_rank}, got {t.describe()}")
        return t

    def not_batch(self, t: TType, dim: int, what: str) -> None:
        if t.batch_axis == dim:
            raise self.fail(f"{what} cannot act on the batch axis")

    def dim(self, t: TType, d: int, what: str = "dim") -> int:
        if not -t.rank <= d < t.rank:
            raise self.fail(f"{what} {d} out of range for rank {t.rank}")
        return d % t.rank

    def shape(self, name: str, shape: tuple[int, ...]) -> Tensor:
        c = self.consts[name]
        if tuple(c.shape) != tuple(shape):
            raise self.fail(f"constant {name} must have shape {tuple(shape)}, got {tuple(c.shape)}")
        return c

    def channels(self, name: str, c: int) -> Tensor:
        """A per-tensor (``()``/``(1,)``) or per-channel (``(C,)``) constant."""
        t = self.consts[name]
        if tuple(t.shape) not in ((), (1,), (c,)):
            raise self.fail(f"constant {name} must have shape (), (1,) or ({c},), got {tuple(t.shape)}")
        return t

    def values(self, name: str, lo: int, hi: int) -> tuple[int, int]:
        """Check every value of constant ``name`` lies in ``[lo, hi]``; returns its (min, max)."""
        t = self.consts[name]
        if t.numel() == 0:
            return 0, 0
        tmin, tmax = int(t.min()), int(t.max())
        if tmin < lo or tmax > hi:
            raise self.fail(f"constant {name} values must lie in [{lo}, {hi}], got [{tmin}, {tmax}]")
        return tmin, tmax

    def amax(self, name: str) -> int:
        t = self.consts[name]
        return 0 if t.numel() == 0 else int(t.to(torch.int64).abs().max())

    def dyadic(self, mult: str, shift: str, c: int) -> tuple[Tensor, Tensor]:
        """A requantization pair: same shape (scalar or per channel), ``|b| < 2**31``, ``1 <= c <= 62``.

        Returns the constants as int64 tensors (for ``requant_bound``)."""
        m = self.channels(mult, c)
        s = self.channels(shift, c)
        if m.shape != s.shape:
            raise self.fail(f"constants {mult} and {shift} must have the same shape, got {tuple(m.shape)} "
                            f"and {tuple(s.shape)}")
        self.values(mult, -INT32_LIMIT, INT32_LIMIT)
        self.values(shift, 1, 62)
        return m.to(torch.int64).reshape(-1), s.to(torch.int64).reshape(-1)

    def bits(self, name: str = "bits", lo: int = 2, hi: int = 32) -> int:
        b = self.attr(name)
        if not lo <= b <= hi:
            raise self.fail(f"attribute {name} must lie in [{lo}, {hi}], got {b}")
        return b


def _bound(amax: int, mult: Tensor | int, shift: Tensor | int) -> int:
    """``max |round_shift(x * b_c, c_c)|`` over channels ``c`` for ``|x| <= amax`` (per-channel pairs, or ints)."""
    m = torch.as_tensor(mult, dtype=torch.int64).reshape(-1).abs()
    s = torch.as_tensor(shift, dtype=torch.int64).reshape(-1)
    if m.numel() == 0:
        return 0
    if amax > 2**31:  # beyond int64-safe products: exact Python integers
        return max((amax * int(a) + (1 << (int(b) - 1))) >> int(b) for a, b in zip(m.tolist(), s.tolist(), strict=True))
    one = torch.ones((), dtype=torch.int64)
    return int(((amax * m + torch.bitwise_left_shift(one, s - 1)) >> s).max())


def _requant_out(c: Check, x: TType, bits: int, bound: int) -> TType:
    m = min(ops.qmax(bits), bound)
    return TType.of(ops.storage_dtype(bits), x.shape, x.batch_axis, -m, m)


def expand_window_mask(mask: Tensor, shape: torch.Size) -> Tensor:
    """Broadcast a window mask ``(nW, N, N)`` to scores ``(B*nW, H, N, N)``: window ``w`` of every image
    (batch-major windows: index ``b * nW + w``) uses ``mask[w]``."""
    nw, n = mask.shape[0], mask.shape[-1]
    return mask.view(1, nw, 1, n, n).expand(shape[0] // nw, nw, shape[1], n, n).reshape(shape)


def _check_mask(c: Check, x: TType) -> None:
    mask = c.const("mask")
    if mask is None:
        return
    n = x.shape[-1]
    if x.rank != 4 or x.batch_axis != 0 or x.shape[-2] != n:
        raise c.fail(f"a mask needs scores (nW*B, H, N, N), got {x.describe()}")
    if mask.dim() != 3 or tuple(mask.shape[1:]) != (n, n) or mask.shape[0] < 1:
        raise c.fail(f"constant mask must have shape (nW, {n}, {n}), got {tuple(mask.shape)}")
    if x.shape[0] % mask.shape[0]:
        raise c.fail(f"scores {x.describe()} do not hold whole groups of {mask.shape[0]} windows per image")


OPSET: dict[str, OpDef] = {}


def _op(name: str, inputs: tuple[str, ...], consts: tuple[ConstSpec, ...] = (), attrs: tuple[AttrSpec, ...] = (),
        *, reference: Callable[..., Tensor], fused: bool = False, legacy: bool = False,
        since: int = 1) -> Callable[[Callable[[Check], TType]], Callable[[Check], TType]]:
    def deco(infer: Callable[[Check], TType]) -> Callable[[Check], TType]:
        doc = (infer.__doc__ or "").strip()
        OPSET[name] = OpDef(name, inputs, consts, attrs, infer, reference, doc, fused, legacy, since)
        return infer
    return deco


def op_names() -> list[str]:
    return sorted(OPSET)


def get_op(name: str) -> OpDef:
    try:
        return OPSET[name]
    except KeyError:
        raise ProgramError(f"unknown op {name!r}") from None


# ---------------------------------------------------------------------------------------------
# Input, linear algebra, requantization
# ---------------------------------------------------------------------------------------------

@_op("patchify", ("pixels",), attrs=(AttrSpec("patch", lo=1, hi=1024),),
     reference=lambda x, patch: ops.patchify(x, patch))
def _patchify(c: Check) -> TType:
    """uint8 ``(B, C, H, W)`` -> int8 ``(B, L, C*p*p)`` patches ``p - 128`` (``ops.patchify``)."""
    x = c.input(0, (_U8,), 4)
    p = c.attr("patch")
    if x.batch_axis != 0:
        raise c.fail("patchify needs (B, C, H, W) pixels")
    _, ch, h, w = x.shape
    if h % p or w % p:
        raise c.fail(f"image {h}x{w} is not a multiple of the patch size {p}")
    return TType.of(_I8, (x.shape[0], (h // p) * (w // p), ch * p * p), 0, -128, 127)


@_op("linear", ("x",), (ConstSpec("weight", (_I8,)), ConstSpec("bias", (_I32,), optional=True)),
     reference=lambda x, weight, bias=None: ops.int_linear(x, weight, bias))
def _linear(c: Check) -> TType:
    """int8 ``(..., K)`` x int8 weight ``(N, K)`` [+ int32 bias ``(N,)``] -> int32 ``(..., N)`` (``ops.int_linear``)."""
    x = c.input(0, (_I8,), 2)
    c.not_batch(x, x.rank - 1, "linear")
    w = c.consts["weight"]
    k = x.shape[-1]
    if w.dim() != 2 or w.shape[1] != k or w.shape[0] < 1:
        raise c.fail(f"weight must have shape (N, {k}), got {tuple(w.shape)}")
    n = int(w.shape[0])
    bound = k * x.amax * c.amax("weight")
    if c.const("bias") is not None:
        c.shape("bias", (n,))
        bound += c.amax("bias")
    if bound > INT32_LIMIT:
        raise c.fail(f"int32 accumulator can overflow (bound {bound})")
    return TType.of(_I32, (*x.shape[:-1], n), x.batch_axis, -bound, bound)


def _matmul_ref(a: Tensor, b: Tensor, transpose_b: int) -> Tensor:
    return ops.int_matmul(a, b, bool(transpose_b))


@_op("matmul", ("a", "b"), attrs=(AttrSpec("transpose_b", lo=0, hi=1),), reference=_matmul_ref)
def _matmul(c: Check) -> TType:
    """Batched int8/uint8 ``(..., M, K)`` x int8 ``(..., K, N)`` (or ``(..., N, K)``) -> int32 (``ops.int_matmul``)."""
    a = c.input(0, (_I8, _U8), 2)
    b = c.input(1, (_I8,), 2)
    if a.rank != b.rank or a.shape[:-2] != b.shape[:-2] or a.batch_axis != b.batch_axis:
        raise c.fail(f"operands {a.describe()} and {b.describe()} must have equal batch dimensions")
    if a.batch_axis is not None and a.batch_axis >= a.rank - 2:
        raise c.fail("the batch axis cannot be a matrix axis")
    tb = c.attr("transpose_b")
    k = b.shape[-1] if tb else b.shape[-2]
    n = b.shape[-2] if tb else b.shape[-1]
    if a.shape[-1] != k:
        raise c.fail(f"inner dimensions differ: {a.describe()} x {b.describe()} (transpose_b={tb})")
    bound = k * a.amax * b.amax
    if bound > INT32_LIMIT:
        raise c.fail(f"int32 accumulator can overflow (bound {bound})")
    return TType.of(_I32, (*a.shape[:-1], n), a.batch_axis, -bound, bound)


@_op("requantize", ("x",), (ConstSpec("mult", (_I32,)), ConstSpec("shift", (_I32,))),
     (AttrSpec("bits", lo=2, hi=32),), reference=lambda x, mult, shift, bits: ops.requantize(x, mult, shift, bits))
def _requantize(c: Check) -> TType:
    """``clamp(round_shift(x * mult, shift), -qmax, qmax)``, per tensor or per channel (``ops.requantize``)."""
    x = c.input(0, (_I8, _I16, _I32))
    c.not_batch(x, x.rank - 1, "requantize")
    m, s = c.dyadic("mult", "shift", x.shape[-1])
    return _requant_out(c, x, c.bits(), _bound(x.amax, m, s))


@_op("add_requantize", ("a", "b"),
     (ConstSpec("mult_a", (_I32,)), ConstSpec("shift_a", (_I32,)), ConstSpec("mult_b", (_I32,)),
      ConstSpec("shift_b", (_I32,))), (AttrSpec("bits", lo=2, hi=32),),
     reference=lambda a, b, mult_a, shift_a, mult_b, shift_b, bits: ops.add_requantize(
         a, b, mult_a, shift_a, mult_b, shift_b, bits))
def _add_requantize(c: Check) -> TType:
    """Residual add at the output scale, each branch requantized then summed (``ops.add_requantize``)."""
    a = c.input(0, (_I8, _I16, _I32))
    b = c.input(1, (_I8, _I16, _I32))
    if a.shape != b.shape or a.batch_axis != b.batch_axis:
        raise c.fail(f"operands must have the same shape, got {a.describe()} and {b.describe()}")
    c.not_batch(a, a.rank - 1, "add_requantize")
    ma, sa = c.dyadic("mult_a", "shift_a", a.shape[-1])
    mb, sb = c.dyadic("mult_b", "shift_b", a.shape[-1])
    bound = _bound(a.amax, ma, sa) + _bound(b.amax, mb, sb)
    if bound > 2**30:  # each branch and their sum stay inside int32 (32-bit targets rely on it)
        raise c.fail(f"requantized branches can leave int32 (bound {bound})")
    return _requant_out(c, a, c.bits(), bound)


@_op("add_const", ("x",), (ConstSpec("const", (_I32,)),),
     reference=lambda x, const: (x.to(torch.int64) + const.to(torch.int64)).to(torch.int32))
def _add_const(c: Check) -> TType:
    """``x + const`` in int32; ``const`` has exactly the shape of ``x``'s trailing dimensions (no broadcast)."""
    x = c.input(0, (_I8, _I16, _I32), 2)
    k = c.consts["const"]
    if not 1 <= k.dim() < x.rank or tuple(k.shape) != x.shape[x.rank - k.dim():]:
        raise c.fail(f"constant const must have the shape of trailing dims of {x.describe()}, got {tuple(k.shape)}")
    if x.batch_axis is not None and x.batch_axis >= x.rank - k.dim():
        raise c.fail("constant const cannot span the batch axis")
    bound = x.amax + c.amax("const")
    if bound > INT32_LIMIT:
        raise c.fail(f"int32 sum can overflow (bound {bound})")
    return TType.of(_I32, x.shape, x.batch_axis, -bound, bound)


def _embed_ref(x: Tensor, mult: Tensor, shift: Tensor, pos: Tensor, bits: int, prefix: Tensor | None = None) -> Tensor:
    return ops.embed_tokens(x, mult, shift, prefix, pos, bits)


@_op("embed", ("x",),
     (ConstSpec("mult", (_I32,)), ConstSpec("shift", (_I32,)), ConstSpec("pos", (_I32,)),
      ConstSpec("prefix", (_I32,), optional=True)), (AttrSpec("bits", lo=2, hi=32),), reference=_embed_ref)
def _embed(c: Check) -> TType:
    """Patch tokens on the residual scale + position embedding, class token rows prepended (``ops.embed_tokens``)."""
    x = c.input(0, (_I32,), 3)
    if x.rank != 3 or x.batch_axis != 0:
        raise c.fail(f"embed needs (B, L, C) accumulators, got {x.describe()}")
    _, length, ch = x.shape
    m, s = c.dyadic("mult", "shift", ch)
    c.shape("pos", (length, ch))
    bound = _bound(x.amax, m, s) + c.amax("pos")
    tokens = length
    if c.const("prefix") is not None:
        p = c.consts["prefix"]
        if p.dim() != 2 or p.shape[1] != ch or not 1 <= p.shape[0] <= 64:
            raise c.fail(f"constant prefix must have shape (P, {ch}) with 1 <= P <= 64, got {tuple(p.shape)}")
        tokens += int(p.shape[0])
        bound = max(bound, c.amax("prefix"))
    if bound > 2**62:
        raise c.fail(f"embedding sum can overflow (bound {bound})")
    bits = c.bits()
    m_out = min(ops.qmax(bits), bound)
    return TType.of(ops.storage_dtype(bits), (x.shape[0], tokens, ch), 0, -m_out, m_out)


# ---------------------------------------------------------------------------------------------
# I-LayerNorm
# ---------------------------------------------------------------------------------------------

_LN_CONSTS = (ConstSpec("mult", (_I32,)), ConstSpec("shift", (_I32,)), ConstSpec("offset", (_I32,)))


def _ln_common(c: Check, max_c: int) -> tuple[TType, Tensor, Tensor, int]:
    x = c.input(0, (_I8, _I16))
    c.not_batch(x, x.rank - 1, "layernorm")
    ch = x.shape[-1]
    if not 1 <= ch <= max_c:
        raise c.fail(f"layernorm over {ch} channels (at most {max_c})")
    m, s = c.dyadic("mult", "shift", ch)
    c.channels("offset", ch)
    return x, m, s, c.amax("offset")


@_op("layernorm", ("x",), _LN_CONSTS, (AttrSpec("bits", lo=2, hi=16),), legacy=True,
     reference=lambda x, mult, shift, offset, bits: ops.ilayernorm(x, mult, shift, offset, bits))
def _layernorm(c: Check) -> TType:
    """I-LayerNorm with 64-bit variance (``ops.ilayernorm``; programs of format 1)."""
    x, _, _, _ = _ln_common(c, 4095)
    bits = c.bits(hi=16)
    return _requant_out(c, x, bits, ops.qmax(bits))


@_op("layernorm32", ("x",), _LN_CONSTS, (AttrSpec("bits", lo=2, hi=16),), since=2,
     reference=lambda x, mult, shift, offset, bits: ops.ilayernorm32(x, mult, shift, offset, bits))
def _layernorm32(c: Check) -> TType:
    """I-LayerNorm with 32-bit intermediates (``ops.ilayernorm32``)."""
    x, m, s, off = _ln_common(c, 8192)
    if _bound(2**21, m, s) > 2**30 or off > 2**30:  # z * b and + offset stay inside int32 on 32-bit targets
        raise c.fail("layernorm multipliers or offsets too large for int32 (z * mult / 2**shift or offset > 2**30)")
    bits = c.bits(hi=16)
    return _requant_out(c, x, bits, ops.qmax(bits))


# ---------------------------------------------------------------------------------------------
# Shiftmax, ShiftGELU
# ---------------------------------------------------------------------------------------------

def _softmax_ref(x: Tensor, x0: int, n: int, k_out: int, mask: Tensor | None = None) -> Tensor:
    return ops.shiftmax(x, x0, n, k_out, None if mask is None else expand_window_mask(mask, x.shape))


@_op("shiftmax", ("x",), (ConstSpec("mask", (_BOOL,), optional=True),),
     (AttrSpec("x0", lo=-(2**52) + 1, hi=-1), AttrSpec("n", lo=0, hi=62), AttrSpec("k_out", lo=2, hi=16)),
     reference=_softmax_ref, legacy=True)
def _shiftmax(c: Check) -> TType:
    """Shiftmax with absolute probabilities ``[0, 2**(k_out-1) - 1]`` (``ops.shiftmax``; the I-ViT original)."""
    x = c.input(0, (_I16, _I32))
    c.not_batch(x, x.rank - 1, "shiftmax")
    _check_mask(c, x)
    n_tok = x.shape[-1]
    if n_tok * (-c.attr("x0")) * (1 << c.attr("n")) > 2**62:
        raise c.fail("N * |x0| * 2**n exceeds 2**62 (the exponential sum would overflow int64)")
    k = c.attr("k_out")
    return TType.of(ops.storage_dtype(k), x.shape, x.batch_axis, 0, ops.qmax(k))


def _softmax_rel_ref(x: Tensor, x0: int, mask: Tensor | None = None) -> Tensor:
    return ops.shiftmax_rel(x, x0, None if mask is None else expand_window_mask(mask, x.shape))


@_op("shiftmax_rel", ("x",), (ConstSpec("mask", (_BOOL,), optional=True),), (AttrSpec("x0", lo=-(2**27), hi=-1),),
     reference=_softmax_rel_ref, since=2)
def _shiftmax_rel(c: Check) -> TType:
    """ShiftExp probabilities relative to the row maximum, uint8 ``[0, 255]`` (``ops.shiftmax_rel``)."""
    x = c.input(0, (_I8, _I16, _I32))
    c.not_batch(x, x.rank - 1, "shiftmax_rel")
    if x.amax >= 2**24:
        raise c.fail(f"scores must lie within +-2**24 (got {x.describe()} in [{x.lo}, {x.hi}])")
    _check_mask(c, x)
    return TType.of(_U8, x.shape, x.batch_axis, 0, 255)


@_op("attn_normalize", ("acc", "p"), reference=lambda acc, p: ops.attn_normalize(acc, p), since=2)
def _attn_normalize(c: Check) -> TType:
    """``round_shift(acc * floor(2**30 / sum(p)), 14)``: ``acc = p @ v`` divided by the row sums of ``p``."""
    acc = c.input(0, (_I32,), 2)
    p = c.input(1, (_U8,), 2)
    if acc.rank != p.rank or acc.shape[:-1] != p.shape[:-1] or p.shape[-1] != p.shape[-2] \
            or acc.batch_axis != p.batch_axis:
        raise c.fail(f"needs acc (..., N, d) and p (..., N, N), got {acc.describe()} and {p.describe()}")
    prod = c.producers[0] if c.producers else None
    p_name = c.input_names[1] if len(c.input_names) > 1 else None
    if prod is None or prod.op != "matmul" or prod.inputs[0] != p_name or int(prod.attrs.get("transpose_b", 0)):
        raise c.fail("input acc must be matmul(p, v) of the same p")
    bound = 128 << ops.CTX_FRAC_BITS
    return TType.of(_I32, acc.shape, acc.batch_axis, -bound, bound)


@_op("shiftgelu", ("x",), (),
     (AttrSpec("x0", lo=-(2**52) + 1, hi=-1), AttrSpec("n", lo=0, hi=62), AttrSpec("k_out", lo=2, hi=16)),
     reference=lambda x, x0, n, k_out: ops.shiftgelu(x, x0, n, k_out))
def _shiftgelu(c: Check) -> TType:
    """ShiftGELU ``x * sigmoid(1.702 x)`` of int8 values -> int32 (``ops.shiftgelu``)."""
    x = c.input(0, (_I8,))
    if 2 * (-c.attr("x0")) * (1 << c.attr("n")) > 2**62:
        raise c.fail("2 * |x0| * 2**n exceeds 2**62 (the exponential sum would overflow int64)")
    bound = 128 << (c.attr("k_out") - 1)
    return TType.of(_I32, x.shape, x.batch_axis, -bound, bound)


# ---------------------------------------------------------------------------------------------
# Data movement and pooling (same integers, same dtype)
# ---------------------------------------------------------------------------------------------

_ANY = (_U8, _I8, _I16, _I32)


@_op("slice", ("x",), (), (AttrSpec("dim", lo=-8, hi=7), AttrSpec("start", lo=0), AttrSpec("end", lo=1)),
     reference=lambda x, dim, start, end: x.narrow(dim, start, end - start))
def _slice(c: Check) -> TType:
    """``x[..., start:end, ...]`` along ``dim`` (``0 <= start < end <= size``; never the batch axis)."""
    x = c.input(0, _ANY)
    d = c.dim(x, c.attr("dim"))
    c.not_batch(x, d, "slice")
    start, end = c.attr("start"), c.attr("end")
    if not 0 <= start < end <= x.shape[d]:
        raise c.fail(f"slice [{start}, {end}) out of range for size {x.shape[d]}")
    shape = list(x.shape)
    shape[d] = end - start
    return TType.of(x.dtype, tuple(shape), x.batch_axis, x.lo, x.hi)


def _reshape_ref(x: Tensor, shape: list[int]) -> Tensor:
    # ONNX semantics: 0 copies the input dim at that position, -1 is inferred
    return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])


@_op("reshape", ("x",), (), (AttrSpec("shape", "ints", lo=-1, hi=2**31 - 1, max_len=8),), reference=_reshape_ref)
def _reshape(c: Check) -> TType:
    """Row-major reshape, ONNX style: 0 copies the input size at that position, one -1 is inferred.

    The batch must stay free: the batched size is either copied (0) or inferred (-1)."""
    x = c.input(0, _ANY)
    spec = list(c.attr("shape"))
    if spec.count(-1) > 1:
        raise c.fail("reshape: at most one -1")
    out: list[int] = []
    batch_axis = None
    for i, s in enumerate(spec):
        if s == 0:
            if i >= x.rank:
                raise c.fail(f"reshape: 0 at position {i} but the input has rank {x.rank}")
            out.append(x.shape[i])
            if i == x.batch_axis:
                batch_axis = i
        else:
            out.append(s)
    total = x.numel_per_image()
    if -1 in spec:
        i = spec.index(-1)
        known = 1
        for j, s in enumerate(out):
            if j != i:
                known *= s
        if known == 0 or total % known:
            raise c.fail(f"reshape: cannot infer -1 of {spec} from {x.describe()}")
        out[i] = total // known
        if x.batch_axis is not None and batch_axis is None:  # the inferred size carries the batch
            batch_axis = i
    elif x.batch_axis is not None and batch_axis is None:
        raise c.fail("reshape: a batched value needs 0 (copy) or -1 (infer) for the batch")
    if any(s < 1 for s in out):
        raise c.fail(f"reshape: sizes must be positive, got {out}")
    prod = 1
    for s in out:
        prod *= s
    if prod != total:
        raise c.fail(f"reshape: {x.describe()} has {total} elements per image, {spec} has {prod}")
    return TType.of(x.dtype, tuple(out), batch_axis, x.lo, x.hi)


@_op("permute", ("x",), (), (AttrSpec("perm", "ints", lo=0, hi=7, max_len=8),),
     reference=lambda x, perm: x.permute(perm))
def _permute(c: Check) -> TType:
    """Axis permutation ``out.shape[i] = x.shape[perm[i]]``."""
    x = c.input(0, _ANY)
    perm = list(c.attr("perm"))
    if sorted(perm) != list(range(x.rank)):
        raise c.fail(f"perm {perm} is not a permutation of {x.rank} axes")
    batch = None if x.batch_axis is None else perm.index(x.batch_axis)
    return TType.of(x.dtype, tuple(x.shape[p] for p in perm), batch, x.lo, x.hi)


@_op("roll", ("x",), (), (AttrSpec("shifts", "ints", max_len=8), AttrSpec("dims", "ints", lo=-8, hi=7, max_len=8)),
     reference=lambda x, shifts, dims: torch.roll(x, shifts, dims))
def _roll(c: Check) -> TType:
    """Cyclic shift ``torch.roll(x, shifts, dims)`` (never along the batch axis)."""
    x = c.input(0, _ANY)
    shifts, dims = list(c.attr("shifts")), list(c.attr("dims"))
    if len(shifts) != len(dims):
        raise c.fail("roll: shifts and dims must have the same length")
    nd = [c.dim(x, d) for d in dims]
    if len(set(nd)) != len(nd):
        raise c.fail("roll: repeated dims")
    for d in nd:
        c.not_batch(x, d, "roll")
    return TType.of(x.dtype, x.shape, x.batch_axis, x.lo, x.hi)


@_op("pad", ("x",), (), (AttrSpec("pads", "ints", lo=0, hi=4096, min_len=2, max_len=16),),
     reference=lambda x, pads: torch.nn.functional.pad(x, pads))
def _pad(c: Check) -> TType:
    """Zero padding, ``torch.nn.functional.pad`` order ``(last_lo, last_hi, prev_lo, prev_hi, ...)``."""
    x = c.input(0, _ANY)
    pads = list(c.attr("pads"))
    if len(pads) % 2 or len(pads) > 2 * x.rank:
        raise c.fail(f"pad: {len(pads)} values for rank {x.rank}")
    shape = list(x.shape)
    for i in range(len(pads) // 2):
        d = x.rank - 1 - i
        if pads[2 * i] or pads[2 * i + 1]:
            c.not_batch(x, d, "pad")
        shape[d] += pads[2 * i] + pads[2 * i + 1]
    return TType.of(x.dtype, tuple(shape), x.batch_axis, min(x.lo, 0), max(x.hi, 0))


@_op("select", ("x",), (), (AttrSpec("dim", lo=-8, hi=7), AttrSpec("index", lo=-(2**31), hi=2**31 - 1)),
     reference=lambda x, dim, index: x.select(dim, index))
def _select(c: Check) -> TType:
    """``x.select(dim, index)`` (drops ``dim``; never the batch axis)."""
    x = c.input(0, _ANY, 2)
    d = c.dim(x, c.attr("dim"))
    c.not_batch(x, d, "select")
    if not -x.shape[d] <= c.attr("index") < x.shape[d]:
        raise c.fail(f"select index {c.attr('index')} out of range for size {x.shape[d]}")
    shape = x.shape[:d] + x.shape[d + 1:]
    batch = x.batch_axis if x.batch_axis is None or x.batch_axis < d else x.batch_axis - 1
    return TType.of(x.dtype, shape, batch, x.lo, x.hi)


@_op("mean", ("x",), (), (AttrSpec("dim", lo=-8, hi=7),), reference=lambda x, dim: ops.int_mean(x, dim))
def _mean(c: Check) -> TType:
    """Integer mean over ``dim``, rounded half up, same dtype (``ops.int_mean``)."""
    x = c.input(0, (_I8, _I16, _I32), 2)
    d = c.dim(x, c.attr("dim"))
    c.not_batch(x, d, "mean")
    shape = x.shape[:d] + x.shape[d + 1:]
    batch = x.batch_axis if x.batch_axis is None or x.batch_axis < d else x.batch_axis - 1
    return TType.of(x.dtype, shape, batch, x.lo, x.hi)


# ---------------------------------------------------------------------------------------------
# Fused ops (made by passes; reference = the chain they replace)
# ---------------------------------------------------------------------------------------------

#: ``attention`` probability modes
PROBS_SHIFTMAX8 = 0  # legacy Shiftmax, int8 [0, 127] at 2**-7, then p @ v
PROBS_REL8 = 1  # shiftmax_rel uint8 [0, 255], p @ v, attn_normalize


def _attention_ref(q: Tensor, k: Tensor, v: Tensor, score_mult: Tensor, score_shift: Tensor, score_bits: int,
                   probs: int, x0: int, n: int = 0, bias: Tensor | None = None,
                   mask: Tensor | None = None) -> Tensor:
    scores = ops.int_matmul(q, k, transpose_b=True)  # int32 (B, H, N, N)
    if bias is not None:
        scores = (scores.to(torch.int64) + bias.to(torch.int64)).to(torch.int32)
    s = ops.requantize(scores, score_mult, score_shift, score_bits)
    full = None if mask is None else expand_window_mask(mask, s.shape)
    if probs == PROBS_REL8:
        p = ops.shiftmax_rel(s, x0, full)
        return ops.attn_normalize(ops.int_matmul(p, v), p)
    return ops.int_matmul(ops.shiftmax(s, x0, n, 8, full), v)


@_op("attention", ("q", "k", "v"),
     (ConstSpec("score_mult", (_I32,)), ConstSpec("score_shift", (_I32,)), ConstSpec("bias", (_I32,), optional=True),
      ConstSpec("mask", (_BOOL,), optional=True)),
     (AttrSpec("score_bits", lo=2, hi=32), AttrSpec("probs", lo=0, hi=1), AttrSpec("x0", lo=-(2**52) + 1, hi=-1),
      AttrSpec("n", lo=0, hi=62, optional=True)),
     reference=_attention_ref, fused=True, since=2)
def _attention(c: Check) -> TType:
    """Fused ``q k^T [+ bias] -> requantize -> shiftmax_rel [mask] -> p v -> attn_normalize`` (``probs=1``) or the
    legacy ``... -> shiftmax(k_out=8) -> p v`` (``probs=0``) on int8 ``(B, H, N, d)``; int32 out."""
    q = c.input(0, (_I8,), 4)
    k = c.input(1, (_I8,), 4)
    v = c.input(2, (_I8,), 4)
    if not (q.shape == k.shape == v.shape) or not (q.batch_axis == k.batch_axis == v.batch_axis == 0):
        raise c.fail(f"q, k, v must be (B, H, N, d) of one shape, got {q.describe()}, {k.describe()}, {v.describe()}")
    _, h, n_tok, d = q.shape
    bound = d * q.amax * k.amax
    if c.const("bias") is not None:
        c.shape("bias", (h, n_tok, n_tok))
        bound += c.amax("bias")
    if bound > INT32_LIMIT:
        raise c.fail(f"int32 scores can overflow (bound {bound})")
    for name in ("score_mult", "score_shift"):
        if c.consts[name].numel() != 1 or c.consts[name].dim() > 1:
            raise c.fail(f"constant {name} must be a scalar")
    m, s = c.dyadic("score_mult", "score_shift", 1)
    bits = c.bits("score_bits")
    s_bound = min(ops.qmax(bits), _bound(bound, m, s))
    scores = TType.of(ops.storage_dtype(bits), (q.shape[0], h, n_tok, n_tok), 0, -s_bound, s_bound)
    _check_mask(c, scores)
    x0, probs = c.attr("x0"), c.attr("probs")
    if probs == PROBS_REL8:
        if x0 < -(2**27) or s_bound >= 2**24:
            raise c.fail("probs=1 needs x0 >= -2**27 and scores within +-2**24")
        out = 128 << ops.CTX_FRAC_BITS
    else:
        if scores.dtype not in (_I16, _I32):
            raise c.fail("probs=0 needs score_bits >= 9")
        if "n" not in c.attrs:
            raise c.fail("probs=0 needs attribute n")
        if n_tok * (-x0) * (1 << c.attr("n", 0)) > 2**62:
            raise c.fail("N * |x0| * 2**n exceeds 2**62")
        out = n_tok * 127 * v.amax
    if n_tok * 255 * v.amax > INT32_LIMIT:
        raise c.fail("p @ v can overflow int32")
    return TType.of(_I32, q.shape, 0, -out, out)


def _requantize_table_ref(x: Tensor, mult: Tensor, shift: Tensor, table: Tensor) -> Tensor:
    idx = ops.requantize(x, mult, shift, 8).to(torch.int64) + 128
    return table[idx]


@_op("requantize_table", ("x",), (ConstSpec("mult", (_I32,)), ConstSpec("shift", (_I32,)), ConstSpec("table", (_I8,))),
     reference=_requantize_table_ref, fused=True, since=2)
def _requantize_table(c: Check) -> TType:
    """``table[requantize(x, mult, shift, 8) + 128]``: an int8 function of the requantized value (256 entries)."""
    x = c.input(0, (_I16, _I32))
    c.not_batch(x, x.rank - 1, "requantize_table")
    c.dyadic("mult", "shift", x.shape[-1])
    t = c.shape("table", (256,))
    lo, hi = (int(t.min()), int(t.max()))
    return TType.of(_I8, x.shape, x.batch_axis, lo, hi)
