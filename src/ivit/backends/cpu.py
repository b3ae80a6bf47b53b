"""The ``cpu`` backend (alias ``fast``, the default): exact native kernels for the CPU.

* int8 GEMMs through ``ivit.native.gemm`` (oneDNN where it is provably exact on this CPU, else our own
  C GEMM that never saturates);
* requantize, residual add, I-LayerNorm, Shiftmax and the fused ``attention`` / ``requantize_table``
  ops in C (``ivit/native/csrc``), with constants widened and laid out once when the engine plans;
* ShiftGELU of int8 values by a 256-entry table computed with the reference op.

Each factory checks the node's static types; a case a C kernel does not cover uses the reference
op (still exact).  At run time every kernel checks the exact shape, dtype and layout of its operands
against the validated types before any pointer reaches C.  Without a C compiler (or with
``IVIT_NO_CKERNELS=1``) every op falls back to the reference, except the GEMMs (``native.gemm``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import native, ops
from ..ir.interpret import reference_factory
from ..ir.opset import OPSET, PROBS_REL8
from ..ir.program import Node
from ..ir.types import TType
from ..native import gemm
from .base import Backend, register_backend

__all__ = ["CPU", "cpu_kernels"]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
native.register_signatures({
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

Fn = Callable[..., Tensor]


def _lib() -> Any:
    lib = native.library()
    if lib is not None:
        lib.ivit_set_num_threads(torch.get_num_threads())
    return lib


def _check(x: Tensor, t: TType, contiguous: bool = True) -> int:
    """Exact operand check against the static type; returns the batch size."""
    if x.dtype != t.dtype or x.device.type != "cpu" or x.dim() != t.rank:
        raise RuntimeError(f"operand {x.dtype}{tuple(x.shape)} does not match {t.describe()}")
    b = 1
    if t.batch_axis is not None:
        k = t.shape[t.batch_axis]
        if x.shape[t.batch_axis] % k:
            raise RuntimeError(f"operand {tuple(x.shape)} does not match {t.describe()}")
        b = x.shape[t.batch_axis] // k
    if tuple(x.shape) != t.concrete(b):
        raise RuntimeError(f"operand {tuple(x.shape)} does not match {t.describe()}")
    if contiguous and not x.is_contiguous():
        raise RuntimeError("operand is not contiguous")
    return b


def _rows(x: Tensor) -> tuple[int, int, int] | None:
    """``(rows, cols, row_stride)`` if ``x`` is a stack of rows with unit column stride, else None (the q/k/v
    column slices of the qkv accumulator qualify without a copy)."""
    if x.dim() == 0 or x.stride(-1) != 1 or x.numel() == 0:
        return None
    cols = x.shape[-1]
    if x.dim() == 1:
        return 1, cols, cols
    rows = x.shape[-2]
    for i in range(x.dim() - 3, -1, -1):  # outer dims must collapse onto the row dimension
        if x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return None
        rows *= x.shape[i]
    return rows, cols, x.stride(-2)


def _per_channel(t: Tensor, c: int) -> Tensor:
    """A per-tensor or per-channel int32 constant expanded to a contiguous ``(C,)`` vector."""
    return t.reshape(-1).to(torch.int32).expand(c).contiguous() if t.numel() == 1 else \
        t.reshape(-1).to(torch.int32).contiguous()


def _ref(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    return reference_factory(node, consts, ins, out)


# ---------------------------------------------------------------------------------------------
# factories
# ---------------------------------------------------------------------------------------------

def _linear(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    w = consts["weight"].contiguous()
    bias = consts.get("bias")
    bias = None if bias is None else bias.contiguous()
    return lambda x: gemm.linear(x, w, bias)


def _matmul(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    tb = bool(node.attrs["transpose_b"])
    return lambda a, b: gemm.matmul(a, b, tb)


_REQUANT = {(torch.int32, 8): "requant_i32_i8", (torch.int32, 16): "requant_i32_i16",
            (torch.int16, 8): "requant_i16_i8", (torch.int16, 16): "requant_i16_i16"}


def _requantize(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    bits = node.attrs["bits"]
    name = _REQUANT.get((ins[0].dtype, bits))
    if name is None or native.library() is None:
        return _ref(node, consts, ins, out)
    t = ins[0]
    cols = t.shape[-1]
    m, s = _per_channel(consts["mult"], cols), _per_channel(consts["shift"], cols)
    qm = ops.qmax(bits)

    def fn(x: Tensor) -> Tensor:
        _check(x, t, contiguous=False)
        geo = _rows(x)
        if geo is None:
            x = x.contiguous()
            geo = _rows(x)
        rows, _, stride = geo
        res = torch.empty(x.shape, dtype=out.dtype)
        getattr(_lib(), name)(x.data_ptr(), res.data_ptr(), rows, cols, stride, m.data_ptr(), s.data_ptr(), cols,
                              qm, 0)
        return res
    return fn


def _add_requantize(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    a_t, b_t = ins
    if (a_t.dtype, b_t.dtype, node.attrs["bits"]) != (torch.int16, torch.int32, 16) or native.library() is None:
        return _ref(node, consts, ins, out)
    cols = a_t.shape[-1]
    ma, sa = _per_channel(consts["mult_a"], cols), _per_channel(consts["shift_a"], cols)
    mb, sb = _per_channel(consts["mult_b"], cols), _per_channel(consts["shift_b"], cols)

    def fn(a: Tensor, b: Tensor) -> Tensor:
        a, b = a.contiguous(), b.contiguous()
        _check(a, a_t)
        _check(b, b_t)
        if a.shape != b.shape:
            raise RuntimeError("add_requantize operands differ in shape")
        res = torch.empty(a.shape, dtype=torch.int16)
        _lib().add_requant_i16_i32_i16(a.data_ptr(), b.data_ptr(), res.data_ptr(), a.numel() // cols, cols,
                                       ma.data_ptr(), sa.data_ptr(), cols, mb.data_ptr(), sb.data_ptr(), cols,
                                       ops.qmax(16), 0)
        return res
    return fn


def _layernorm_factory(cname: str) -> Callable[..., Fn]:
    def factory(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
        t = ins[0]
        if t.dtype != torch.int16 or node.attrs["bits"] != 8 or native.library() is None:
            return _ref(node, consts, ins, out)
        cols = t.shape[-1]
        m, s, o = (_per_channel(consts[k], cols) for k in ("mult", "shift", "offset"))

        def fn(x: Tensor) -> Tensor:
            x = x.contiguous()
            _check(x, t)
            res = torch.empty(x.shape, dtype=torch.int8)
            getattr(_lib(), cname)(x.data_ptr(), res.data_ptr(), x.numel() // cols, cols, m.data_ptr(),
                                   s.data_ptr(), o.data_ptr(), ops.qmax(8), 0)
            return res
        return fn
    return factory


def _mask_u8(consts: Mapping[str, Tensor]) -> Tensor | None:
    m = consts.get("mask")
    return None if m is None else m.to(torch.uint8).contiguous()


def _shiftmax(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    t = ins[0]
    name = {torch.int16: "shiftmax_i16", torch.int32: "shiftmax_i32"}.get(t.dtype)
    a = node.attrs
    if name is None or a["k_out"] != 8 or native.library() is None:
        return _ref(node, consts, ins, out)
    mask = _mask_u8(consts)
    n_tok = t.shape[-1]

    def fn(x: Tensor) -> Tensor:
        x = x.contiguous()
        _check(x, t)
        res = torch.empty(x.shape, dtype=torch.int8)
        n_win, heads = (1, 1) if mask is None else (mask.shape[0], x.shape[1])
        if getattr(_lib(), name)(x.data_ptr(), res.data_ptr(), x.numel() // n_tok, n_tok, a["x0"], a["n"], 8,
                                 None if mask is None else mask.data_ptr(), n_win, heads, 0):
            raise MemoryError("shiftmax: out of memory")
        return res
    return fn


def _shiftmax_rel(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    t = ins[0]
    name = {torch.int16: "shiftmax_rel_i16", torch.int32: "shiftmax_rel_i32"}.get(t.dtype)
    if name is None or native.library() is None:
        return _ref(node, consts, ins, out)
    mask = _mask_u8(consts)
    n_tok = t.shape[-1]
    x0 = node.attrs["x0"]

    def fn(x: Tensor) -> Tensor:
        x = x.contiguous()
        _check(x, t)
        res = torch.empty(x.shape, dtype=torch.uint8)
        n_win, heads = (1, 1) if mask is None else (mask.shape[0], x.shape[1])
        if getattr(_lib(), name)(x.data_ptr(), res.data_ptr(), x.numel() // n_tok, n_tok, x0,
                                 None if mask is None else mask.data_ptr(), n_win, heads, 0):
            raise MemoryError("shiftmax_rel: out of memory")
        return res
    return fn


def _attn_normalize(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    acc_t, p_t = ins
    if native.library() is None:
        return _ref(node, consts, ins, out)
    d, n_tok = acc_t.shape[-1], p_t.shape[-1]

    def fn(acc: Tensor, p: Tensor) -> Tensor:
        acc, p = acc.contiguous(), p.contiguous()
        _check(acc, acc_t)
        _check(p, p_t)
        res = torch.empty(acc.shape, dtype=torch.int32)
        _lib().attn_normalize_i32(acc.data_ptr(), p.data_ptr(), res.data_ptr(), acc.numel() // d, d, n_tok, 0)
        return res
    return fn


def _shiftgelu(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    """A function of one int8 value: ``lut[v + 128] = shiftgelu(v)`` for all 256 ``v`` (exact)."""
    lut = OPSET["shiftgelu"].reference(torch.arange(-128, 128, dtype=torch.int8), **node.attrs).contiguous()
    t = ins[0]

    def fn(x: Tensor) -> Tensor:
        x = x.contiguous()
        _check(x, t)
        lib = _lib()
        if lib is None:
            return lut[x.to(torch.int64) + 128]
        res = torch.empty(x.shape, dtype=torch.int32)
        lib.lut_i8_i32(x.data_ptr(), res.data_ptr(), x.numel(), lut.data_ptr(), 0)
        return res
    return fn


def _requantize_table(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    t = ins[0]
    if t.dtype != torch.int32 or native.library() is None:
        return _ref(node, consts, ins, out)
    cols = t.shape[-1]
    m, s = _per_channel(consts["mult"], cols), _per_channel(consts["shift"], cols)
    table = consts["table"].contiguous()

    def fn(x: Tensor) -> Tensor:
        x = x.contiguous()
        _check(x, t)
        res = torch.empty(x.shape, dtype=torch.int8)
        _lib().requant_lut_i32_i8(x.data_ptr(), res.data_ptr(), x.numel() // cols, cols, m.data_ptr(), s.data_ptr(),
                                  cols, ops.qmax(8), table.data_ptr(), 0)
        return res
    return fn


def _attention(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    """One C kernel per (image, head): VNNI dot products, the score requantization and the Shiftmax in
    registers, no int32 score tensor in memory.  The output is laid out ``(B, N, H, d)`` in memory, so the
    program's following permute + reshape to ``(B, N, H*d)`` are free views."""
    q_t = ins[0]
    _, h, n_tok, d = q_t.shape
    if d % 4 or native.library() is None:
        return _ref(node, consts, ins, out)
    a = node.attrs
    mult, shift = int(consts["score_mult"].reshape(-1)[0]), int(consts["score_shift"].reshape(-1)[0])
    bias = consts.get("bias")
    bias = None if bias is None else bias.contiguous()
    mask = _mask_u8(consts)
    qm = ops.qmax(a["score_bits"])
    mode = 1 if a["probs"] == PROBS_REL8 else 0

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        for x in (q, k, v):
            _check(x, q_t, contiguous=False)
            if x.stride(-1) != 1:
                raise RuntimeError("attention operands need unit stride along d")
        b = q.shape[0]
        if mask is not None and b % mask.shape[0]:
            raise RuntimeError("attention: batch is not a whole number of window groups")
        res = torch.empty(b, n_tok, h, d, dtype=torch.int32)
        o = res.permute(0, 2, 1, 3)
        failed = _lib().attention_i8(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), res.data_ptr(), b, h, n_tok, d,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            None if bias is None else bias.data_ptr(), mult, shift, qm, a["x0"], a.get("n", 0),
            None if mask is None else mask.data_ptr(), 1 if mask is None else mask.shape[0], mode, 0)
        if failed:
            raise MemoryError("attention: out of memory")
        return o
    return fn


def cpu_kernels() -> dict[str, Callable[..., Fn]]:
    """The ``op -> kernel factory`` table of the cpu backend."""
    return {
        "linear": _linear,
        "matmul": _matmul,
        "requantize": _requantize,
        "add_requantize": _add_requantize,
        "layernorm": _layernorm_factory("layernorm_i16_i8"),
        "layernorm32": _layernorm_factory("layernorm32_i16_i8"),
        "shiftmax": _shiftmax,
        "shiftmax_rel": _shiftmax_rel,
        "attn_normalize": _attn_normalize,
        "shiftgelu": _shiftgelu,
        "requantize_table": _requantize_table,
        "attention": _attention,
    }


CPU = register_backend(Backend(
    name="cpu",
    aliases=("fast",),
    devices=("cpu",),
    available=lambda: True,
    kernels=cpu_kernels,
    passes=("fold_gelu_table", "fuse_attention"),
    description="native C kernels and exact int8 GEMMs (oneDNN where exact)",
    native=True,
))

