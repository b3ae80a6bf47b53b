"""A TOSA graph builder that knows the exact integer semantics of every operator it emits.

``Graph`` wraps ``tosa_serializer.TosaSerializer`` (tosa-tools, TOSA 1.0, profile PRO-INT) and tracks, for every
tensor, its dtype, static shape and a value interval ``[lo, hi]``.  Each method emits one TOSA operator and
refuses (``AssertionError``: a lowering bug, never a user error) any use whose result the TOSA specification
leaves wrapped or UNPREDICTABLE on the proven interval:

* ``ADD``/``SUB``/``REDUCE_SUM``/``ABS``/``INTDIV`` and ``MUL`` with a shift REQUIRE an int32 result;
* ``MUL`` with shift 0, ``LOGICAL_LEFT_SHIFT`` and narrowing ``CAST`` wrap silently, so they need the exact
  result to fit;
* ``RESCALE`` (``scale32``) REQUIREs ``multiplier >= 0``, ``2 <= shift <= 62`` and ``-2**(shift-1) <= v <
  2**(shift-1)``; it rounds half up (``SINGLE_ROUND``) and saturates to the output type;
* ``MATMUL`` int8 accumulators wrap silently in the reference model: the op set proves them in int32.

Element types used: int8, int16, int32 and bool (no int48, no int64, no floating point).  PRO-INT restricts
elementwise arithmetic, comparisons, ``MAXIMUM``/``MINIMUM``, ``CLZ``, ``INTDIV`` and ``REDUCE_SUM`` to int32,
``CLAMP`` to int8 (int16 needs EXT-INT16) and ``CONCAT`` to int8/int32, so 16-bit values are widened first.

Every uint8 value of a program (pixels, ``shiftmax_rel`` probabilities) is held in an int8 tensor as
``u - 128`` (``offset`` representation): ``MATMUL`` reads it back with ``A_zp = -128`` and ``RESCALE`` with
``input_zp = -128``.  Only the graph's inputs and outputs carry raw uint8 bits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["T", "Graph", "I8", "I16", "I32", "BOOL", "INT32_MIN", "INT32_MAX", "dtype_range", "round_shift"]

I8, I16, I32, BOOL = "int8", "int16", "int32", "bool"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_RANGES = {I8: (-128, 127), I16: (-(2**15), 2**15 - 1), I32: (INT32_MIN, INT32_MAX), BOOL: (0, 1)}
_NP = {I8: np.int8, I16: np.int16, I32: np.int32, BOOL: np.bool_}
#: TOSA 1.0 serialization target (the reference model of tosa-tools runs 1.0 and 1.1-draft graphs)
TARGET_VERSION = (1, 0, 0, False)


def dtype_range(dtype: str) -> tuple[int, int]:
    return _RANGES[dtype]


def round_shift(v: int, s: int) -> int:
    """``floor(v / 2**s + 1/2)`` on Python integers (``s >= 1``), ``ivit.ops.round_shift``."""
    return (v + (1 << (s - 1))) >> s


@dataclass(frozen=True)
class T:
    """A TOSA tensor of the graph: name, static shape, element type and value interval."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    lo: int
    hi: int

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def amax(self) -> int:
        return max(abs(self.lo), abs(self.hi))


def _fits(lo: int, hi: int, dtype: str) -> bool:
    dlo, dhi = _RANGES[dtype]
    return dlo <= lo and hi <= dhi


def _bcast(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    if len(a) != len(b):
        raise AssertionError(f"TOSA broadcasting needs equal ranks, got {tuple(a)} and {tuple(b)}")
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            raise AssertionError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
        out.append(max(x, y))
    return tuple(out)


class Graph:
    """One TOSA basic block under construction (see the module docstring)."""

    def __init__(self) -> None:
        import tosa_serializer as ts

        self.ts = ts
        self.DType = ts.DType
        self.Op = ts.Op
        major, minor, patch, draft = TARGET_VERSION
        self.ser = ts.TosaSerializer("", targetMajor=major, targetMinor=minor, targetPatch=patch, targetDraft=draft)
        self.counts: Counter[str] = Counter()
        #: how each requantization was lowered (``lower.requant``): "RESCALE", "clamp+RESCALE", "MUL"
        self.requant_paths: Counter[str] = Counter()
        self.inputs: list[T] = []
        self.outputs: list[T] = []
        self.n_consts = 0
        self._shape_consts: dict[tuple[int, ...], str] = {}
        self._consts: dict[tuple[Any, ...], T] = {}
        self._objs: dict[str, Any] = {}

    # ------------------------------------------------------------------ tensors
    def _dt(self, dtype: str) -> Any:
        return {I8: self.DType.INT8, I16: self.DType.INT16, I32: self.DType.INT32, BOOL: self.DType.BOOL}[dtype]

    def input(self, name: str, shape: Sequence[int], dtype: str, lo: int | None = None, hi: int | None = None) -> T:
        dlo, dhi = _RANGES[dtype]
        self.ser.addInputTensor(self.ts.TosaSerializerTensor(name, [int(s) for s in shape], self._dt(dtype)))
        t = T(name, tuple(int(s) for s in shape), dtype, dlo if lo is None else lo, dhi if hi is None else hi)
        self.inputs.append(t)
        return t

    def output(self, t: T, name: str | None = None) -> T:
        """Mark ``t`` as a graph output; with ``name``, a copy (``IDENTITY``) under that name."""
        if name is not None:
            obj = self.ser.currRegion.currBasicBlock.addTensor(name, list(t.shape), self._dt(t.dtype))
            self._objs[name] = obj
            t = self._emit("IDENTITY", [t.name], T(name, t.shape, t.dtype, t.lo, t.hi), "Identity")
        elif t.name not in self._objs:
            t = self.identity(t)  # an input or a constant: a graph output must come from an operator
        self.ser.addOutputTensor(self._objs[t.name])
        self.outputs.append(t)
        return t

    def _new(self, shape: Sequence[int], dtype: str, lo: int, hi: int) -> T:
        shape = tuple(int(s) for s in shape)
        if len(shape) > 6:
            raise AssertionError(f"rank {len(shape)} > 6 (TOSA level 8K)")
        obj = self.ser.addIntermediate(list(shape), self._dt(dtype))
        self._objs[obj.name] = obj
        dlo, dhi = _RANGES[dtype]
        return T(obj.name, shape, dtype, max(dlo, int(lo)), min(dhi, int(hi)))

    def const(self, values: Any, dtype: str) -> T:
        """A constant tensor (embedded in the flatbuffer); identical constants are shared."""
        arr = np.ascontiguousarray(np.asarray(values))
        ints = arr.astype(np.int64)
        lo, hi = (int(ints.min()), int(ints.max())) if ints.size else (0, 0)
        if not _fits(lo, hi, dtype):
            raise AssertionError(f"constant values [{lo}, {hi}] do not fit {dtype}")
        data = ints.astype(_NP[dtype])
        key = (dtype, data.shape, data.tobytes())
        hit = self._consts.get(key)
        if hit is not None:
            return hit
        name = self.ser.addConst(list(data.shape), self._dt(dtype), data).name
        self.n_consts += 1
        t = T(name, tuple(data.shape), dtype, lo, hi)
        self._consts[key] = t
        return t

    def scalar(self, v: int, dtype: str, rank: int) -> T:
        """A constant broadcast over a tensor of rank ``rank`` (shape ``(1,) * rank``)."""
        return self.const(np.full((1,) * rank, v), dtype)

    def channels(self, v: Sequence[int] | np.ndarray, dtype: str, rank: int) -> T:
        """A per-channel constant broadcast along the last axis of a rank-``rank`` tensor."""
        arr = np.asarray(v, dtype=np.int64).reshape(-1)
        return self.const(arr.reshape((1,) * (rank - 1) + (arr.size,)), dtype)

    def shape_const(self, vals: Sequence[int]) -> str:
        key = tuple(int(v) for v in vals)
        name = self._shape_consts.get(key)
        if name is None:
            name = self.ser.addConst([len(key)], self.DType.SHAPE, np.array(key, dtype=np.int64)).name
            self._shape_consts[key] = name
        return name

    def assume(self, t: T, lo: int, hi: int) -> T:
        """Narrow the interval of ``t`` to a bound proven by the op's specification (cited at the call)."""
        return T(t.name, t.shape, t.dtype, max(t.lo, int(lo)), min(t.hi, int(hi)))

    # ------------------------------------------------------------------ emission
    def _attr(self, kind: str, *args: Any) -> Any:
        a = self.ts.TosaSerializerAttribute()
        getattr(a, kind + "Attribute")(*args)
        return a

    def _emit(self, op: str, inputs: Sequence[str], out: T, kind: str, *args: Any) -> T:
        self.ser.addOperator(getattr(self.Op, op), list(inputs), [out.name], self._attr(kind, *args))
        self.counts[op] += 1
        return out

    def _need(self, ok: bool, msg: str) -> None:
        if not ok:
            raise AssertionError(msg)

    def _i32(self, *ts: T) -> None:
        for t in ts:
            self._need(t.dtype == I32, f"operator needs int32 operands (PRO-INT), got {t.dtype}")

    # elementwise int32 arithmetic (REQUIRE: the exact result fits int32)
    def add(self, a: T, b: T, proven: tuple[int, int] | None = None) -> T:
        """``ADD`` int32; ``proven`` replaces the interval sum by a bound the caller proves (cited there)."""
        self._i32(a, b)
        lo, hi = proven or (a.lo + b.lo, a.hi + b.hi)
        self._need(_fits(lo, hi, I32), f"ADD can leave int32 ([{lo}, {hi}])")
        return self._emit("ADD", [a.name, b.name], self._new(_bcast(a.shape, b.shape), I32, lo, hi), "Add")

    def sub(self, a: T, b: T, proven: tuple[int, int] | None = None) -> T:
        self._i32(a, b)
        lo, hi = proven or (a.lo - b.hi, a.hi - b.lo)
        self._need(_fits(lo, hi, I32), f"SUB can leave int32 ([{lo}, {hi}])")
        return self._emit("SUB", [a.name, b.name], self._new(_bcast(a.shape, b.shape), I32, lo, hi), "Sub")

    def add_k(self, a: T, k: int) -> T:
        return a if k == 0 else self.add(a, self.scalar(k, I32, a.rank))

    def mul(self, a: T, b: T, shift: int = 0, proven: tuple[int, int] | None = None) -> T:
        """``MUL`` int32: ``round_shift(a * b, shift)`` from the exact 64-bit product (``shift >= 1``), or the
        product itself (``shift = 0``: the low 32 bits, so the exact product must fit)."""
        self._i32(a, b)
        self._need(0 <= shift <= 63, f"MUL shift {shift} outside [0, 63]")
        corners = [x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        if shift:
            corners = [round_shift(v, shift) for v in corners]
        lo, hi = proven or (min(corners), max(corners))
        self._need(_fits(lo, hi, I32), f"MUL (shift {shift}) can leave int32 ([{lo}, {hi}])")
        s = self.const(np.array([shift]), I8)
        return self._emit("MUL", [a.name, b.name, s.name], self._new(_bcast(a.shape, b.shape), I32, lo, hi), "Mul")

    def maximum(self, a: T, b: T) -> T:
        self._i32(a, b)
        out = self._new(_bcast(a.shape, b.shape), I32, max(a.lo, b.lo), max(a.hi, b.hi))
        return self._emit("MAXIMUM", [a.name, b.name], out, "Maximum", self.ts.NanPropagationMode.PROPAGATE)

    def minimum(self, a: T, b: T) -> T:
        self._i32(a, b)
        out = self._new(_bcast(a.shape, b.shape), I32, min(a.lo, b.lo), min(a.hi, b.hi))
        return self._emit("MINIMUM", [a.name, b.name], out, "Minimum", self.ts.NanPropagationMode.PROPAGATE)

    def clip32(self, a: T, lo: int, hi: int) -> T:
        """``min(max(a, lo), hi)`` on int32, each side only where the interval needs it."""
        if a.lo < lo:
            a = self.maximum(a, self.scalar(lo, I32, a.rank))
        if a.hi > hi:
            a = self.minimum(a, self.scalar(hi, I32, a.rank))
        return a

    def intdiv(self, a: T, b: T) -> T:
        """``INTDIV``: int32 quotient truncated toward zero; ``b`` must keep one sign (never 0)."""
        self._i32(a, b)
        self._need(b.lo > 0 or b.hi < 0, f"INTDIV divisor interval [{b.lo}, {b.hi}] contains 0")
        self._need(not (a.lo == INT32_MIN and b.lo <= -1 <= b.hi), "INTDIV -2**31 / -1 overflows")

        def tdiv(x: int, y: int) -> int:
            q = abs(x) // abs(y)
            return q if (x >= 0) == (y > 0) else -q

        corners = [tdiv(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        out = self._new(_bcast(a.shape, b.shape), I32, min(corners), max(corners))
        return self._emit("INTDIV", [a.name, b.name], out, "IntDiv")

    def ars(self, a: T, shift: T, rnd: bool) -> T:
        """``ARITHMETIC_RIGHT_SHIFT`` by a tensor of shifts in ``[0, bits-1]``: floor, or round half up (``rnd``)."""
        self._need(a.dtype == shift.dtype, "ARITHMETIC_RIGHT_SHIFT operands must share the dtype")
        bits = {I8: 8, I16: 16, I32: 32}[a.dtype]
        self._need(0 <= shift.lo and shift.hi <= bits - 1, f"shift [{shift.lo}, {shift.hi}] outside [0, {bits - 1}]")

        def f(x: int, s: int) -> int:
            return round_shift(x, s) if rnd and s > 0 else x >> s

        corners = [f(x, s) for x in (a.lo, a.hi) for s in (shift.lo, shift.hi)]
        out = self._new(_bcast(a.shape, shift.shape), a.dtype, min(corners), max(corners))
        return self._emit("ARITHMETIC_RIGHT_SHIFT", [a.name, shift.name], out, "ArithmeticRightShift", rnd)

    def ars_k(self, a: T, k: int, rnd: bool = False) -> T:
        return a if k == 0 else self.ars(a, self.scalar(k, a.dtype, a.rank), rnd)

    def lls(self, a: T, shift: T) -> T:
        """``LOGICAL_LEFT_SHIFT`` int32 (wraps): the exact ``a * 2**shift`` must fit."""
        self._i32(a, shift)
        self._need(0 <= shift.lo and shift.hi <= 31, f"shift [{shift.lo}, {shift.hi}] outside [0, 31]")
        corners = [x << s for x in (a.lo, a.hi) for s in (shift.lo, shift.hi)]
        lo, hi = min(corners), max(corners)
        self._need(_fits(lo, hi, I32), f"LOGICAL_LEFT_SHIFT can wrap ([{lo}, {hi}])")
        return self._emit("LOGICAL_LEFT_SHIFT", [a.name, shift.name], self._new(_bcast(a.shape, shift.shape), I32,
                                                                               lo, hi), "LogicalLeftShift")

    def abs(self, a: T) -> T:
        self._i32(a)
        self._need(a.lo > INT32_MIN, "ABS(-2**31) overflows")
        lo = 0 if a.lo <= 0 <= a.hi else min(abs(a.lo), abs(a.hi))
        return self._emit("ABS", [a.name], self._new(a.shape, I32, lo, a.amax), "Abs")

    def clz(self, a: T) -> T:
        self._i32(a)
        lo, hi = (32 - a.hi.bit_length(), 32 - a.lo.bit_length()) if a.lo >= 0 else (0, 32)
        return self._emit("CLZ", [a.name], self._new(a.shape, I32, lo, hi), "Clz")

    def greater(self, a: T, b: T) -> T:
        self._i32(a, b)
        return self._emit("GREATER", [a.name, b.name], self._new(_bcast(a.shape, b.shape), BOOL, 0, 1), "Greater")

    def select(self, cond: T, a: T, b: T) -> T:
        """``cond ? a : b`` (``cond`` bool, broadcast)."""
        self._need(cond.dtype == BOOL and a.dtype == b.dtype, "SELECT needs a bool condition and equal dtypes")
        shape = _bcast(_bcast(cond.shape, a.shape), b.shape)
        out = self._new(shape, a.dtype, min(a.lo, b.lo), max(a.hi, b.hi))
        return self._emit("SELECT", [cond.name, a.name, b.name], out, "Select")

    def clamp8(self, a: T, lo: int, hi: int) -> T:
        """``CLAMP`` on int8 (PRO-INT has no int32 CLAMP: ``clip32`` uses MAXIMUM/MINIMUM)."""
        self._need(a.dtype == I8, "clamp8 needs int8")
        if a.lo >= lo and a.hi <= hi:
            return a
        cv = self.ts.TosaSerializer.convertDataToUint8Vec
        out = self._new(a.shape, I8, max(a.lo, lo), min(a.hi, hi))
        return self._emit("CLAMP", [a.name], out, "Clamp", cv(self.DType.INT8, [lo]), cv(self.DType.INT8, [hi]),
                          self.ts.NanPropagationMode.PROPAGATE)

    def cast(self, a: T, dtype: str) -> T:
        """``CAST`` between int8/int16/int32 (narrowing wraps: the interval must fit)."""
        if a.dtype == dtype:
            return a
        self._need(_fits(a.lo, a.hi, dtype), f"CAST {a.dtype}->{dtype} would wrap [{a.lo}, {a.hi}]")
        return self._emit("CAST", [a.name], self._new(a.shape, dtype, a.lo, a.hi), "Cast")

    def reduce_sum(self, a: T, axis: int, proven: tuple[int, int] | None = None) -> T:
        self._i32(a)
        n = a.shape[axis]
        lo, hi = proven or (min(n * a.lo, a.lo), max(n * a.hi, a.hi))
        self._need(_fits(lo, hi, I32), f"REDUCE_SUM can leave int32 ([{lo}, {hi}])")
        shape = list(a.shape)
        shape[axis] = 1
        return self._emit("REDUCE_SUM", [a.name], self._new(shape, I32, lo, hi), "ReduceSum", axis)

    def reduce_max(self, a: T, axis: int) -> T:
        shape = list(a.shape)
        shape[axis] = 1
        out = self._new(shape, a.dtype, a.lo, a.hi)
        return self._emit("REDUCE_MAX", [a.name], out, "ReduceMax", axis, self.ts.NanPropagationMode.PROPAGATE)

    # ------------------------------------------------------------------ RESCALE, TABLE, GATHER, MATMUL
    def rescale(self, a: T, mult: Sequence[int], shift: Sequence[int], dtype: str, *, in_zp: int = 0,
                out_zp: int = 0, in_unsigned: bool = False, out_unsigned: bool = False,
                v_bounds: Sequence[tuple[int, int]] | None = None) -> T:
        """``RESCALE`` (scale32, SINGLE_ROUND): ``sat(round_shift((a - in_zp) * m, s) + out_zp)``.

        ``mult``/``shift`` have one entry (per tensor) or one per channel of the last axis; ``v_bounds`` (one
        ``(lo, hi)`` per entry) may narrow the interval of ``a - in_zp`` per channel.  Checks the REQUIREs:
        ``0 <= m < 2**31``, ``2 <= s <= 62``, ``-2**(s-1) <= v < 2**(s-1)``."""
        n = len(mult)
        self._need(n == len(shift) and n in (1, a.shape[-1] if a.rank else 1), "RESCALE constants shape")
        if in_unsigned:
            self._need(a.dtype == I8 and in_zp == 0, "input_unsigned RESCALE reads uint8 bits with zp 0")
            vlo, vhi = 0, 255
        else:
            vlo, vhi = a.lo - in_zp, a.hi - in_zp
        bounds = list(v_bounds) if v_bounds is not None else [(vlo, vhi)] * n
        lo_all, hi_all = [], []
        for m, s, (blo, bhi) in zip(mult, shift, bounds, strict=True):
            self._need(0 <= m <= INT32_MAX, f"RESCALE multiplier {m} outside [0, 2**31)")
            self._need(2 <= s <= 62, f"RESCALE shift {s} outside [2, 62]")
            self._need(-(1 << (s - 1)) <= blo and bhi < (1 << (s - 1)),
                       f"RESCALE input [{blo}, {bhi}] outside +-2**{s - 1} (shift {s})")
            lo_all.append(round_shift(blo * m, s) + out_zp)
            hi_all.append(round_shift(bhi * m, s) + out_zp)
        olo, ohi = (0, 255) if out_unsigned else _RANGES[dtype]
        lo, hi = min(max(min(lo_all), olo), ohi), max(min(max(hi_all), ohi), olo)
        if out_unsigned:  # stored as raw uint8 bits in an int8 tensor: no useful signed interval
            lo, hi = _RANGES[I8]
        in_zp_t = self.const(np.array([in_zp]), a.dtype)
        out_zp_t = self.const(np.array([out_zp]), dtype)
        m_t = self.const(np.asarray(mult, dtype=np.int64), I32)
        s_t = self.const(np.asarray(shift, dtype=np.int64), I8)
        out = self._new(a.shape, dtype, lo, hi)
        return self._emit("RESCALE", [a.name, m_t.name, s_t.name, in_zp_t.name, out_zp_t.name], out, "Rescale",
                          True, self.ts.RoundingMode.SINGLE_ROUND, n > 1, in_unsigned, out_unsigned)

    def table(self, a: T, table: np.ndarray) -> T:
        """``TABLE`` int8 -> int8: ``table[a + 128]`` (256 entries)."""
        self._need(a.dtype == I8 and table.shape == (256,), "TABLE needs int8 input and 256 int8 entries")
        t = self.const(table, I8)
        used = table.astype(np.int64)[a.lo + 128:a.hi + 129]
        return self._emit("TABLE", [a.name, t.name], self._new(a.shape, I8, int(used.min()), int(used.max())), "Table")

    def gather(self, values: T, idx: T) -> T:
        """``GATHER``: values ``(N, K, C)``, int32 indices ``(N, W)`` in ``[0, K)`` -> ``(N, W, C)``."""
        self._need(values.rank == 3 and idx.rank == 2 and idx.dtype == I32, "GATHER shapes/dtypes")
        self._need(0 <= idx.lo and idx.hi < values.shape[1], f"GATHER index [{idx.lo}, {idx.hi}] out of range")
        out = self._new((idx.shape[0], idx.shape[1], values.shape[2]), values.dtype, values.lo, values.hi)
        return self._emit("GATHER", [values.name, idx.name], out, "Gather")

    def matmul(self, a: T, b: T, a_zp: int, b_zp: int, bound: int) -> T:
        """``MATMUL`` int8 ``(N, H, C) x (N, C, W)`` -> int32: ``sum (a - a_zp)(b - b_zp)``; ``bound`` is the proven
        ``max |acc|`` (the reference model wraps silently past int32)."""
        self._need(a.dtype == I8 and b.dtype == I8 and a.rank == 3 and b.rank == 3, "MATMUL needs int8 rank-3")
        self._need(a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1], f"MATMUL shapes {a.shape} x {b.shape}")
        self._need(bound <= INT32_MAX, f"MATMUL accumulator bound {bound} leaves int32")
        za, zb = self.const(np.array([a_zp]), I8), self.const(np.array([b_zp]), I8)
        out = self._new((a.shape[0], a.shape[1], b.shape[2]), I32, -bound, bound)
        return self._emit("MATMUL", [a.name, b.name, za.name, zb.name], out, "MatMul")

    # ------------------------------------------------------------------ data layout
    def reshape(self, a: T, shape: Sequence[int]) -> T:
        shape = tuple(int(s) for s in shape)
        if shape == a.shape:
            return a
        self._need(int(np.prod(shape)) == int(np.prod(a.shape)), f"RESHAPE {a.shape} -> {shape}")
        out = self._new(shape, a.dtype, a.lo, a.hi)
        return self._emit("RESHAPE", [a.name, self.shape_const(shape)], out, "Reshape")

    def transpose(self, a: T, perm: Sequence[int]) -> T:
        perm = [int(p) for p in perm]
        if perm == list(range(a.rank)):
            return a
        out = self._new(tuple(a.shape[p] for p in perm), a.dtype, a.lo, a.hi)
        return self._emit("TRANSPOSE", [a.name], out, "Transpose", perm)

    def slice(self, a: T, start: Sequence[int], size: Sequence[int]) -> T:
        if list(start) == [0] * a.rank and tuple(size) == a.shape:
            return a
        self._need(all(0 <= s and s + n <= d and n >= 1 for s, n, d in zip(start, size, a.shape, strict=True)),
                   f"SLICE {start}+{size} out of {a.shape}")
        out = self._new(size, a.dtype, a.lo, a.hi)
        return self._emit("SLICE", [a.name, self.shape_const(start), self.shape_const(size)], out, "Slice")

    def slice_axis(self, a: T, axis: int, start: int, end: int) -> T:
        st = [0] * a.rank
        sz = list(a.shape)
        st[axis], sz[axis] = start, end - start
        return self.slice(a, st, sz)

    def concat(self, parts: Sequence[T], axis: int) -> T:
        if len(parts) == 1:
            return parts[0]
        dt = parts[0].dtype
        self._need(dt in (I8, I32, BOOL) and all(p.dtype == dt for p in parts), "CONCAT needs int8/int32 (PRO-INT)")
        self._need(len(parts) <= 64, "CONCAT of more than 64 tensors (level 8K)")
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        out = self._new(shape, dt, min(p.lo for p in parts), max(p.hi for p in parts))
        return self._emit("CONCAT", [p.name for p in parts], out, "Concat", axis)

    def pad(self, a: T, pads: Sequence[tuple[int, int]], value: int) -> T:
        """``PAD`` with ``(before, after)`` per axis and the constant ``value`` (in ``a``'s representation)."""
        if all(p == (0, 0) for p in pads):
            return a
        flat = [int(v) for p in pads for v in p]
        shape = [d + b + e for d, (b, e) in zip(a.shape, pads, strict=True)]
        pc = self.const(np.array([value]), a.dtype)
        out = self._new(shape, a.dtype, min(a.lo, value), max(a.hi, value))
        return self._emit("PAD", [a.name, self.shape_const(flat), pc.name], out, "Pad")

    def tile(self, a: T, multiples: Sequence[int]) -> T:
        if all(m == 1 for m in multiples):
            return a
        out = self._new([d * m for d, m in zip(a.shape, multiples, strict=True)], a.dtype, a.lo, a.hi)
        return self._emit("TILE", [a.name, self.shape_const(multiples)], out, "Tile")

    def identity(self, a: T) -> T:
        return self._emit("IDENTITY", [a.name], self._new(a.shape, a.dtype, a.lo, a.hi), "Identity")

    def serialize(self) -> bytes:
        return bytes(self.ser.serialize())
