"""C lowerings: one function per op of ``ivit.ir.OPSET`` (fused and legacy ops included).

A lowering receives a ``NodeCtx`` (the node, its operands with concrete shapes and value intervals,
its constants and attributes, the target flavour) and returns either a ``Kernel`` (the body of one
static C function and the formula for its comment) or a ``View`` (the output is the input's memory
at an element offset: ``reshape``, and slices/selects/permutes that move no element).

Conventions of every body: input pointers carry the op's input names (``x``, ``a``, ``b``, ``q`` ...),
the output is ``out``, constant arrays carry their constant names, per-tensor constants are written
as literals.  Integer widths follow the specification (``ivit.ops``): products and sums that the op's
bounds keep inside int32 stay int32; the 32 x 32 -> 64-bit products of requantization (one ``SMULL``
on a Cortex-M3) and the legacy 64-bit ops use ``int64_t``.  Rounding: ``>>`` is floor, ``round_shift``
is half up, ``/`` is applied to non-negative operands only or through ``ivit_floordiv*``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from string import Template
from textwrap import dedent
from typing import TYPE_CHECKING

from ... import ops

if TYPE_CHECKING:
    from .generator import NodeCtx

__all__ = ["Kernel", "View", "LOWERINGS", "lit", "INT32_LIMIT"]

INT32_LIMIT = 2**31 - 1


@dataclass
class Kernel:
    """The body of one static C function (4-space indented statements) and its formula comment."""

    body: str
    formula: str


@dataclass
class View:
    """The output is input ``source`` at element ``offset``: no code, no memory."""

    source: int = 0
    offset: int = 0


Lowering = Callable[["NodeCtx"], "Kernel | View"]
LOWERINGS: dict[str, Lowering] = {}


def _lower(*names: str) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        for n in names:
            LOWERINGS[n] = fn
        return fn
    return deco


def lit(v: int) -> str:
    """A C literal of the exact value ``v`` (int32 when it fits, else ``INT64_C``)."""
    v = int(v)
    if v == -(2**31):
        return "(-2147483647 - 1)"
    if -(2**31) < v < 2**31:
        return str(v)
    if v == -(2**63):
        return "INT64_MIN"
    return f"INT64_C({v})"


def _c(text: str, **kw: object) -> str:
    """Dedent a C template and substitute ``$name`` fields (C braces need no escaping)."""
    return Template(dedent(text).strip("\n")).substitute({k: str(v) for k, v in kw.items()})


def _prod(xs: tuple[int, ...] | list[int]) -> int:
    return math.prod(xs) if xs else 1


def _rs_bound(amax: int, mmax: int, smin: int) -> int:
    return (amax * mmax + (1 << (smin - 1))) >> smin


# ---------------------------------------------------------------------------------------------
# Requantization pieces shared by several ops
# ---------------------------------------------------------------------------------------------

def _dyadic(n: NodeCtx, mult: str, shift: str, idx: str, xexpr: str) -> str:
    """C expression (int64) of ``round_shift(x * mult, shift)``: the product in 64 bits (SMULL)."""
    m, s = n.scalar(mult), n.scalar(shift)
    if m is not None and s is not None:
        return f"((((int64_t)({xexpr}) * {lit(m)}) + {lit(1 << (s - 1))}) >> {s})"
    n.use("ivit_rshift64")
    return f"ivit_rshift64((int64_t)({xexpr}) * {n.chan(mult, idx)}, {n.chan(shift, idx)})"


def _clamp(n: NodeCtx, expr64: str, bound: int, qm: int) -> str:
    """``clamp(expr, -qm, qm)``; in 32 bits when ``|expr| <= bound`` fits int32."""
    if bound <= qm:
        return f"({expr64})"
    if bound <= INT32_LIMIT:
        n.use("ivit_clamp32")
        cast = "" if expr64.startswith("(int32_t)") else "(int32_t)"
        return f"ivit_clamp32({cast}{expr64}, {lit(-qm)}, {lit(qm)})"
    n.use("ivit_clamp64")
    return f"ivit_clamp64({expr64}, {lit(-qm)}, {lit(qm)})"


def _rs_amax(n: NodeCtx, amax: int, mult: str, shift: str) -> int:
    """Bound of ``|round_shift(x * mult, shift)|`` for ``|x| <= amax``."""
    return _rs_bound(amax, n.amax(mult), n.min(shift))


# ---------------------------------------------------------------------------------------------
# Input, linear algebra, requantization
# ---------------------------------------------------------------------------------------------

@_lower("patchify")
def _patchify(n: NodeCtx) -> Kernel:
    b, ch, h, w = n.x[0].shape
    p = n.attr("patch")
    gh, gw = h // p, w // p
    body = _c("""
        $PRAGMA
        for ($I bi = 0; bi < $B; bi++)
            for ($I gy = 0; gy < $GH; gy++)
                for ($I gx = 0; gx < $GW; gx++)
                    for ($I c = 0; c < $CH; c++)
                        for ($I py = 0; py < $P; py++) {
                            const uint8_t *src = pixels + ((bi * $CH + c) * $H + gy * $P + py) * $W + gx * $P;
                            int8_t *dst = out + ((bi * $GH + gy) * $GW + gx) * $K + (c * $P + py) * $P;
                            for ($I px = 0; px < $P; px++) dst[px] = (int8_t)((int32_t)src[px] - 128);
                        }
        """, PRAGMA=n.pragma, I=n.I, B=b, GH=gh, GW=gw, CH=ch, P=p, H=h, W=w, K=ch * p * p)
    return Kernel(body, f"out[b][(gy*{gw} + gx)][(c*{p} + py)*{p} + px] = x[b][c][gy*{p} + py][gx*{p} + px] - 128  "
                        "(row-major patches, (channel, row, col) inside a patch)")


@_lower("linear")
def _linear(n: NodeCtx) -> Kernel:
    x = n.x[0]
    k = x.shape[-1]
    rows = _prod(x.shape[:-1])
    nout = n.out.shape[-1]
    w = n.array("weight")
    has_bias = n.const("bias") is not None
    b = n.array("bias") if has_bias else ""
    n4 = nout - nout % 4
    lines = [n.pragma, f"for ({n.I} r = 0; r < {rows}; r++) {{",
             f"    const int8_t *xr = x + r * {k};",
             f"    int32_t *o = out + r * {nout};"]
    if n4:  # four outputs per pass over x: one load of x[r][c] feeds four multiply-accumulates
        init = [f"{b}[j + {t}]" if has_bias else "0" for t in range(4)]
        lines += [f"    for ({n.I} j = 0; j < {n4}; j += 4) {{",
                  f"        const int8_t *w0 = {w} + j * {k}, *w1 = w0 + {k}, *w2 = w1 + {k}, *w3 = w2 + {k};",
                  f"        int32_t a0 = {init[0]}, a1 = {init[1]}, a2 = {init[2]}, a3 = {init[3]};",
                  f"        for ({n.I} c = 0; c < {k}; c++) {{",
                  "            const int32_t xv = xr[c];",
                  "            a0 += xv * w0[c];",
                  "            a1 += xv * w1[c];",
                  "            a2 += xv * w2[c];",
                  "            a3 += xv * w3[c];",
                  "        }",
                  "        o[j] = a0;", "        o[j + 1] = a1;", "        o[j + 2] = a2;", "        o[j + 3] = a3;",
                  "    }"]
    if n4 < nout:
        lines += [f"    for ({n.I} j = {n4}; j < {nout}; j++) {{",
                  f"        const int8_t *wj = {w} + j * {k};",
                  f"        int32_t acc = {b + '[j]' if has_bias else '0'};",
                  f"        for ({n.I} c = 0; c < {k}; c++) acc += (int32_t)xr[c] * (int32_t)wj[c];",
                  "        o[j] = acc;",
                  "    }"]
    lines.append("}")
    return Kernel("\n".join(ln for ln in lines if ln),
                  f"out[r][j] = sum_c x[r][c] * weight[j][c]{' + bias[j]' if has_bias else ''}  "
                  f"(int32 accumulator, |out| <= {n.out.amax} < 2^31; partial sums are bounded by it too)")


@_lower("matmul")
def _matmul(n: NodeCtx) -> Kernel:
    a, b = n.x
    tb = int(n.attr("transpose_b"))
    g = _prod(a.shape[:-2])
    m, k = a.shape[-2], a.shape[-1]
    nn = n.out.shape[-1]
    at = a.ctype
    if tb:
        body = _c("""
            $PRAGMA
            for ($I g = 0; g < $G; g++)
                for ($I i = 0; i < $M; i++) {
                    const $AT *ai = a + (g * $M + i) * $K;
                    int32_t *o = out + (g * $M + i) * $NN;
                    for ($I j = 0; j < $NN; j++) {
                        const int8_t *bj = b + (g * $NN + j) * $K;
                        int32_t acc = 0;
                        for ($I c = 0; c < $K; c++) acc += (int32_t)ai[c] * (int32_t)bj[c];
                        o[j] = acc;
                    }
                }
            """, PRAGMA=n.pragma, I=n.I, G=g, M=m, K=k, NN=nn, AT=at)
        f = "out[g][i][j] = sum_c a[g][i][c] * b[g][j][c]"
    else:
        body = _c("""
            $PRAGMA
            for ($I g = 0; g < $G; g++)
                for ($I i = 0; i < $M; i++) {
                    const $AT *ai = a + (g * $M + i) * $K;
                    int32_t *o = out + (g * $M + i) * $NN;
                    for ($I j = 0; j < $NN; j++) o[j] = 0;
                    for ($I c = 0; c < $K; c++) {
                        const int32_t av = (int32_t)ai[c];
                        const int8_t *bc = b + (g * $K + c) * $NN;
                        if (av == 0) continue; /* adds 0 */
                        for ($I j = 0; j < $NN; j++) o[j] += av * (int32_t)bc[j];
                    }
                }
            """, PRAGMA=n.pragma, I=n.I, G=g, M=m, K=k, NN=nn, AT=at)
        f = "out[g][i][j] = sum_c a[g][i][c] * b[g][c][j]"
    return Kernel(body, f + f"  (int32 accumulator, |out| <= {n.out.amax} < 2^31)")


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    return _prod(shape[:-1]), shape[-1]


@_lower("requantize")
def _requantize(n: NodeCtx) -> Kernel:
    x = n.x[0]
    rows, cols = _rows_cols(x.shape)
    qm = ops.qmax(int(n.attr("bits")))
    v = _dyadic(n, "mult", "shift", "c", "xr[c]")
    expr = _clamp(n, v, _rs_amax(n, x.amax, "mult", "shift"), qm)
    body = _c("""
        $PRAGMA
        for ($I r = 0; r < $R; r++) {
            const $XT *xr = x + r * $C;
            $OT *o = out + r * $C;
            for ($I c = 0; c < $C; c++) o[c] = ($OT)$E;
        }
        """, PRAGMA=n.pragma, I=n.I, R=rows, C=cols, XT=x.ctype, OT=n.out.ctype, E=expr)
    return Kernel(body, f"out[r][c] = clamp(round_shift(x[r][c] * mult[c], shift[c]), -{qm}, {qm})  "
                        "(32 x 32 -> 64-bit product, rounded half up)")


@_lower("add_requantize")
def _add_requantize(n: NodeCtx) -> Kernel:
    a, b = n.x
    rows, cols = _rows_cols(a.shape)
    qm = ops.qmax(int(n.attr("bits")))
    va = _dyadic(n, "mult_a", "shift_a", "c", "ar[c]")
    vb = _dyadic(n, "mult_b", "shift_b", "c", "br[c]")
    # each branch is within +-2^30 (validated), so the sum and the clamp stay in int32
    n.use("ivit_clamp32")
    body = _c("""
        $PRAGMA
        for ($I r = 0; r < $R; r++) {
            const $AT *ar = a + r * $C;
            const $BT *br = b + r * $C;
            $OT *o = out + r * $C;
            for ($I c = 0; c < $C; c++) {
                const int32_t ya = (int32_t)$VA;
                const int32_t yb = (int32_t)$VB;
                o[c] = ($OT)ivit_clamp32(ya + yb, $LO, $HI);
            }
        }
        """, PRAGMA=n.pragma, I=n.I, R=rows, C=cols, AT=a.ctype, BT=b.ctype, OT=n.out.ctype, VA=va, VB=vb,
              LO=lit(-qm), HI=lit(qm))
    return Kernel(body, f"out = clamp(round_shift(a * mult_a, shift_a) + round_shift(b * mult_b, shift_b), -{qm}, "
                        f"{qm})  (64-bit products; each branch within +-2^30, so the sum is int32)")


@_lower("add_const")
def _add_const(n: NodeCtx) -> Kernel:
    x = n.x[0]
    kn = int(n.const("const").numel())
    rows = _prod(x.shape) // kn
    body = _c("""
        $PRAGMA
        for ($I r = 0; r < $R; r++)
            for ($I j = 0; j < $KN; j++) out[r * $KN + j] = (int32_t)x[r * $KN + j] + $K[j];
        """, PRAGMA=n.pragma, I=n.I, R=rows, KN=kn, K=n.array("const"))
    return Kernel(body, f"out = x + const (const spans the trailing dims; int32, |out| <= {n.out.amax})")


@_lower("embed")
def _embed(n: NodeCtx) -> Kernel:
    x = n.x[0]
    b, length, ch = x.shape
    qm = ops.qmax(int(n.attr("bits")))
    pos = n.array("pos")
    tokens = n.out.shape[1]
    pre = n.const("prefix")
    npre = 0 if pre is None else int(pre.shape[0])
    bound = _rs_amax(n, x.amax, "mult", "shift") + n.amax("pos")
    if bound <= INT32_LIMIT:
        tok = f"(int32_t){_dyadic(n, 'mult', 'shift', 'c', 'xr[c]')} + {pos}[l * {ch} + c]"
        bound = min(bound, INT32_LIMIT)
    else:
        tok = f"{_dyadic(n, 'mult', 'shift', 'c', 'xr[c]')} + (int64_t){pos}[l * {ch} + c]"
    expr = _clamp(n, tok, bound, qm)
    lines = [n.pragma, f"for ({n.I} bi = 0; bi < {b}; bi++) {{",
             f"    {n.out.ctype} *ob = out + bi * {tokens * ch};"]
    if npre:
        pbound = n.amax("prefix")
        pexpr = _clamp(n, f"{n.array('prefix')}[c]", pbound, qm)
        lines.append(f"    for ({n.I} c = 0; c < {npre * ch}; c++) ob[c] = ({n.out.ctype}){pexpr};")
    lines += [f"    for ({n.I} l = 0; l < {length}; l++) {{",
              f"        const int32_t *xr = x + (bi * {length} + l) * {ch};",
              f"        {n.out.ctype} *o = ob + ({npre} + l) * {ch};",
              f"        for ({n.I} c = 0; c < {ch}; c++) o[c] = ({n.out.ctype}){expr};",
              "    }", "}"]
    body = "\n".join(ln for ln in lines if ln)
    f = (f"out[b][:{npre}] = clamp(prefix); out[b][{npre} + l][c] = clamp(round_shift(x[b][l][c] * mult[c], "
         f"shift[c]) + pos[l][c], -{qm}, {qm})")
    return Kernel(body, f + ("" if bound <= INT32_LIMIT else "  (64-bit sum)"))


# ---------------------------------------------------------------------------------------------
# I-LayerNorm
# ---------------------------------------------------------------------------------------------

@_lower("layernorm")
def _layernorm(n: NodeCtx) -> Kernel:
    x = n.x[0]
    rows, ch = _rows_cols(x.shape)
    qm = ops.qmax(int(n.attr("bits")))
    for h in ("ivit_floordiv32", "ivit_isqrt64", "ivit_clamp64"):
        n.use(h)
    z = "(((int64_t)(xr[c] - mean) * factor) >> 11)"
    out_expr = f"ivit_clamp64({_dyadic(n, 'mult', 'shift', 'c', 'z')} + {n.chan('offset', 'c')}, {lit(-qm)}, {lit(qm)})"
    body = _c("""
        $PRAGMA
        for ($I r = 0; r < $R; r++) {
            const $XT *xr = x + r * $C;
            $OT *o = out + r * $C;
            int32_t s = 0, mean, factor;
            int64_t var = 0;
            uint64_t sd;
            for ($I c = 0; c < $C; c++) s += xr[c];
            mean = ivit_floordiv32(2 * s + $C, 2 * $C);
            for ($I c = 0; c < $C; c++) {
                const int64_t y = (int64_t)(xr[c] - mean);
                var += y * y;
            }
            sd = ivit_isqrt64((uint64_t)var);
            factor = (int32_t)(INT32_MAX / (sd < 1 ? 1 : (int32_t)sd));
            for ($I c = 0; c < $C; c++) {
                const int64_t z = $Z;
                o[c] = ($OT)$OUT;
            }
        }
        """, PRAGMA=n.pragma, I=n.I, R=rows, C=ch, XT=x.ctype, OT=n.out.ctype, Z=z, OUT=out_expr)
    return Kernel(body, "I-LayerNorm, 64-bit variance (ops.ilayernorm): mean = floor((2*sum + C) / (2C));\n"
                        " * y = x - mean; std = isqrt(sum y^2) (int64);\n"
                        " * z = (y * floor((2^31-1) / max(std, 1))) >> 11 (64-bit product);\n"
                        f" * out = clamp(round_shift(z * mult[c], shift[c]) + offset[c], -{qm}, {qm})")


@_lower("layernorm32")
def _layernorm32(n: NodeCtx) -> Kernel:
    x = n.x[0]
    rows, ch = _rows_cols(x.shape)
    qm = ops.qmax(int(n.attr("bits")))
    bc = (31 - max(0, (ch - 1).bit_length())) // 2
    for h in ("ivit_floordiv32", "ivit_isqrt32", "ivit_bitlen32", "ivit_rshift64", "ivit_clamp32"):
        n.use(h)
    zb = f"(int32_t){_dyadic(n, 'mult', 'shift', 'c', 'z')}"
    body = _c("""
        $PRAGMA
        for ($I r = 0; r < $R; r++) {
            const $XT *xr = x + r * $C;
            $OT *o = out + r * $C;
            int32_t s = 0, mean, amax = 0, k, f, ar = 0, q = 0;
            uint32_t v2 = 0, var, sd;
            for ($I c = 0; c < $C; c++) s += xr[c];
            mean = ivit_floordiv32(s + $HALF, $C);
            for ($I c = 0; c < $C; c++) {
                int32_t y = xr[c] - mean;
                y = y < 0 ? -y : y;
                amax = y > amax ? y : amax;
            }
            k = ivit_bitlen32((uint32_t)amax) - $BC;
            k = k < 0 ? 0 : k;
            for ($I c = 0; c < $C; c++) {
                const int32_t y = xr[c] - mean;
                const int32_t yp = y >> k;                                       /* y = yp * 2^k + r */
                const int32_t r = (int32_t)((uint32_t)y & (((uint32_t)1 << k) - 1u)); /* 0 <= r < 2^k */
                v2 += (uint32_t)(yp * yp);
                ar += yp * r;
                q += r * r;
            }
            /* V = floor(sum(y^2) / 4^k) < 2^31, exactly; modulo 2^32 the uint32 sum is exact */
            var = v2 + (uint32_t)((2 * ar + (q >> k)) >> k);
            sd = ivit_isqrt32(var);
            f = (int32_t)(INT32_MAX / (sd < 1 ? 1 : sd)) >> k;
            for ($I c = 0; c < $C; c++) {
                const int32_t z = (int32_t)ivit_rshift64((int64_t)(xr[c] - mean) * f, 11);
                o[c] = ($OT)ivit_clamp32($ZB + $OFF, $LO, $HI);
            }
        }
        """, PRAGMA=n.pragma, I=n.I, R=rows, C=ch, HALF=ch >> 1, BC=bc, XT=x.ctype, OT=n.out.ctype, ZB=zb,
              OFF=n.chan("offset", "c"), LO=lit(-qm), HI=lit(qm))
    return Kernel(body, "I-LayerNorm, 32-bit (ops.ilayernorm32): mean = floor((sum + floor(C/2)) / C); y = x - mean;\n"
                        f" * k = max(0, bitlen(max|y|) - {bc}); y = y' 2^k + r; V = sum y'^2 + ((2 sum y' r + "
                        "(sum r^2 >> k)) >> k)\n * (= floor(sum y^2 / 4^k) < 2^31); std' = isqrt(V);\n"
                        " * F = floor((2^31-1) / max(std', 1)) >> k; z = round_shift(y * F, 11) (64-bit product);\n"
                        f" * out = clamp(round_shift(z * mult[c], shift[c]) + offset[c], -{qm}, {qm}) "
                        "(64-bit product, int32 sum)")


# ---------------------------------------------------------------------------------------------
# Shiftmax, ShiftGELU
# ---------------------------------------------------------------------------------------------

def _mask_row(n: NodeCtx, shape: tuple[int, ...]) -> str:
    """C declaration of ``mr``, the mask row of score row ``r`` (``NULL`` without a (nW, N, N) mask).

    Row ``r`` of scores ``(B*nW, H, N, N)`` is window-batch ``r / (H*N)``, query ``r % N``; window
    ``w`` of every image uses ``mask[w]`` (``opset.expand_window_mask``)."""
    if n.const("mask") is None:
        return "const uint8_t *mr = NULL;"
    nw = int(n.const("mask").shape[0])
    heads, nt = shape[1], shape[-1]
    m = n.array("mask")
    return f"const uint8_t *mr = {m} + (((r / {heads * nt}) % {nw}) * {nt} + r % {nt}) * {nt};"


@_lower("shiftmax")
def _shiftmax(n: NodeCtx) -> Kernel:
    x = n.x[0]
    rows, nt = _rows_cols(x.shape)
    x0, nn, k = int(n.attr("x0")), int(n.attr("n")), int(n.attr("k_out"))
    e = n.scratch("int64_t", nt, "e")
    n.use("ivit_shiftmax_row")
    decl = _mask_row(n, x.shape)
    body = _c("""
        for ($I r = 0; r < $R; r++) {
            $DECL
            for ($I j = 0; j < $N; j++) $E[j] = x[r * $N + j];
            ivit_shiftmax_row($E, $N, mr, $X0, $NN, $K);
            for ($I j = 0; j < $N; j++) out[r * $N + j] = ($OT)$E[j];
        }
        """, I=n.I, R=rows, N=nt, E=e, DECL=decl, X0=lit(x0), NN=nn, K=k, OT=n.out.ctype)
    return Kernel(body, f"Shiftmax (ops.shiftmax, 64-bit) of each row of {nt}: see ivit_shiftmax_row "
                        f"(x0 = {x0}, n = {nn}, k_out = {k})")


@_lower("shiftmax_rel")
def _shiftmax_rel(n: NodeCtx) -> Kernel:
    x = n.x[0]
    rows, nt = _rows_cols(x.shape)
    x0 = int(n.attr("x0"))
    m = (255 << 22) // (-x0)
    n.use("ivit_shiftmax_rel_row")
    decl = _mask_row(n, x.shape)
    lines = [f"for ({n.I} r = 0; r < {rows}; r++) {{", f"    {decl}"]
    if x.ctype == "int32_t":
        row = f"x + r * {nt}"
    else:  # widen the row to int32 first
        row = n.scratch("int32_t", nt, "s")
        lines.append(f"    for ({n.I} j = 0; j < {nt}; j++) {row}[j] = x[r * {nt} + j];")
    lines += [f"    (void)ivit_shiftmax_rel_row({row}, out + r * {nt}, {nt}, mr, {lit(x0)}, {m});", "}"]
    return Kernel("\n".join(lines), f"Shiftmax-rel (ops.shiftmax_rel, int32) of each row of {nt}: see "
                                    f"ivit_shiftmax_rel_row (x0 = {x0}, M = floor(255 * 2^22 / {-x0}) = {m})")


@_lower("attn_normalize")
def _attn_normalize(n: NodeCtx) -> Kernel:
    acc, p = n.x
    rows, d = _rows_cols(acc.shape)
    nt = p.shape[-1]
    body = _c("""
        $PRAGMA
        for ($I r = 0; r < $R; r++) {
            int32_t total = 0, rr;
            for ($I j = 0; j < $N; j++) total += p[r * $N + j];
            rr = ((int32_t)1 << 30) / (total < 1 ? 1 : total);
            for ($I c = 0; c < $D; c++) out[r * $D + c] = (int32_t)(((int64_t)acc[r * $D + c] * rr + 8192) >> 14);
        }
        """, PRAGMA=n.pragma, I=n.I, R=rows, N=nt, D=d)
    return Kernel(body, "out[r][c] = round_shift(acc[r][c] * floor(2^30 / max(sum_j p[r][j], 1)), 14)  "
                        "(int32 sum and quotient, 64-bit product |acc * R| <= 2^37)")


@_lower("shiftgelu")
def _shiftgelu(n: NodeCtx) -> Kernel:
    x = n.x[0]
    total = _prod(x.shape)
    x0, nn, k = int(n.attr("x0")), int(n.attr("n")), int(n.attr("k_out"))
    n.use("ivit_shift_exp")
    body = _c("""
        $PRAGMA
        for ($I i = 0; i < $T; i++) {
            const int32_t xi = x[i];
            const int32_t m = xi > 0 ? xi : 0;
            const int64_t e1 = ivit_shift_exp(xi - m, $X0, $NN);
            const int64_t e2 = ivit_shift_exp(-m, $X0, $NN);
            const int64_t sig = (e1 * (INT64_C(4611686018427387903) / (e1 + e2))) >> $SH;
            out[i] = xi * (int32_t)sig;
        }
        """, PRAGMA=n.pragma, I=n.I, T=total, X0=lit(x0), NN=nn, SH=63 - k)
    return Kernel(body, f"ShiftGELU (ops.shiftgelu): m = max(x, 0); E1 = shift_exp(x - m), E2 = shift_exp(-m);\n"
                        f" * sig = (E1 * floor((2^62-1) / (E1 + E2))) >> {63 - k}  (64-bit, sig <= 2^{k - 1});"
                        " out = x * sig (int32)")


# ---------------------------------------------------------------------------------------------
# Data movement: one index-mapping copy (slice, select, permute, roll, pad), views when nothing moves
# ---------------------------------------------------------------------------------------------

@dataclass
class _Dim:
    size: int  # output size
    istride: int  # input stride (elements)
    kind: str = "id"  # "id": src = i + start; "roll": src = (i - start) mod isize; "pad": src = i - start
    start: int = 0
    isize: int = 0


def _strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        out[i] = acc
        acc *= shape[i]
    return out


def _gather(n: NodeCtx, dims: list[_Dim], base: int, what: str) -> Kernel | View:
    """``out[i...] = x[base + sum_d src_d(i_d) * istride_d]`` (zero where a padded source is outside)."""
    et = n.out.ctype
    keep: list[_Dim] = []
    ostr = _strides(tuple(d.size for d in dims))
    ostrides: list[int] = []
    for d, os_ in zip(dims, ostr, strict=True):
        if d.size == 1 and d.kind != "pad":  # src(0) is a constant offset
            base += (d.start if d.kind == "id" else 0) * d.istride
            continue
        keep.append(d)
        ostrides.append(os_)
    # the innermost dims that copy contiguous input form one block
    block = 1
    nb = 0
    for d in reversed(keep):
        if d.kind != "id" or d.istride != block:
            break
        base += d.start * d.istride
        block *= d.size
        nb += 1
    loops = keep[:len(keep) - nb]
    lstr = ostrides[:len(keep) - nb]
    if not loops:
        return View(0, base)
    lines = [n.pragma]
    ind = ""
    oexpr, iexpr = [], [str(base)] if base else []
    for li, (d, os_) in enumerate(zip(loops, lstr, strict=True)):
        i = f"i{li}"
        lines.append(f"{ind}for ({n.I} {i} = 0; {i} < {d.size}; {i}++) {{")
        ind += "    "
        if d.kind == "id":
            src = f"({i} + {d.start})" if d.start else i
        elif d.kind == "roll":
            s = d.start
            lines.append(f"{ind}const {n.I} s{li} = {i} >= {s} ? {i} - {s} : {i} + {d.isize - s};")
            src = f"s{li}"
        else:
            lines.append(f"{ind}const {n.I} s{li} = {i} - {d.start};")
            oz = " + ".join([*oexpr, f"{i} * {os_}"])
            lines.append(f"{ind}if (s{li} < 0 || s{li} >= {d.isize}) {{")
            lines.append(f"{ind}    memset(out + {oz}, 0, {os_} * sizeof({et}));")
            lines.append(f"{ind}    continue;")
            lines.append(f"{ind}}}")
            src = f"s{li}"
        oexpr.append(f"{i} * {os_}")
        iexpr.append(f"{src} * {d.istride}")
    o = " + ".join(oexpr)
    x = " + ".join(iexpr)
    if block == 1:
        lines.append(f"{ind}out[{o}] = x[{x}];")
    else:
        lines.append(f"{ind}memcpy(out + {o}, x + {x}, {block} * sizeof({et}));")
    for _ in loops:
        ind = ind[:-4]
        lines.append(f"{ind}}}")
    n.use_libc("memcpy")
    return Kernel("\n".join(ln for ln in lines if ln), what)


@_lower("reshape")
def _reshape(n: NodeCtx) -> View:
    return View(0, 0)


@_lower("slice")
def _slice(n: NodeCtx) -> Kernel | View:
    x = n.x[0]
    d = int(n.attr("dim")) % len(x.shape)
    st = _strides(x.shape)
    dims = [_Dim(n.out.shape[i], st[i], "id", int(n.attr("start")) if i == d else 0) for i in range(len(x.shape))]
    return _gather(n, dims, 0, f"out = x[..., {n.attr('start')}:{n.attr('end')}, ...] along dim {d}")


@_lower("select")
def _select(n: NodeCtx) -> Kernel | View:
    x = n.x[0]
    d = int(n.attr("dim")) % len(x.shape)
    idx = int(n.attr("index")) % x.shape[d]
    st = _strides(x.shape)
    dims = [_Dim(x.shape[i], st[i]) for i in range(len(x.shape)) if i != d]
    return _gather(n, dims, idx * st[d], f"out = x.select({d}, {idx})")


@_lower("permute")
def _permute(n: NodeCtx) -> Kernel | View:
    x = n.x[0]
    perm = [int(p) for p in n.attr("perm")]
    st = _strides(x.shape)
    dims = [_Dim(x.shape[p], st[p]) for p in perm]
    return _gather(n, dims, 0, f"out = x.permute({perm})")


@_lower("roll")
def _roll(n: NodeCtx) -> Kernel | View:
    x = n.x[0]
    st = _strides(x.shape)
    shifts = {int(d) % len(x.shape): int(s) for s, d in zip(n.attr("shifts"), n.attr("dims"), strict=True)}
    dims = []
    for i, size in enumerate(x.shape):
        s = shifts.get(i, 0) % size
        dims.append(_Dim(size, st[i], "roll", s, size) if s else _Dim(size, st[i]))
    return _gather(n, dims, 0, f"out = torch.roll(x, {list(n.attr('shifts'))}, {list(n.attr('dims'))}): "
                               "out[i] = x[(i - shift) mod size]")


@_lower("pad")
def _pad(n: NodeCtx) -> Kernel | View:
    x = n.x[0]
    pads = [int(p) for p in n.attr("pads")]
    st = _strides(x.shape)
    dims = [_Dim(s, st[i]) for i, s in enumerate(x.shape)]
    for i in range(len(pads) // 2):
        d = len(x.shape) - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        if lo or hi:
            dims[d] = _Dim(x.shape[d] + lo + hi, st[d], "pad", lo, x.shape[d])
    return _gather(n, dims, 0, f"out = zero padding of x by {pads} (last dim first, (lo, hi) pairs)")


@_lower("mean")
def _mean(n: NodeCtx) -> Kernel:
    x = n.x[0]
    d = int(n.attr("dim")) % len(x.shape)
    outer, cnt, inner = _prod(x.shape[:d]), x.shape[d], _prod(x.shape[d + 1:])
    wide = 2 * cnt * x.amax + cnt > INT32_LIMIT
    acc = "int64_t" if wide else "int32_t"
    n.use("ivit_floordiv64" if wide else "ivit_floordiv32")
    div = "ivit_floordiv64" if wide else "ivit_floordiv32"
    body = _c("""
        $PRAGMA
        for ($I o = 0; o < $O; o++)
            for ($I i = 0; i < $IN; i++) {
                $ACC s = 0;
                for ($I j = 0; j < $N; j++) s += x[(o * $N + j) * $IN + i];
                out[o * $IN + i] = ($OT)$DIV(2 * s + $N, 2 * $N);
            }
        """, PRAGMA=n.pragma, I=n.I, O=outer, IN=inner, N=cnt, ACC=acc, OT=n.out.ctype, DIV=div)
    return Kernel(body, f"out = floor((2 * sum_j x[..., j, ...] + {cnt}) / {2 * cnt}) over dim {d}  "
                        f"(mean rounded half up; {acc} sum)")


# ---------------------------------------------------------------------------------------------
# Fused ops
# ---------------------------------------------------------------------------------------------

@_lower("attention")
def _attention(n: NodeCtx) -> Kernel:
    q = n.x[0]
    bw, heads, nt, d = q.shape
    probs = int(n.attr("probs"))
    sm, ss = n.scalar("score_mult"), n.scalar("score_shift")
    assert sm is not None and ss is not None
    sq = ops.qmax(int(n.attr("score_bits")))
    x0 = int(n.attr("x0"))
    I = n.I  # noqa: E741
    s = n.scratch("int32_t", nt, "s")
    has_bias = n.const("bias") is not None
    n.use("ivit_clamp64")
    rq = f"ivit_clamp64(((int64_t){s}[j] * {lit(sm)} + {lit(1 << (ss - 1))}) >> {ss}, {lit(-sq)}, {lit(sq)})"
    L = [f"for ({I} bh = 0; bh < {bw * heads}; bh++) {{",  # noqa: N806
         f"    const int8_t *qb = q + bh * {nt * d}, *kb = k + bh * {nt * d}, *vb = v + bh * {nt * d};"]
    if has_bias:
        L.append(f"    const int32_t *bias_h = {n.array('bias')} + (bh % {heads}) * {nt * nt};")
    mrow = "NULL"
    if n.const("mask") is not None:
        nw = int(n.const("mask").shape[0])
        L.append(f"    const uint8_t *mask_w = {n.array('mask')} + ((bh / {heads}) % {nw}) * {nt * nt};")
        mrow = f"mask_w + i * {nt}"
    bias_at = (lambda j: f" + bias_h[i * {nt} + {j}]") if has_bias else (lambda j: "")
    n4, d4 = nt - nt % 4, d - d % 4
    L += [f"    for ({I} i = 0; i < {nt}; i++) {{",
          f"        const int8_t *qi = qb + i * {d};",
          f"        int32_t *oi = out + bh * {nt * d} + i * {d};"]
    if n4:  # scores of four keys per pass over q[i]
        L += [f"        for ({I} j = 0; j < {n4}; j += 4) {{",
              f"            const int8_t *k0 = kb + j * {d}, *k1 = k0 + {d}, *k2 = k1 + {d}, *k3 = k2 + {d};",
              "            int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;",
              f"            for ({I} c = 0; c < {d}; c++) {{",
              "                const int32_t qv = qi[c];",
              "                a0 += qv * k0[c];", "                a1 += qv * k1[c];",
              "                a2 += qv * k2[c];", "                a3 += qv * k3[c];",
              "            }",
              *[f"            {s}[j + {t}] = a{t}{bias_at(f'j + {t}')};" for t in range(4)],
              "        }"]
    if n4 < nt:
        L += [f"        for ({I} j = {n4}; j < {nt}; j++) {{",
              f"            const int8_t *kj = kb + j * {d};",
              "            int32_t acc = 0;",
              f"            for ({I} c = 0; c < {d}; c++) acc += (int32_t)qi[c] * (int32_t)kj[c];",
              f"            {s}[j] = acc{bias_at('j')};",
              "        }"]
    if probs == 1:
        p = n.scratch("uint8_t", nt, "p")
        n.use("ivit_shiftmax_rel_row")
        m = (255 << 22) // (-x0)
        L += [f"        for ({I} j = 0; j < {nt}; j++) {s}[j] = (int32_t){rq};",
              f"        const int32_t total = ivit_shiftmax_rel_row({s}, {p}, {nt}, {mrow}, {lit(x0)}, {m});",
              "        const int32_t rr = ((int32_t)1 << 30) / (total < 1 ? 1 : total);"]
        pj = f"(int32_t){p}[j]"

        def fin(a: str) -> str:
            return f"(int32_t)(((int64_t){a} * rr + 8192) >> 14)"
        formula = (f"p = shiftmax_rel(s, x0 = {x0}) (uint8, P = sum p); "
                   "out = round_shift((p @ v) * floor(2^30 / max(P, 1)), 14)")
    else:
        e = n.scratch("int64_t", nt, "e")
        n.use("ivit_shiftmax_row")
        L += [f"        for ({I} j = 0; j < {nt}; j++) {e}[j] = {rq};",
              f"        ivit_shiftmax_row({e}, {nt}, {mrow}, {lit(x0)}, {int(n.attr('n'))}, 8);",
              f"        for ({I} j = 0; j < {nt}; j++) {s}[j] = (int32_t){e}[j]; /* p in [0, 127] */"]
        pj = f"{s}[j]"

        def fin(a: str) -> str:
            return a
        formula = f"p = shiftmax(s, x0 = {x0}, n = {n.attr('n')}, k_out = 8) (int8 [0, 127]); out = p @ v"
    if d4:  # four output channels per pass over p
        L += [f"        for ({I} c = 0; c < {d4}; c += 4) {{",
              "            int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;",
              f"            for ({I} j = 0; j < {nt}; j++) {{",
              f"                const int32_t pj = {pj};",
              f"                const int8_t *vj = vb + j * {d} + c;",
              "                a0 += pj * vj[0];", "                a1 += pj * vj[1];",
              "                a2 += pj * vj[2];", "                a3 += pj * vj[3];",
              "            }",
              *[f"            oi[c + {t}] = {fin(f'a{t}')};" for t in range(4)],
              "        }"]
    if d4 < d:
        L += [f"        for ({I} c = {d4}; c < {d}; c++) {{",
              "            int32_t acc = 0;",
              f"            for ({I} j = 0; j < {nt}; j++) acc += {pj} * (int32_t)vb[j * {d} + c];",
              f"            oi[c] = {fin('acc')};",
              "        }"]
    L += ["    }", "}"]
    rq_f = f"clamp(round_shift(s * {sm}, {ss}), -{sq}, {sq})"
    return Kernel("\n".join(L),
                  f"fused attention, per (window-batch, head, query i), N = {nt}, d = {d}:\n"
                  f" * s[j] = sum_c q[i][c] * k[j][c]{' + bias[h][i][j]' if has_bias else ''} (int32); "
                  f"s = {rq_f} (64-bit product)\n"
                  f" * {formula}{'; mask[window][i] masks positions' if mrow != 'NULL' else ''}")


def _indent(text: str, k: int) -> str:
    return "\n".join((" " * k + ln) if ln else ln for ln in text.split("\n"))


@_lower("requantize_table")
def _requantize_table(n: NodeCtx) -> Kernel:
    x = n.x[0]
    rows, cols = _rows_cols(x.shape)
    v = _dyadic(n, "mult", "shift", "c", "xr[c]")
    expr = _clamp(n, v, _rs_amax(n, x.amax, "mult", "shift"), 127)
    body = _c("""
        $PRAGMA
        for ($I r = 0; r < $R; r++) {
            const $XT *xr = x + r * $C;
            int8_t *o = out + r * $C;
            for ($I c = 0; c < $C; c++) o[c] = $T[(int32_t)$E + 128];
        }
        """, PRAGMA=n.pragma, I=n.I, R=rows, C=cols, XT=x.ctype, T=n.array("table"), E=expr)
    return Kernel(body, "out[r][c] = table[clamp(round_shift(x[r][c] * mult[c], shift[c]), -127, 127) + 128]  "
                        "(64-bit product; the 256-entry int8 table is the folded requantize/ShiftGELU/requantize)")
