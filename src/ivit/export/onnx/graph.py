"""A small ONNX graph builder with exact integer helpers and a static overflow proof.

Every helper emits integer ops only, of the types ONNX Runtime's CPU provider implements (int32/int64
arithmetic, uint32/uint64 ``BitShift``; int8/uint8/int16 only for data movement, ``Cast`` and
``MatMulInteger``), and tracks an interval ``[lo, hi]`` for every value it makes.  An arithmetic op whose
interval could leave its dtype is refused at export time (``OverflowRisk``), so a graph that is written
never wraps.  Where ``ivit.ops`` proves a tighter bound than interval arithmetic can see (for example
``|z| <= 2**21`` in I-LayerNorm), the lowering states it with ``assume``, citing the proof.

Rounding traps and how the helpers avoid them:

* ``Div`` on integers truncates toward zero in ONNX Runtime, while the ONNX reference evaluator floors
  (onnxruntime#26997).  ``Div`` is only emitted where the dividend is ``>= 0`` and the divisor ``> 0``
  (or both ``<= 0`` / ``< 0``: a non-negative quotient), where the two conventions agree.  A possibly
  negative dividend is first lifted by a multiple of the divisor, ``floor(a / d) = (a + K d) / d - K``
  with ``a + K d >= 0`` proven from ``a``'s interval; ``Mod(fmod=0)`` is the fallback when no such ``K`` fits.
* ``BitShift`` is unsigned-only: an arithmetic right shift ``a >> s`` is computed as
  ``uint64(a + K 2**s) >> s`` cast back, minus ``K`` (exact, ``a + K 2**s >= 0``); left shifts of
  non-negative values are ``BitShift(LEFT)`` on the unsigned cast.  Per-element shift amounts are tensors
  of the same unsigned type (never ``Pow`` on floats, never a float anywhere).
* ``round_shift(x, s) = floor((x + 2**(s-1)) / 2**s)`` (half up, as ``ivit.ops.round_shift``): the ``2**(s-1)``
  is folded into the lift constant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Graph", "OverflowRisk", "onnx_dtype", "np_dtype", "I8", "U8", "I16", "I32", "I64"]

I8, U8, I16 = np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16)
I32, I64 = np.dtype(np.int32), np.dtype(np.int64)
U32, U64, BOOL = np.dtype(np.uint32), np.dtype(np.uint64), np.dtype(np.bool_)
_UNSIGNED = {I32: U32, I64: U64}

_TORCH_NP = {"torch.int8": I8, "torch.uint8": U8, "torch.int16": I16, "torch.int32": I32, "torch.int64": I64,
             "torch.bool": BOOL}


class OverflowRisk(AssertionError):
    """A lowering would emit an op whose result might leave its dtype (a bug in a lowering, not user input)."""


def np_dtype(torch_dtype: Any) -> np.dtype:
    return _TORCH_NP[str(torch_dtype)]


def onnx_dtype(dt: Any) -> int:
    """ONNX elem type of a numpy dtype."""
    from onnx import TensorProto as T

    return {I8: T.INT8, U8: T.UINT8, I16: T.INT16, I32: T.INT32, I64: T.INT64, U32: T.UINT32, U64: T.UINT64,
            BOOL: T.BOOL}[np.dtype(dt)]


def _range(dt: np.dtype) -> tuple[int, int]:
    if dt == BOOL:
        return 0, 1
    info = np.iinfo(dt)
    return int(info.min), int(info.max)


class Graph:
    """Nodes and initializers of one ONNX graph; the elem type and interval of every value it makes.

    Values are names (str).  ``scope`` prefixes node and temporary names (set per program node).
    """

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.bounds: dict[str, tuple[int, int]] = {}
        self.u8_twin: dict[str, tuple[str, int]] = {}
        self.wide: dict[str, str] = {}  # a narrow value -> the same integers in a wider dtype (made before it)
        self.moves: dict[str, tuple[str, str, list[str], dict[str, Any]]] = {}  # data movement: out -> (src, op, ...)
        self.twin_recipes: dict[str, Any] = {}  # an int8 value -> a function making its uint8 twin directly
        self._const_cache: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._n = 0
        self.scope = "g"

    # -- values ---------------------------------------------------------------------------------------

    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"{self.scope}/{hint}{self._n}"

    def declare(self, name: str, dtype: Any, lo: int | None = None, hi: int | None = None) -> str:
        dt = np.dtype(dtype)
        dlo, dhi = _range(dt)
        self.dtypes[name] = dt
        self.bounds[name] = (dlo if lo is None else max(dlo, int(lo)), dhi if hi is None else min(dhi, int(hi)))
        return name

    def dtype(self, v: str) -> np.dtype:
        return self.dtypes[v]

    def lohi(self, v: str) -> tuple[int, int]:
        return self.bounds[v]

    def assume(self, v: str, lo: int, hi: int) -> str:
        """Narrow ``v``'s interval to ``[lo, hi]``: a bound the specification proves (cite it at the call)."""
        a, b = self.bounds[v]
        self.bounds[v] = (max(a, int(lo)), min(b, int(hi)))
        return v

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """An initializer holding ``value`` (deduplicated by dtype, shape and bytes)."""
        arr = np.array(value, dtype=dtype, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        hit = self._const_cache.get(key)
        if hit is not None:
            return hit
        name = f"c{len(self.initializers)}"
        self.initializers[name] = arr
        self._const_cache[key] = name
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        return self.declare(name, arr.dtype, lo, hi)

    def op(self, op_type: str, inputs: list[str], dtype: Any, bounds: tuple[int, int] | None = None,
           hint: str | None = None, **attrs: Any) -> str:
        """Append one node with a single output of elem type ``dtype`` (interval ``bounds``, default the dtype's)."""
        from onnx import helper

        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return self.declare(out, dtype, *(bounds or (None, None)))

    def _arith(self, op_type: str, inputs: list[str], dtype: np.dtype, lo: int, hi: int, **attrs: Any) -> str:
        dlo, dhi = _range(dtype)
        if lo < dlo or hi > dhi:
            raise OverflowRisk(f"{self.scope}: {op_type} on {dtype} could overflow (interval [{lo}, {hi}])")
        return self.op(op_type, inputs, dtype, (lo, hi), **attrs)

    def rename_output(self, v: str, name: str) -> str:
        """Give the value ``v`` the name ``name`` (an ``Identity``)."""
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [v], [name], name=f"{name}/identity"))
        return self.declare(name, self.dtype(v), *self.lohi(v))

    # -- casts and elementwise ----------------------------------------------------------------------------

    def cast(self, v: str, dtype: Any) -> str:
        dt = np.dtype(dtype)
        if self.dtype(v) == dt:
            return v
        w = self.wide.get(v)
        if w is not None and self.dtype(w) == dt:  # the same integers already exist in that dtype
            return w
        lo, hi = self.lohi(v)
        dlo, dhi = _range(dt)
        if lo < dlo or hi > dhi:
            raise OverflowRisk(f"{self.scope}: Cast of [{lo}, {hi}] to {dt} could wrap")
        return self.op("Cast", [v], dt, (lo, hi), to=onnx_dtype(dt))

    def store(self, v: str, dtype: Any) -> str:
        """Cast ``v`` to a narrower ``dtype``, remembering ``v`` as its wide twin (later casts back are free)."""
        out = self.cast(v, dtype)
        if out != v:
            self.wide[out] = v
        return out

    def _operand(self, v: Any, dtype: np.dtype) -> str:
        if isinstance(v, str):
            if self.dtype(v) != dtype:
                raise TypeError(f"{self.scope}: operand {v} is {self.dtype(v)}, expected {dtype}")
            return v
        return self.const(v, dtype)

    def add(self, a: str, b: Any) -> str:
        dt = self.dtype(a)
        b = self._operand(b, dt)
        (al, ah), (bl, bh) = self.lohi(a), self.lohi(b)
        return self._arith("Add", [a, b], dt, al + bl, ah + bh)

    def sub(self, a: str, b: Any) -> str:
        dt = self.dtype(a)
        b = self._operand(b, dt)
        (al, ah), (bl, bh) = self.lohi(a), self.lohi(b)
        return self._arith("Sub", [a, b], dt, al - bh, ah - bl)

    def rsub(self, a: Any, b: str) -> str:
        """``a - b`` with a constant ``a``."""
        dt = self.dtype(b)
        a = self._operand(a, dt)
        (al, ah), (bl, bh) = self.lohi(a), self.lohi(b)
        return self._arith("Sub", [a, b], dt, al - bh, ah - bl)

    def mul(self, a: str, b: Any, proven: tuple[int, int] | None = None) -> str:
        """``a * b``; ``proven``: the product's interval where the specification proves one tighter than
        interval arithmetic (cite the proof at the call)."""
        dt = self.dtype(a)
        b = self._operand(b, dt)
        (al, ah), (bl, bh) = self.lohi(a), self.lohi(b)
        p = (al * bl, al * bh, ah * bl, ah * bh)
        lo, hi = proven or (min(p), max(p))
        return self._arith("Mul", [a, b], dt, max(lo, min(p)), min(hi, max(p)))

    def square(self, a: str) -> str:
        al, ah = self.lohi(a)
        m = max(abs(al), abs(ah))
        lo = 0 if al <= 0 <= ah else min(abs(al), abs(ah)) ** 2
        return self._arith("Mul", [a, a], self.dtype(a), lo, m * m)

    def maximum(self, a: str, b: Any) -> str:
        dt = self.dtype(a)
        b = self._operand(b, dt)
        (al, ah), (bl, bh) = self.lohi(a), self.lohi(b)
        return self._arith("Max", [a, b], dt, max(al, bl), max(ah, bh))

    def minimum(self, a: str, b: Any) -> str:
        dt = self.dtype(a)
        b = self._operand(b, dt)
        (al, ah), (bl, bh) = self.lohi(a), self.lohi(b)
        return self._arith("Min", [a, b], dt, min(al, bl), min(ah, bh))

    def clip(self, a: str, lo: int, hi: int) -> str:
        dt = self.dtype(a)
        al, ah = self.lohi(a)
        if lo <= al and ah <= hi:
            return a
        return self._arith("Clip", [a, self.const(lo, dt), self.const(hi, dt)], dt, max(al, lo), min(ah, hi))

    def abs(self, a: str) -> str:
        al, ah = self.lohi(a)
        lo = 0 if al <= 0 <= ah else min(abs(al), abs(ah))
        return self._arith("Abs", [a], self.dtype(a), lo, max(abs(al), abs(ah)))

    # -- division and shifts --------------------------------------------------------------------------------

    def div_nonneg_quotient(self, a: str, b: Any) -> str:
        """``a / b`` where the quotient is provably ``>= 0`` (``a >= 0, b > 0`` or ``a <= 0, b < 0``): truncation
        and floor agree there."""
        dt = self.dtype(a)
        b = self._operand(b, dt)
        (al, ah), (bl, bh) = self.lohi(a), self.lohi(b)
        if al >= 0 and bl > 0:
            return self._arith("Div", [a, b], dt, al // bh, ah // bl)
        if ah <= 0 and bh < 0:
            return self._arith("Div", [a, b], dt, ah // bl, al // bh)
        raise OverflowRisk(f"{self.scope}: Div of [{al}, {ah}] by [{bl}, {bh}] may truncate a negative quotient")

    def floor_div(self, a: str, d: int | np.ndarray) -> str:
        """``floor(a / d)`` for a constant ``d > 0`` (scalar or broadcast array), exact for any sign of ``a``."""
        dt = self.dtype(a)
        d = np.asarray(d, dtype=np.int64)
        if int(d.min()) <= 0:
            raise ValueError("floor_div needs a positive divisor")
        al, ah = self.lohi(a)
        if al >= 0:
            return self.div_nonneg_quotient(a, d.astype(dt))
        ks = [(-al + int(x) - 1) // int(x) for x in d.flat]  # a + k*d >= 0
        k = np.array(ks, dtype=object).reshape(d.shape)
        lift = np.array([kk * int(x) for kk, x in zip(ks, d.flat, strict=True)], dtype=object).reshape(d.shape)
        if ah + int(np.max(lift)) <= _range(dt)[1]:
            q = self.div_nonneg_quotient(self.add(a, lift.astype(dt)), d.astype(dt))
            return self.sub(q, k.astype(dt))
        # no lift fits: a - Mod(a, d) is a multiple of d (Mod with fmod=0 has the divisor's sign)
        dc = self.const(d.astype(dt), dt)
        r = self.op("Mod", [a, dc], dt, (0, int(d.max()) - 1), fmod=0)
        exact = self._arith("Sub", [a, r], dt, al - int(d.max()) + 1, ah)
        ends = (int(d.min()), int(d.max()))  # floor(a / d) is monotone in a and in d: extremes at the ends
        return self._arith("Div", [exact, dc], dt, min(al // x for x in ends), max(ah // x for x in ends))

    def shift_right(self, a: str, s: Any, add: int | np.ndarray = 0, narrow: bool = False) -> str:
        """``floor((a + add) / 2**s)`` (an arithmetic ``>>``) via an unsigned ``BitShift``.

        ``s``: constant (scalar or broadcast array, ``0 <= s <= 62``) or a value (per-element amounts, its
        interval bounds them).  ``add`` (constant, broadcast like ``s``) is folded into the lift.  Where no
        lift fits the dtype (``|a|`` near its limit) the constant case falls back to ``floor_div``.
        ``narrow``: return int32 when the result's interval fits (cheaper ops after it), else ``a``'s dtype."""
        dt = self.dtype(a)
        ut = _UNSIGNED[dt]
        bits = 64 if dt == I64 else 32
        if isinstance(s, str):
            smin, smax = self.lohi(s)
            s_val = self.cast(s, ut)
            s_const = None
        else:
            s_const = np.asarray(s, dtype=np.int64)
            smin, smax = int(s_const.min()), int(s_const.max())
            s_val = self.const(s_const.astype(ut), ut)
        if not 0 <= smin <= smax <= bits - 1:
            raise ValueError(f"shift amounts [{smin}, {smax}] out of range for {dt}")
        add_arr = np.asarray(add, dtype=np.int64)
        al, ah = self.lohi(a)
        lo = al + int(add_arr.min())
        if s_const is None:  # one k with k * 2**s >= -lo for every s >= smin (k = 0 if lo >= 0)
            k = max(0, -(lo >> smin) if lo < 0 else 0)  # -floor(lo / 2**smin) >= ceil(-lo / 2**s) for s >= smin
            lift_max = k << smax
            if k:
                base = self.const(k, ut)
                lift = self.op("BitShift", [base, s_val], ut, (k << smin, lift_max), direction="LEFT")
                total = self.add(self.cast(lift, dt), add_arr.astype(dt)) if add_arr.any() else self.cast(lift, dt)
                v = self.add(a, total)
            else:
                v = self.add(a, add_arr.astype(dt)) if add_arr.any() else a
        else:
            # per channel: k_c = ceil(-lo_c / 2**s_c) (0 where lo_c >= 0), lift_c = k_c 2**s_c + add_c
            shape = np.broadcast_shapes(s_const.shape, add_arr.shape)
            ss = [int(x) for x in np.broadcast_to(s_const, shape).flat]
            adds = [int(x) for x in np.broadcast_to(add_arr, shape).flat]
            ks = [max(0, -((al + ad) >> sc)) for sc, ad in zip(ss, adds, strict=True)]
            lifts = [(kc << sc) + ad for kc, sc, ad in zip(ks, ss, adds, strict=True)]
            if ah + max(lifts) > _range(dt)[1]:  # no lift fits (|a| near the dtype's limit): divide exactly
                b = self.add(a, add_arr.astype(dt)) if add_arr.any() else a
                return self.floor_div(b, np.left_shift(np.int64(1), s_const))
            k = np.array(ks, dtype=np.int64).reshape(shape)
            s_val = self.const(np.broadcast_to(s_const, shape).astype(ut), ut)
            v = self.add(a, np.array(lifts, dtype=np.int64).reshape(shape).astype(dt)) if any(lifts) else a
        vl, vh = self.lohi(v)
        if vl < 0:
            raise OverflowRisk(f"{self.scope}: shift lift leaves [{vl}, {vh}] negative")
        u = self.cast(v, ut)
        r = self.op("BitShift", [u, s_val], ut, (vl >> smax, vh >> smin), direction="RIGHT")
        kmax = int(np.max(k))
        rl, rh = self.lohi(r)
        out_dt = I32 if narrow and dt == I64 and rh <= _range(I32)[1] and rl - kmax >= _range(I32)[0] else dt
        r = self.cast(r, out_dt)
        if isinstance(k, np.ndarray):
            return self.sub(r, k.astype(out_dt)) if k.any() else r
        return self.sub(r, k) if k else r

    def log2e_mul(self, a: str) -> str:
        """ShiftExp's ``I + (I >> 1) - (I >> 4)`` (``log2 e ~= 1.0111b``), exact for any sign.

        One lift ``L = 16 ceil(-lo / 16)`` and one unsigned cast serve both shifts:
        ``u = I + L``, ``u + (u >> 1) - (u >> 4) = f(I) + 23 L / 16``.  ``f`` is non-decreasing, so its
        interval is ``[f(lo), f(hi)]``."""
        dt = self.dtype(a)
        ut = _UNSIGNED[dt]
        al, ah = self.lohi(a)

        def f(i: int) -> int:
            return i + (i >> 1) - (i >> 4)

        lift = 16 * ((-al + 15) // 16) if al < 0 else 0
        base = 23 * lift // 16
        u = self.cast(self.add(a, lift) if lift else a, ut)
        ul, uh = self.lohi(u)
        half = self.op("BitShift", [u, self.const(1, ut)], ut, (ul >> 1, uh >> 1), direction="RIGHT")
        sixteenth = self.op("BitShift", [u, self.const(4, ut)], ut, (ul >> 4, uh >> 4), direction="RIGHT")
        t = self._arith("Add", [u, half], ut, ul + (ul >> 1), uh + (uh >> 1))
        t = self.op("Sub", [t, sixteenth], ut, (f(al) + base, f(ah) + base))  # u >> 4 <= u: no wrap
        r = self.cast(t, dt)
        return self.sub(r, base) if base else r

    def round_shift(self, a: str, s: Any, narrow: bool = False) -> str:
        """``floor((a + 2**(s-1)) / 2**s)`` (``ops.round_shift``, half up); constant ``1 <= s <= 62``
        (``narrow`` as in ``shift_right``)."""
        s = np.asarray(s, dtype=np.int64)
        if int(s.min()) < 1:
            raise ValueError("round_shift needs shift >= 1")
        return self.shift_right(a, s, add=np.left_shift(np.int64(1), s - 1), narrow=narrow)

    def widen(self, a: str, b: str) -> tuple[str, str]:
        """``a`` and ``b`` in the wider of their two dtypes."""
        da, db = self.dtype(a), self.dtype(b)
        if da == db:
            return a, b
        wide = da if da.itemsize > db.itemsize else db
        return self.cast(a, wide), self.cast(b, wide)

    def shift_left_nonneg(self, a: str, s: str) -> str:
        """``a << s`` for ``a >= 0`` and a value ``s >= 0`` of per-element amounts (unsigned ``BitShift``)."""
        dt = self.dtype(a)
        ut = _UNSIGNED[dt]
        (al, ah), (sl, sh) = self.lohi(a), self.lohi(s)
        if al < 0 or sl < 0:
            raise OverflowRisk(f"{self.scope}: left shift of a possibly negative value")
        hi = ah << sh
        if hi > _range(dt)[1]:
            raise OverflowRisk(f"{self.scope}: left shift could overflow ({ah} << {sh})")
        r = self.op("BitShift", [self.cast(a, ut), self.cast(s, ut)], ut, (al << sl, hi), direction="LEFT")
        return self.cast(r, dt)

    # -- reductions, comparisons, tables ----------------------------------------------------------------

    def reduce_sum(self, a: str, axes: list[int], count: int, keepdims: bool = True) -> str:
        """Sum over ``axes`` (``count`` elements per sum)."""
        lo, hi = self.lohi(a)
        return self._arith("ReduceSum", [a, self.const(np.asarray(axes, np.int64))], self.dtype(a),
                           min(lo, lo * count), max(hi, hi * count), keepdims=int(keepdims))

    def reduce_max(self, a: str, axes: list[int], keepdims: bool = True) -> str:
        return self.op("ReduceMax", [a, self.const(np.asarray(axes, np.int64))], self.dtype(a), self.lohi(a),
                       keepdims=int(keepdims))

    def where(self, cond: str, a: Any, b: Any, dtype: Any) -> str:
        dt = np.dtype(dtype)
        a, b = self._operand(a, dt), self._operand(b, dt)
        (al, ah), (bl, bh) = self.lohi(a), self.lohi(b)
        return self.op("Where", [cond, a, b], dt, (min(al, bl), max(ah, bh)))

    def gather(self, table: np.ndarray | str, idx: str, axis: int = 0) -> str:
        """``table[idx]`` along ``axis`` (int32/int64 indices; negative ones count from the end)."""
        t = table if isinstance(table, str) else self.const(table, table.dtype)
        return self.op("Gather", [t, idx], self.dtype(t), self.lohi(t), axis=axis)

    def lookup(self, table: np.ndarray, idx: str) -> str:
        """``table[idx]`` of a 1-D constant table, elementwise over any shape of ``idx`` (negative indices count
        from the end): ``GatherElements`` on the flattened indices, which ONNX Runtime runs far faster than a
        ``Gather`` of single elements."""
        t = self.const(table, table.dtype)
        flat = self.op("Reshape", [idx, self.const(np.asarray([-1], np.int64))], self.dtype(idx), self.lohi(idx))
        shape = self.op("Shape", [idx], I64)

        def gather(tab: str) -> str:
            out = self.op("GatherElements", [tab, flat], self.dtype(tab), self.lohi(tab), axis=0)
            return self.op("Reshape", [out, shape], self.dtype(tab), self.lohi(tab))

        out = gather(t)
        if self.dtype(t) == I8:  # a GEMM operand: the same lookup in a table lifted to uint8
            self.twin_recipes[out] = lambda: (gather(self.const((table.astype(np.int16) + 128).astype(np.uint8),
                                                                U8)), 128)
        return out

    def bit_length(self, v: str, max_bits: int) -> str:
        """Bit length of each int64 ``0 <= v < 2**max_bits``: ``#{j < max_bits : v >= 2**j}`` (one comparison
        against a row of thresholds on a new last axis, summed)."""
        lo, hi = self.lohi(v)
        if lo < 0 or hi >= 1 << max_bits:
            raise OverflowRisk(f"{self.scope}: bit_length of [{lo}, {hi}] with max_bits={max_bits}")
        thresholds = np.left_shift(np.int64(1), np.arange(max_bits, dtype=np.int64))
        ge = self.op("GreaterOrEqual", [self.unsqueeze_last(v), self.const(thresholds)], BOOL)
        return self.reduce_sum(self.cast(ge, I64), [-1], max_bits, keepdims=False)

    def unsqueeze_last(self, v: str) -> str:
        return self.op("Unsqueeze", [v, self.const(np.asarray([-1], np.int64))], self.dtype(v), self.lohi(v))

    def isqrt(self, v: str, max_bits: int) -> str:
        """``floor(sqrt(v))`` of int64 ``0 <= v < 2**max_bits``, exactly (= ``ops.isqrt``).

        Start ``k = 2**ceil(bitlen(v)/2) >= sqrt(v)`` (a table lookup), then Newton from above
        ``k <- min(k, (k + v // max(k, 1)) // 2)``, unrolled; every term is ``>= 0`` so the divisions are
        floors.  ``k0 <= 2 sqrt(v)`` and the error obeys ``e' <= e**2 / (2 sqrt(v))``, so after ``i`` steps
        ``e <= sqrt(v) / 2**(2**i - 1)``: ``ceil(log2(max_bits / 2 + 1)) + 2`` steps reach ``floor(sqrt(v))``
        (the ``min`` keeps it there).
        """
        bl = self.bit_length(v, max_bits)
        starts = np.left_shift(np.int64(1), (np.arange(max_bits + 1, dtype=np.int64) + 1) >> 1)
        k = self.gather(starts, bl)
        steps = int(np.ceil(np.log2(max_bits / 2 + 1))) + 2
        for _ in range(steps):
            q = self.div_nonneg_quotient(v, self.maximum(k, 1))
            k = self.minimum(k, self.div_nonneg_quotient(self.add(k, q), 2))
        return k

    # -- GEMM operands --------------------------------------------------------------------------------------

    def move(self, op_type: str, x: str, rest: list[str], **attrs: Any) -> str:
        """A data-movement op (``Reshape``, ``Transpose``, ``Slice``, ``Gather``) of ``x`` (further inputs ``rest``):
        same dtype and interval; remembered so that ``to_u8`` can move ``x``'s uint8 twin the same way."""
        out = self.op(op_type, [x, *rest], self.dtype(x), self.lohi(x), **attrs)
        self.moves[out] = (x, op_type, rest, attrs)
        return out

    def to_u8(self, v: str) -> tuple[str, int]:
        """``(u, zero_point)`` with ``u - zero_point == v`` as uint8 (int8 values are lifted by 128; memoized).

        The lift is made from the widest copy of the integers there is (``wide``), and moves through data
        movement (``move``), so a GEMM operand is usually one ``Add`` and one ``Cast`` away from the
        requantization that made it."""
        dt = self.dtype(v)
        if dt == U8:
            return v, 0
        if dt != I8:
            raise TypeError(f"GEMM operand must be int8/uint8, got {dt}")
        hit = self.u8_twin.get(v)
        if hit is None:
            if v in self.twin_recipes:
                hit = self.twin_recipes[v]()
            elif v in self.moves:
                src, op_type, rest, attrs = self.moves[v]
                su, zp = self.to_u8(src)
                hit = (self.op(op_type, [su, *rest], U8, self.lohi(su), **attrs), zp)
            else:
                w = self.wide.get(v)
                w = self.add(w if w is not None else self.cast(v, I16), 128)
                hit = (self.cast(w, U8), 128)
            self.u8_twin[v] = hit
        return hit

    def prune(self, outputs: list[str]) -> None:
        """Drop nodes (and initializers) that no output depends on."""
        needed = set(outputs)
        keep = []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
        self.nodes = keep[::-1]
        self.initializers = {k: v for k, v in self.initializers.items() if k in needed}
