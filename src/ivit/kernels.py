"""Fast integer kernels for the CPU engine (the ``fast`` backend).

Each kernel computes exactly the same integers as its reference twin in ``ivit.ops``; the engine
tests flip the backend and compare with ``torch.equal``.  Three kinds of speed-up:

* int8 GEMMs through ``torch._int_mm`` (oneDNN, VNNI/AMX) with the weight kept as ``(N, K)``
  row-major (oneDNN's fast layout); exact since int32 accumulation cannot overflow for ``K <= 2**17``.
* elementwise/row ops (requantize, residual add, I-LayerNorm, Shiftmax) in small C kernels
  (``csrc/ivit_kernels.c``), compiled on first use with the system C compiler
  (``-O3 -march=native -fopenmp``) into a per-machine cache and called through ``ctypes``;
* ShiftGELU on int8 inputs as a 256-entry table computed with the reference op itself.

If no C compiler is available the C-kernel ops fall back to the reference ops (still exact);
``IVIT_NO_CKERNELS=1`` forces that fallback.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import ops

if TYPE_CHECKING:
    from .engine import Step
    from .program import Program

__all__ = ["fast_kernels", "fuse_steps", "int_linear_fast", "int_matmul_fast", "c_kernels_available", "load_c_kernels"]

_SRC = Path(__file__).parent / "csrc" / "ivit_kernels.c"
_LIB: ctypes.CDLL | None = None
_LIB_FAILED = False

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_SIGNATURES: dict[str, list] = {
    "requant_i32_i8": [_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT],
    "requant_i32_i16": [_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT],
    "requant_i16_i8": [_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT],
    "requant_i16_i16": [_P, _P, _I64, _I64, _I64, _P, _P, _I64, _I64, _INT],
    "add_requant_i16_i32_i16": [_P, _P, _P, _I64, _I64, _P, _P, _I64, _P, _P, _I64, _I64, _INT],
    "layernorm_i16_i8": [_P, _P, _I64, _I64, _P, _P, _P, _I64, _INT],
    "shiftmax_i16": [_P, _P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _INT],
    "shiftmax_i32": [_P, _P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _INT],
    "lut_i8_i32": [_P, _P, _I64, _P, _INT],
    "lut_i8_i8": [_P, _P, _I64, _P, _INT],
    "requant_lut_i32_i8": [_P, _P, _I64, _I64, _P, _P, _I64, _I64, _P, _INT],
    "ivit_set_num_threads": [_INT],
    "ivit_has_vnni": [],
    "attention_i8": [_P, _P, _P, _P] + [_I64] * 16 + [_P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _INT],
}
_RESTYPES = {"ivit_has_vnni": ctypes.c_int, "attention_i8": ctypes.c_int}


def _cache_dir() -> Path:
    base = os.environ.get("IVIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                        "ivit")
    return Path(base)


def _machine_key() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def load_c_kernels() -> ctypes.CDLL | None:
    """Compile (once per source and machine) and load the C kernels; None if unavailable."""
    global _LIB, _LIB_FAILED
    if _LIB is not None or _LIB_FAILED:
        return _LIB
    if os.environ.get("IVIT_NO_CKERNELS") == "1":
        _LIB_FAILED = True
        return None
    src = _SRC.read_bytes()
    cc = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _machine_key().encode()).hexdigest()[:16]
    out = _cache_dir() / f"ivit_kernels-{key}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            try:
                subprocess.run([cc, *flags, "-o", tmp, str(_SRC)], check=True, capture_output=True, timeout=120)
                os.replace(tmp, out)
            finally:
                Path(tmp).unlink(missing_ok=True)
        lib = ctypes.CDLL(str(out))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = _RESTYPES.get(name)
    except (OSError, subprocess.SubprocessError) as e:
        _LIB_FAILED = True
        msg = e.stderr.decode(errors="replace")[:300] if isinstance(e, subprocess.CalledProcessError) else str(e)
        warnings.warn(f"ivit: C kernels unavailable ({msg.strip()}); the fast backend uses torch ops only",
                      RuntimeWarning, stacklevel=2)
        return None
    _LIB = lib
    return lib


def c_kernels_available() -> bool:
    return load_c_kernels() is not None


def _threads(lib: ctypes.CDLL) -> int:
    n = torch.get_num_threads()
    lib.ivit_set_num_threads(n)
    return n


def _rows(x: Tensor) -> tuple[int, int, int] | None:
    """``(rows, cols, row_stride)`` if ``x`` is a stack of rows with unit column stride, else None."""
    if x.dim() == 0 or x.stride(-1) != 1 or x.numel() == 0:
        return None
    cols = x.shape[-1]
    if x.dim() == 1:
        return 1, cols, cols
    row_stride = x.stride(-2)
    rows = x.shape[-2]
    for i in range(x.dim() - 3, -1, -1):  # outer dims must collapse onto the row dimension
        if x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return None
        rows *= x.shape[i]
    return rows, cols, row_stride


def _i32(t: Tensor) -> Tensor:
    return t.to(torch.int32).contiguous()


def _channels(t: Tensor, cols: int) -> int | None:
    n = t.numel()
    return n if n in (1, cols) else None


# ---------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------

def int_linear_fast(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``ops.int_linear`` via ``torch._int_mm`` (int8 x int8 -> int32, weight ``(N, K)`` row-major)."""
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        return ops.int_linear(x, weight, bias)
    shape = x.shape
    acc = torch._int_mm(x.reshape(-1, shape[-1]).contiguous(), weight.t())
    if bias is not None:
        acc += bias
    return acc.reshape(*shape[:-1], weight.shape[0])


def int_matmul_fast(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """``ops.int_matmul`` as a loop of ``torch._int_mm`` over the flattened batch dims.

    The right operand is passed to oneDNN as the transpose of a row-major ``(N, K)`` matrix (its
    fast layout): ``k`` as it is for ``q @ k^T``, ``v`` transposed once for ``p @ v``.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        return ops.int_matmul(a, b, transpose_b)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m = a.shape[-2]
    bt = b if transpose_b else b.transpose(-1, -2)  # (..., N, K)
    n = bt.shape[-2]
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, m, a.shape[-1]).contiguous()
    bt3 = bt.expand(*batch, *bt.shape[-2:]).reshape(-1, n, bt.shape[-1]).contiguous()
    out = torch.empty(a3.shape[0], m, n, dtype=torch.int32, device=a.device)
    for i in range(a3.shape[0]):
        torch._int_mm(a3[i], bt3[i].t(), out=out[i])
    return out.reshape(*batch, m, n)


# ---------------------------------------------------------------------------------------------
# C kernels
# ---------------------------------------------------------------------------------------------

_REQUANT = {(torch.int32, 8): "requant_i32_i8", (torch.int32, 16): "requant_i32_i16",
            (torch.int16, 8): "requant_i16_i8", (torch.int16, 16): "requant_i16_i16"}


def requantize_fast(x: Tensor, mult: Tensor, shift: Tensor, bits: int) -> Tensor:
    lib = load_c_kernels()
    name = _REQUANT.get((x.dtype, bits))
    geo = _rows(x) if x.device.type == "cpu" else None
    if lib is None or name is None or geo is None:
        return ops.requantize(x, mult, shift, bits)
    rows, cols, stride = geo
    nch = _channels(mult, cols)
    if nch is None or shift.numel() != nch:
        return ops.requantize(x, mult, shift, bits)
    out = torch.empty(x.shape, dtype=ops.storage_dtype(bits))
    m, s = _i32(mult), _i32(shift)
    _threads(lib)
    getattr(lib, name)(x.data_ptr(), out.data_ptr(), rows, cols, stride, m.data_ptr(), s.data_ptr(), nch,
                       ops.qmax(bits), 0)
    return out


def add_requantize_fast(a: Tensor, b: Tensor, mult_a: Tensor, shift_a: Tensor, mult_b: Tensor, shift_b: Tensor,
                        bits: int) -> Tensor:
    lib = load_c_kernels()
    ok = (lib is not None and a.dtype == torch.int16 and b.dtype == torch.int32 and bits == 16
          and a.shape == b.shape and a.is_contiguous() and b.is_contiguous() and a.device.type == "cpu")
    if not ok:
        return ops.add_requantize(a, b, mult_a, shift_a, mult_b, shift_b, bits)
    cols = a.shape[-1]
    na, nb = _channels(mult_a, cols), _channels(mult_b, cols)
    if na is None or nb is None:
        return ops.add_requantize(a, b, mult_a, shift_a, mult_b, shift_b, bits)
    out = torch.empty(a.shape, dtype=torch.int16)
    ma, sa, mb, sb = _i32(mult_a), _i32(shift_a), _i32(mult_b), _i32(shift_b)
    _threads(lib)
    lib.add_requant_i16_i32_i16(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel() // cols, cols,
                                ma.data_ptr(), sa.data_ptr(), na, mb.data_ptr(), sb.data_ptr(), nb, ops.qmax(16), 0)
    return out


def layernorm_fast(x: Tensor, mult: Tensor, shift: Tensor, offset: Tensor, bits: int) -> Tensor:
    lib = load_c_kernels()
    cols = x.shape[-1]
    ok = (lib is not None and x.dtype == torch.int16 and bits == 8 and x.is_contiguous() and x.device.type == "cpu"
          and mult.numel() == cols and shift.numel() == cols and offset.numel() == cols)
    if not ok:
        return ops.ilayernorm(x, mult, shift, offset, bits)
    out = torch.empty(x.shape, dtype=torch.int8)
    m, s, o = _i32(mult), _i32(shift), _i32(offset)
    _threads(lib)
    lib.layernorm_i16_i8(x.data_ptr(), out.data_ptr(), x.numel() // cols, cols, m.data_ptr(), s.data_ptr(),
                         o.data_ptr(), ops.qmax(bits), 0)
    return out


def shiftmax_fast(x: Tensor, x0: int, n: int, k_out: int, mask: Tensor | None = None) -> Tensor:
    """Engine ``shiftmax`` op (``mask``: ``(nW, N, N)`` repeating over batch-major windows)."""
    lib = load_c_kernels()
    n_tok = x.shape[-1]
    name = {torch.int16: "shiftmax_i16", torch.int32: "shiftmax_i32"}.get(x.dtype)
    ok = (lib is not None and name is not None and k_out == 8 and n_tok <= 4096 and n <= 62 and -x0 < 2**52
          and x.is_contiguous() and x.device.type == "cpu" and (mask is None or (x.dim() == 4 and mask.dim() == 3)))
    if not ok:
        from .engine import _shiftmax

        return _shiftmax(x, x0, n, k_out, mask)
    out = torch.empty(x.shape, dtype=torch.int8)
    mptr, n_win, heads = None, 1, 1
    if mask is not None:
        mask_u8 = mask.to(torch.uint8).contiguous()
        mptr, n_win, heads = mask_u8.data_ptr(), mask.shape[0], x.shape[1]
    _threads(lib)
    getattr(lib, name)(x.data_ptr(), out.data_ptr(), x.numel() // n_tok, n_tok, x0, n, k_out, mptr, n_win, heads, 0)
    return out


_GELU_LUT: dict[tuple[int, int, int], Tensor] = {}


def shiftgelu_fast(x: Tensor, x0: int, n: int, k_out: int) -> Tensor:
    """ShiftGELU of int8 inputs by table: ``lut[v] = ops.shiftgelu(v)`` for all 256 values (exact)."""
    if x.dtype != torch.int8:
        return ops.shiftgelu(x, x0, n, k_out)
    key = (x0, n, k_out)
    lut = _GELU_LUT.get(key)
    if lut is None:
        lut = ops.shiftgelu(torch.arange(-128, 128, dtype=torch.int16), x0, n, k_out).contiguous()
        _GELU_LUT[key] = lut
    lib = load_c_kernels()
    if lib is None or not x.is_contiguous() or x.device.type != "cpu":
        return lut.to(x.device)[x.to(torch.int64) + 128]
    out = torch.empty(x.shape, dtype=torch.int32)
    _threads(lib)
    lib.lut_i8_i32(x.data_ptr(), out.data_ptr(), x.numel(), lut.data_ptr(), 0)
    return out


def _requant_lut(x: Tensor, mult: Tensor, shift: Tensor, lut: Tensor) -> Tensor:
    """``lut[requantize(x, mult, shift, 8)]`` for int32 ``x``: one pass, int8 out."""
    lib = load_c_kernels()
    geo = _rows(x) if x.device.type == "cpu" else None
    if lib is None or x.dtype != torch.int32 or geo is None or geo[1] != geo[2]:
        return lut[ops.requantize(x, mult, shift, 8).to(torch.int64) + 128]
    rows, cols, _ = geo
    nch = _channels(mult, cols)
    if nch is None:
        return lut[ops.requantize(x, mult, shift, 8).to(torch.int64) + 128]
    out = torch.empty(x.shape, dtype=torch.int8)
    m, s = _i32(mult), _i32(shift)
    _threads(lib)
    lib.requant_lut_i32_i8(x.data_ptr(), out.data_ptr(), rows, cols, m.data_ptr(), s.data_ptr(), nch, ops.qmax(8),
                           lut.data_ptr(), 0)
    return out


def _attention(q: Tensor, k: Tensor, v: Tensor, *, s_mult: int, s_shift: int, s_bits: int, x0: int, n: int,
               bias: Tensor | None, mask: Tensor | None) -> Tensor:
    """Fused ``q k^T [+ bias] -> requantize(s_bits) -> Shiftmax(8) -> p v`` (see ``attention_i8``).

    Returns int32 ``(B, H, N, d)`` laid out as ``(B, N, H, d)`` in memory, so that the program's
    following permute + reshape to ``(B, N, H*d)`` are free views.
    """
    lib = load_c_kernels()
    b, h, n_tok, d = q.shape
    ok = (lib is not None and q.dtype == k.dtype == v.dtype == torch.int8 and q.dim() == 4 and q.shape == k.shape
          and q.shape == v.shape and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and d % 4 == 0
          and q.device.type == "cpu" and (mask is None or b % mask.shape[0] == 0))
    if not ok:
        scores = ops.int_matmul(q, k, transpose_b=True)
        if bias is not None:
            scores = (scores.to(torch.int64) + bias.to(torch.int64)).to(torch.int32)
        s16 = ops.requantize(scores, torch.tensor(s_mult), torch.tensor(s_shift), s_bits)
        from .engine import _shiftmax

        return ops.int_matmul(_shiftmax(s16, x0, n, 8, None if mask is None else mask.bool()), v)
    out = torch.empty(b, n_tok, h, d, dtype=torch.int32)
    o = out.permute(0, 2, 1, 3)
    _threads(lib)
    failed = lib.attention_i8(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, n_tok, d,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        None if bias is None else bias.data_ptr(), s_mult, s_shift, ops.qmax(s_bits), x0, n,
        None if mask is None else mask.data_ptr(), 1 if mask is None else mask.shape[0], 0)
    if failed:
        raise MemoryError("attention_i8: out of memory")
    return o


def _match_attention(nodes: list, i: int, consts: dict[str, Tensor], uses: dict[str, int]) -> tuple[int, dict] | None:
    """Match ``matmul(q,k^T) [add_const] requantize(16) shiftmax(8) matmul(p,v)`` at node ``i``."""
    seq = nodes[i:i + 5]
    if len(seq) < 4 or seq[0].op != "matmul" or not seq[0].attrs.get("transpose_b"):
        return None
    j = 1
    bias = None
    if seq[j].op == "add_const":
        if seq[j].inputs != (seq[0].output,):
            return None
        bias = consts[seq[j].consts["const"]]
        j += 1
    if len(seq) < j + 3:
        return None
    rq, sm, mm = seq[j], seq[j + 1], seq[j + 2]
    chain = seq[: j + 3]
    if not (rq.op == "requantize" and rq.attrs["bits"] <= 16 and sm.op == "shiftmax" and sm.attrs["k_out"] == 8
            and mm.op == "matmul" and not mm.attrs.get("transpose_b")):
        return None
    if rq.inputs != (chain[j - 1].output,) or sm.inputs != (rq.output,) or mm.inputs[0] != sm.output:
        return None
    if any(uses.get(node.output, 0) != 1 for node in chain[:-1]):
        return None
    mult, shift = consts[rq.consts["mult"]], consts[rq.consts["shift"]]
    if mult.numel() != 1 or sm.attrs["n"] > 62 or -sm.attrs["x0"] >= 2**52:
        return None
    if bias is not None and (bias.dtype != torch.int32 or bias.dim() != 3):
        return None
    mask = consts.get(sm.consts["mask"]) if "mask" in sm.consts else None
    kw = dict(s_mult=int(mult), s_shift=int(shift), s_bits=rq.attrs["bits"], x0=sm.attrs["x0"], n=sm.attrs["n"],
              bias=None if bias is None else bias.contiguous(),
              mask=None if mask is None else mask.to(torch.uint8).contiguous())
    return len(chain), kw


def fuse_steps(program: Program, consts: dict[str, Tensor], steps: list[Step]) -> list[Step]:
    """Fuse step patterns whose intermediates have no other use; results stay bit-identical.

    * ``q k^T [+ bias] -> requantize -> shiftmax -> p v`` (attention): one C kernel per (batch, head)
      with VNNI dot products, no int32 score tensor in memory (``attention_i8``);
    * ``requantize(bits=8) -> shiftgelu -> requantize(bits=8)`` (the MLP activation): the last two
      ops are a function of one int8 value, tabulated once with the reference ops
      (``lut[v] = requantize(shiftgelu(v))`` for all 256 ``v``) and applied right after the first
      requantization in a single pass over the int32 accumulator.
    """
    from .engine import Step

    nodes = program.nodes
    uses: dict[str, int] = {}
    for n in nodes:
        for v in n.inputs:
            uses[v] = uses.get(v, 0) + 1
    out: list[Step] = []
    i = 0
    while i < len(steps):
        att = _match_attention(nodes, i, consts, uses) if load_c_kernels() is not None else None
        if att is not None:
            length, kw = att
            last = nodes[i + length - 1]
            q_name, k_name = nodes[i].inputs
            v_name = last.inputs[1]
            out.append(Step(functools.partial(_attention, **kw), (q_name, k_name, v_name), last.output,
                            tuple(range(i, i + length))))
            i += length
            continue
        if i + 2 < len(steps):
            a, b, c = nodes[i], nodes[i + 1], nodes[i + 2]
            if (a.op == "requantize" and a.attrs["bits"] == 8 and b.op == "shiftgelu" and b.inputs == (a.output,)
                    and c.op == "requantize" and c.attrs["bits"] == 8 and c.inputs == (b.output,)
                    and uses.get(a.output) == 1 and uses.get(b.output) == 1
                    and consts[c.consts["mult"]].numel() == 1):
                v = torch.arange(-128, 128, dtype=torch.int8)
                g = ops.shiftgelu(v, **b.attrs)
                lut = ops.requantize(g, consts[c.consts["mult"]], consts[c.consts["shift"]], 8).contiguous()
                fn = functools.partial(_requant_lut, mult=consts[a.consts["mult"]], shift=consts[a.consts["shift"]],
                                       lut=lut)
                out.append(Step(fn, a.inputs, c.output, (i, i + 1, i + 2)))
                i += 3
                continue
        out.append(steps[i])
        i += 1
    return out


def fast_kernels() -> dict[str, Callable[..., Tensor]]:
    """Kernels overriding the reference ones in ``ivit.engine.REFERENCE_KERNELS``."""
    return {
        "linear": int_linear_fast,
        "matmul": lambda a, b, transpose_b: int_matmul_fast(a, b, bool(transpose_b)),
        "requantize": requantize_fast,
        "add_requantize": add_requantize_fast,
        "layernorm": layernorm_fast,
        "shiftmax": shiftmax_fast,
        "shiftgelu": shiftgelu_fast,
    }


if __name__ == "__main__":  # pragma: no cover - `python -m ivit.kernels` builds the cache
    print("C kernels:", "available" if c_kernels_available() else "unavailable", file=sys.stderr)
