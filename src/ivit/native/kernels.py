"""Exact native kernels with the op set's calling convention: ``kernel(*inputs, **consts, **attrs)``.

Each function computes exactly the integers of ``ivit.ir.opset.OPSET[op].reference`` (tests compare
them with ``torch.equal``), in C (``csrc/ivit_kernels.c``) when the library is built and the operands
are CPU tensors of a supported dtype, else through the reference.  Every function checks the exact
shapes, dtypes and layouts of its operands *before* a pointer reaches C, so no caller (the engine's
cpu backend, or the quantized modules' eager forward during calibration and QAT) can make C read
out of bounds: anything unexpected goes to the reference op, which raises or computes exactly.

``EAGER`` maps op names to these kernels (the GEMMs come from ``ivit.native.gemm``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..ir.opset import OPSET, PROBS_REL8
from . import gemm, library, register_signatures

__all__ = ["EAGER", "requantize", "add_requantize", "layernorm", "layernorm32", "shiftmax", "shiftmax_rel",
           "attn_normalize", "shiftgelu", "requantize_table", "attention", "per_channel", "gelu_table"]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
register_signatures({
    "requant_i32_i8": ([_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT], None),
    "requant_i32_i16": ([_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT], None),
    "requant_i16_i8": ([_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT], None),
    "requant_i16_i16": ([_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT], None),
    "add_requant_i16_i32_i16": ([_P, _P, _P, _I64, _I64, _P, _P, _I64, _P, _P, _I64, _I64, _INT], None),
    "layernorm_i16_i8": ([_P, _P, _I64, _I64, _P, _P, _P, _I64, _INT], None),
    "layernorm32_i16_i8": ([_P, _P, _I64, _I64, _P, _P, _P, _I64, _INT], None),
    "shiftmax_i16": ([_P, _P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _INT], ctypes.c_int),
    "shiftmax_i32": ([_P, _P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _INT], ctypes.c_int),
    "shiftmax_rel_i16": ([_P, _P, _I64, _I64, _I64, _P, _I64, _I64, _INT], ctypes.c_int),
    "shiftmax_rel_i32": ([_P, _P, _I64, _I64, _I64, _P, _I64, _I64, _INT], ctypes.c_int),
    "attn_normalize_i32": ([_P, _P, _P, _I64, _I64, _I64, _INT], None),
    "lut_i8_i32": ([_P, _P, _I64, _P, _INT], None),
    "requant_lut_i32_i8": ([_P, _P, _I64, _I64, _P, _P, _I64, _I64, _P, _INT], None),
    "attention_i8": ([_P, _P, _P, _P] + [_I64] * 16 + [_P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _INT],
                     ctypes.c_int),
})


def _lib() -> Any:
    lib = library()
    if lib is not None:
        lib.ivit_set_num_threads(torch.get_num_threads())
    return lib


def _cpu(*xs: Tensor | None) -> bool:
    return all(x is None or x.device.type == "cpu" for x in xs)


def _ref(op: str) -> Callable[..., Tensor]:
    return OPSET[op].reference


def per_channel(t: Tensor, c: int) -> Tensor | None:
    """An int32 per-tensor (``()``/``(1,)``) or per-channel (``(C,)``) constant as a contiguous ``(C,)``
    vector, or None if it has any other shape or dtype (the caller then uses the reference)."""
    if t.dtype not in (torch.int32, torch.int64) or t.device.type != "cpu":
        return None
    if t.numel() == 1 and t.dim() <= 1:
        return t.reshape(1).to(torch.int32).expand(c).contiguous()
    if t.dim() == 1 and t.shape[0] == c:
        if t.dtype == torch.int64 and (int(t.min()) < -(2**31) or int(t.max()) >= 2**31):
            return None
        return t.to(torch.int32).contiguous()
    return None


def _rows(x: Tensor) -> tuple[int, int] | None:
    """``(rows, row_stride)`` if ``x`` is a stack of rows with unit column stride (outer dimensions collapse
    onto the row dimension: the q/k/v column slices of the qkv accumulator qualify without a copy)."""
    if x.dim() == 0 or x.stride(-1) != 1 or x.numel() == 0:
        return None
    if x.dim() == 1:
        return 1, x.shape[-1]
    rows = x.shape[-2]
    for i in range(x.dim() - 3, -1, -1):
        if x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return None
        rows *= x.shape[i]
    return rows, x.stride(-2)


_REQUANT = {(torch.int32, 8): "requant_i32_i8", (torch.int32, 16): "requant_i32_i16",
            (torch.int16, 8): "requant_i16_i8", (torch.int16, 16): "requant_i16_i16"}


def _shift_ok(s: Tensor) -> bool:
    return s.numel() > 0 and int(s.min()) >= 1 and int(s.max()) <= 62


def requantize(x: Tensor, mult: Tensor, shift: Tensor, bits: int) -> Tensor:
    """``ops.requantize`` (``clamp(round_shift(x * mult, shift))``, per tensor or per channel)."""
    name = _REQUANT.get((x.dtype, bits))
    lib = _lib() if name is not None and _cpu(x) and x.dim() >= 1 else None
    if lib is not None and x.numel() and mult.shape == shift.shape:
        cols = x.shape[-1]
        m, s = per_channel(mult, cols), per_channel(shift, cols)
        geo = _rows(x) or _rows(x := x.contiguous())
        if m is not None and s is not None and geo is not None and _shift_ok(s):
            rows, stride = geo
            out = torch.empty(x.shape, dtype=ops.storage_dtype(bits))
            getattr(lib, name)(x.data_ptr(), out.data_ptr(), rows, cols, stride, m.data_ptr(), s.data_ptr(), cols,
                               ops.qmax(bits), 0)
            return out
    return _ref("requantize")(x, mult, shift, bits)


def add_requantize(a: Tensor, b: Tensor, mult_a: Tensor, shift_a: Tensor, mult_b: Tensor, shift_b: Tensor,
                   bits: int) -> Tensor:
    """``ops.add_requantize`` (each branch requantized to the output scale, then summed and clamped)."""
    if (a.dtype, b.dtype, bits) == (torch.int16, torch.int32, 16) and a.shape == b.shape and a.numel() \
            and _cpu(a, b) and mult_a.shape == shift_a.shape and mult_b.shape == shift_b.shape:
        lib = _lib()
        cols = a.shape[-1]
        cs = [per_channel(t, cols) for t in (mult_a, shift_a, mult_b, shift_b)]
        if lib is not None and all(c is not None for c in cs) and _shift_ok(cs[1]) and _shift_ok(cs[3]):
            a, b = a.contiguous(), b.contiguous()
            out = torch.empty(a.shape, dtype=torch.int16)
            lib.add_requant_i16_i32_i16(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel() // cols, cols,
                                        cs[0].data_ptr(), cs[1].data_ptr(), cols, cs[2].data_ptr(), cs[3].data_ptr(),
                                        cols, ops.qmax(16), 0)
            return out
    return _ref("add_requantize")(a, b, mult_a, shift_a, mult_b, shift_b, bits)


def _layernorm(op: str, cname: str, max_c: int, x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor,
               bits: int) -> Tensor:
    if x.dtype == torch.int16 and bits == 8 and _cpu(x) and x.dim() >= 1 and x.numel() and mult.shape == shift.shape:
        lib = _lib()
        cols = x.shape[-1]
        cs = [per_channel(t, cols) for t in (mult, shift, offset)]
        if lib is not None and 1 <= cols <= max_c and all(c is not None for c in cs) and _shift_ok(cs[1]):
            x = x.contiguous()
            out = torch.empty(x.shape, dtype=torch.int8)
            getattr(lib, cname)(x.data_ptr(), out.data_ptr(), x.numel() // cols, cols, cs[0].data_ptr(),
                                cs[1].data_ptr(), cs[2].data_ptr(), ops.qmax(8), 0)
            return out
    return _ref(op)(x, mult, shift, offset, bits)


def layernorm(x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor, bits: int) -> Tensor:
    """``ops.ilayernorm`` (64-bit variance; programs of format 1)."""
    return _layernorm("layernorm", "layernorm_i16_i8", 4095, x, mult, shift, offset, bits)


def layernorm32(x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor, bits: int) -> Tensor:
    """``ops.ilayernorm32`` (32-bit intermediates)."""
    return _layernorm("layernorm32", "layernorm32_i16_i8", 8192, x, mult, shift, offset, bits)


def _mask_geometry(shape: tuple[int, ...], mask: Tensor | None) -> tuple[Tensor | None, int, int] | None:
    """``(uint8 mask, n_win, heads)`` for scores of ``shape`` ``(B*nW, H, N, N)`` and a window mask
    ``(nW, N, N)`` (None if they do not fit together)."""
    if mask is None:
        return None, 1, 1
    n = shape[-1]
    if (mask.dtype != torch.bool or mask.dim() != 3 or tuple(mask.shape[1:]) != (n, n) or len(shape) != 4
            or shape[-2] != n or mask.shape[0] < 1 or shape[0] % mask.shape[0] or not _cpu(mask)):
        return None
    return mask.to(torch.uint8).contiguous(), mask.shape[0], shape[1]


def shiftmax(x: Tensor, x0: int, n: int, k_out: int, mask: Tensor | None = None) -> Tensor:
    """``ops.shiftmax`` (the I-ViT Shiftmax; legacy probabilities ``[0, 127]``)."""
    name = {torch.int16: "shiftmax_i16", torch.int32: "shiftmax_i32"}.get(x.dtype)
    geo = _mask_geometry(tuple(x.shape), mask) if x.dim() >= 1 else None
    if name is not None and k_out == 8 and _cpu(x) and geo is not None and x.numel() and x0 <= -1 \
            and -x0 < 2**52 and 0 <= n <= 62 and x.shape[-1] * (-x0) * (1 << n) <= 2**62:
        lib = _lib()
        if lib is not None:
            m, n_win, heads = geo
            x = x.contiguous()
            out = torch.empty(x.shape, dtype=torch.int8)
            n_tok = x.shape[-1]
            if getattr(lib, name)(x.data_ptr(), out.data_ptr(), x.numel() // n_tok, n_tok, x0, n, 8,
                                  None if m is None else m.data_ptr(), n_win, heads, 0):
                raise MemoryError("shiftmax: out of memory")
            return out
    return _ref("shiftmax")(x, x0, n, k_out, **({} if mask is None else {"mask": mask}))


def shiftmax_rel(x: Tensor, x0: int, mask: Tensor | None = None) -> Tensor:
    """``ops.shiftmax_rel`` (uint8 probabilities relative to the row maximum)."""
    name = {torch.int16: "shiftmax_rel_i16", torch.int32: "shiftmax_rel_i32"}.get(x.dtype)
    geo = _mask_geometry(tuple(x.shape), mask) if x.dim() >= 1 else None
    if name is not None and _cpu(x) and geo is not None and x.numel() and -(2**27) <= x0 <= -1 \
            and (x.dtype == torch.int16 or int(x.abs().max()) < 2**24):
        lib = _lib()
        if lib is not None:
            m, n_win, heads = geo
            x = x.contiguous()
            out = torch.empty(x.shape, dtype=torch.uint8)
            n_tok = x.shape[-1]
            if getattr(lib, name)(x.data_ptr(), out.data_ptr(), x.numel() // n_tok, n_tok, x0,
                                  None if m is None else m.data_ptr(), n_win, heads, 0):
                raise MemoryError("shiftmax_rel: out of memory")
            return out
    return _ref("shiftmax_rel")(x, x0, **({} if mask is None else {"mask": mask}))


def attn_normalize(acc: Tensor, p: Tensor) -> Tensor:
    """``ops.attn_normalize`` (``acc = p @ v`` divided by the row sums of ``p``)."""
    if acc.dtype == torch.int32 and p.dtype == torch.uint8 and acc.dim() >= 2 and acc.dim() == p.dim() \
            and acc.shape[:-1] == p.shape[:-1] and p.shape[-1] == p.shape[-2] and acc.numel() and _cpu(acc, p):
        lib = _lib()
        if lib is not None:
            acc, p = acc.contiguous(), p.contiguous()
            out = torch.empty(acc.shape, dtype=torch.int32)
            d, n = acc.shape[-1], p.shape[-1]
            lib.attn_normalize_i32(acc.data_ptr(), p.data_ptr(), out.data_ptr(), acc.numel() // d, d, n, 0)
            return out
    return _ref("attn_normalize")(acc, p)


_GELU_TABLES: dict[tuple[int, int, int], Tensor] = {}


def gelu_table(x0: int, n: int, k_out: int) -> Tensor:
    """``table[v + 128] = ops.shiftgelu(v)`` for all 256 int8 ``v`` (int32), computed by the reference."""
    key = (x0, n, k_out)
    t = _GELU_TABLES.get(key)
    if t is None:
        t = _ref("shiftgelu")(torch.arange(-128, 128, dtype=torch.int8), x0, n, k_out).contiguous()
        _GELU_TABLES[key] = t
    return t


def shiftgelu(x: Tensor, x0: int, n: int, k_out: int) -> Tensor:
    """``ops.shiftgelu`` of int8 values by a 256-entry table of the reference op (exact)."""
    if x.dtype != torch.int8:
        return _ref("shiftgelu")(x, x0, n, k_out)
    table = gelu_table(x0, n, k_out)
    lib = _lib() if _cpu(x) else None
    if lib is None or not x.numel():
        return table.to(x.device)[x.to(torch.int64) + 128]
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int32)
    lib.lut_i8_i32(x.data_ptr(), out.data_ptr(), x.numel(), table.data_ptr(), 0)
    return out


def requantize_table(x: Tensor, mult: Tensor, shift: Tensor, table: Tensor) -> Tensor:
    """``table[requantize(x, mult, shift, 8) + 128]`` in one pass (int32 in, int8 out)."""
    if x.dtype == torch.int32 and table.dtype == torch.int8 and tuple(table.shape) == (256,) and x.dim() >= 1 \
            and x.numel() and _cpu(x, table) and mult.shape == shift.shape:
        lib = _lib()
        cols = x.shape[-1]
        m, s = per_channel(mult, cols), per_channel(shift, cols)
        if lib is not None and m is not None and s is not None and _shift_ok(s):
            x, table = x.contiguous(), table.contiguous()
            out = torch.empty(x.shape, dtype=torch.int8)
            lib.requant_lut_i32_i8(x.data_ptr(), out.data_ptr(), x.numel() // cols, cols, m.data_ptr(), s.data_ptr(),
                                   cols, ops.qmax(8), table.data_ptr(), 0)
            return out
    return _ref("requantize_table")(x, mult, shift, table)


def attention(q: Tensor, k: Tensor, v: Tensor, score_mult: Tensor, score_shift: Tensor, score_bits: int, probs: int,
              x0: int, n: int = 0, bias: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """The fused ``attention`` op: one C kernel per (image, head) with VNNI dot products, the score
    requantization and the Shiftmax in registers, no int32 score tensor in memory.  The result is laid out
    ``(B, N, H, d)`` in memory (returned as the ``(B, H, N, d)`` view), so the program's following permute +
    reshape to ``(B, N, H*d)`` are free."""
    ok = (q.dtype == k.dtype == v.dtype == torch.int8 and q.dim() == 4 and q.shape == k.shape == v.shape
          and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and q.shape[-1] % 4 == 0 and q.numel()
          and _cpu(q, k, v, bias, mask) and score_mult.numel() == 1 and score_shift.numel() == 1
          and 1 <= int(score_shift.reshape(-1)[0]) <= 62 and 2 <= score_bits <= 32 and x0 <= -1 and probs in (0, 1))
    b, h, n_tok, d = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    if ok and bias is not None:
        ok = bias.dtype == torch.int32 and tuple(bias.shape) == (h, n_tok, n_tok)
    geo = _mask_geometry((b, h, n_tok, n_tok), mask) if ok else None
    lib = _lib() if ok and geo is not None else None
    if probs == PROBS_REL8:
        ok = ok and x0 >= -(2**27)
    else:
        ok = ok and 0 <= n <= 62 and -x0 < 2**52 and n_tok * (-x0) * (1 << n) <= 2**62
    if lib is None or not ok:
        kw: dict[str, Any] = {} if bias is None else {"bias": bias}
        if mask is not None:
            kw["mask"] = mask
        return _ref("attention")(q, k, v, score_mult, score_shift, score_bits, probs, x0, n, **kw)
    m, n_win, _ = geo
    bias_c = None if bias is None else bias.contiguous()
    out = torch.empty(b, n_tok, h, d, dtype=torch.int32)
    o = out.permute(0, 2, 1, 3)
    failed = lib.attention_i8(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, n_tok, d,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        None if bias_c is None else bias_c.data_ptr(), int(score_mult.reshape(-1)[0]),
        int(score_shift.reshape(-1)[0]), ops.qmax(score_bits), x0, n, None if m is None else m.data_ptr(), n_win,
        1 if probs == PROBS_REL8 else 0, 0)
    if failed:
        raise MemoryError("attention: out of memory")
    return o


#: op -> exact fast kernel with the reference calling convention
EAGER: dict[str, Callable[..., Tensor]] = {
    "linear": gemm.linear,
    "matmul": lambda a, b, transpose_b: gemm.matmul(a, b, bool(transpose_b)),
    "requantize": requantize,
    "add_requantize": add_requantize,
    "layernorm": layernorm,
    "layernorm32": layernorm32,
    "shiftmax": shiftmax,
    "shiftmax_rel": shiftmax_rel,
    "attn_normalize": attn_normalize,
    "shiftgelu": shiftgelu,
    "requantize_table": requantize_table,
    "attention": attention,
}
