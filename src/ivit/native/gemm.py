"""Exact int8 GEMMs: ``linear`` and ``matmul`` with the integers of ``ops.int_linear`` / ``ops.int_matmul``.

Every function here returns exactly the int32 tensor of the int64 reference product cast to int32, on
every CPU.  Three backends, chosen once per process (``gemm_backend()``):

* ``"onednn"``: ``torch._int_mm`` (oneDNN).  Fast, but on x86 CPUs without VNNI oneDNN's int8 kernels
  sum pairs of u8 x s8 products in a *saturating* int16 (``vpmaddubsw``) and return wrong integers.
  It is used only when the CPU has ``avx512_vnni``, ``avx_vnni`` or ``amx_int8`` AND a startup probe
  (saturating all-127, all-(-128) and -128 x 127 operands, random operands; M = 1 .. 197, N = 1 .. 160,
  K = 2, odd K, K = 3072) matches the exact int64 product bit for bit.  Even then it only gets int8
  ``a`` with ``K >= 2``, as row-major ``(M, K)`` times the transposed view of a row-major ``(N, K)``
  (the probed call form; operands are re-laid out to exactly these strides, since oneDNN takes its
  leading dimensions from the strides and silently leaves the output uninitialized for the arbitrary
  stride of a size-1 dim, pytorch/pytorch#195066).  ``torch._int_mm`` returns uninitialized memory for
  ``K = 1`` (N > 1) on CPU in torch 2.14: such products, uint8 ``a`` (not probed) and batched
  ``matmul`` go to the C kernel.
* ``"native"``: ``ivit_gemm_s8s8s32`` / ``ivit_gemm_u8s8s32`` / ``ivit_gemm_batched`` of
  ``csrc/gemm.c`` (AVX-512 VNNI, AVX-VNNI, AVX2 ``vpmaddwd`` or scalar code, all non-saturating and
  exact), with ``torch.get_num_threads()`` OpenMP threads.
* ``"torch"``: exact int64 ``torch.matmul`` (no C compiler, or non-CPU tensors).

Environment: ``IVIT_GEMM=auto|onednn|native|torch`` forces a choice (default ``auto``: onednn if
proven exact, else native, else torch).  ``IVIT_GEMM=onednn`` still refuses oneDNN with a
``RuntimeWarning`` when the probe fails: never silently inexact.

Bounds: products are ``|a * b| <= 255 * 128``; the int32 result is the exact integer while
``|acc| < 2**31``, i.e. for ``K < 2**17`` (int8 x int8) or ``K <= 2**16`` (uint8 x int8) and a bias
``|bias| < 2**30``.  Beyond that the C kernel and the torch fallback still return the reference's int32
(the exact sum modulo ``2**32``).
"""

from __future__ import annotations

import ctypes
import os
import warnings

import torch
from torch import Tensor

from .. import ops
from . import cpu_flags, cuda_gemm, library, register_signatures

__all__ = ["linear", "matmul", "int8_mm", "gemm_backend", "native_isa", "BACKENDS"]

#: the values of ``IVIT_GEMM`` and of ``gemm_backend()`` (``auto`` only in the environment)
BACKENDS = ("onednn", "native", "torch")

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_GEMM_ARGS = [_P, _I64, _P, _I64, _P, _I64, _I64, _I64, _I64, _P, _INT]
register_signatures({
    "ivit_gemm_s8s8s32": (_GEMM_ARGS, _INT),
    "ivit_gemm_u8s8s32": (_GEMM_ARGS, _INT),
    "ivit_gemm_batched": ([_INT, _P, _I64, _I64, _P, _INT, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64, _INT],
                          _INT),
    "ivit_gemm_isa": ([], ctypes.c_char_p),
})

_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: ``torch._int_mm`` on CPU returns uninitialized memory for K = 1 (N > 1) in torch 2.14: such shapes
#: (and uint8 ``a``) go to the C kernel
_ONEDNN_MIN_K = 2
_BACKEND: str | None = None
_PROBE: tuple[bool, str] | None = None


def _exact_nk(a: Tensor, b_nk: Tensor) -> Tensor:
    """The reference: exact int64 ``a @ b_nk^T`` cast to int32."""
    return torch.matmul(a.to(torch.int64), b_nk.to(torch.int64).t()).to(torch.int32)


def _probe_onednn() -> tuple[bool, str]:
    """Whether ``torch._int_mm`` is provably exact here (and why not); computed once."""
    global _PROBE
    if _PROBE is not None:
        return _PROBE
    if not hasattr(torch, "_int_mm"):
        _PROBE = (False, "torch._int_mm is not available")
        return _PROBE
    flags = cpu_flags()
    if not flags & _VNNI_FLAGS:
        _PROBE = (False, "the CPU has no avx512_vnni / avx_vnni / amx_int8 (oneDNN int8 would saturate)")
        return _PROBE
    g = torch.Generator().manual_seed(0)

    def full(shape: tuple[int, int], v: int) -> Tensor:
        return torch.full(shape, v, dtype=torch.int8)

    def rand(shape: tuple[int, int]) -> Tensor:
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)

    cases: list[tuple[Tensor, Tensor]] = []
    for m, k, n in ((1, 384, 64), (64, 384, 64), (7, 65, 33), (5, 2, 9), (4, 40, 1), (3, 3072, 48),
                    (197, 384, 160)):
        cases += [(full((m, k), 127), full((n, k), 127)), (full((m, k), -128), full((n, k), -128)),
                  (full((m, k), -128), full((n, k), 127)), (rand((m, k)), rand((n, k)))]
    for a, b in cases:
        try:
            got = torch._int_mm(a, b.t())  # the exact call form of int8_mm
        except (RuntimeError, TypeError, ValueError) as e:
            _PROBE = (False, f"torch._int_mm failed on {tuple(a.shape)} x {tuple(b.shape)}: {str(e)[:120]}")
            return _PROBE
        if got.dtype != torch.int32 or not torch.equal(got, _exact_nk(a, b)):
            _PROBE = (False, f"torch._int_mm is inexact on {tuple(a.shape)} x {tuple(b.shape)}^T "
                             f"(values {int(a.reshape(-1)[0])}, {int(b.reshape(-1)[0])})")
            return _PROBE
    _PROBE = (True, "")
    return _PROBE


def _choose() -> str:
    req = (os.environ.get("IVIT_GEMM") or "auto").strip().lower()
    if req not in ("auto", *BACKENDS):
        raise ValueError(f"IVIT_GEMM must be one of auto, onednn, native, torch; got {req!r}")
    if req == "torch":
        return "torch"
    have_c = library() is not None
    if req == "native":
        if have_c:
            return "native"
        warnings.warn("IVIT_GEMM=native but the C kernels are unavailable: using the exact torch int64 GEMM",
                      RuntimeWarning, stacklevel=3)
        return "torch"
    ok, why = _probe_onednn()
    if ok:
        return "onednn"
    if req == "onednn":
        warnings.warn(f"IVIT_GEMM=onednn refused: {why}; using the exact {'native' if have_c else 'torch'} GEMM",
                      RuntimeWarning, stacklevel=3)
    return "native" if have_c else "torch"


def gemm_backend() -> str:
    """The int8 GEMM backend of this process: ``"onednn"``, ``"native"`` or ``"torch"``.

    Decided on first use from ``IVIT_GEMM`` (default ``auto``), the CPU flags and the oneDNN probe.

    Raises:
        ValueError: ``IVIT_GEMM`` has an unknown value.
    """
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = _choose()
    return _BACKEND


def native_isa() -> str | None:
    """The code path compiled into the C GEMM (``avx512vnni``, ``avxvnni``, ``avx2``, ``scalar``), or None."""
    lib = library()
    return None if lib is None else lib.ivit_gemm_isa().decode()


def _check_operands(a: Tensor, b_nk: Tensor, bias: Tensor | None) -> None:
    if not isinstance(a, Tensor) or not isinstance(b_nk, Tensor):
        raise TypeError("int8_mm: a and b_nk must be tensors")
    if a.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"int8_mm: a must be int8 or uint8, got {a.dtype}")
    if b_nk.dtype != torch.int8:
        raise TypeError(f"int8_mm: b_nk must be int8, got {b_nk.dtype}")
    if a.dim() != 2 or b_nk.dim() != 2:
        raise ValueError(f"int8_mm: a and b_nk must be 2-D, got {tuple(a.shape)} and {tuple(b_nk.shape)}")
    if a.shape[1] != b_nk.shape[1]:
        raise ValueError(f"int8_mm: K mismatch: a {tuple(a.shape)}, b_nk {tuple(b_nk.shape)} (b_nk is (N, K))")
    if a.device != b_nk.device:
        raise ValueError(f"int8_mm: a on {a.device}, b_nk on {b_nk.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError("int8_mm: bias must be a tensor or None")
        if bias.dtype != torch.int32:
            raise TypeError(f"int8_mm: bias must be int32, got {bias.dtype}")
        if tuple(bias.shape) != (b_nk.shape[0],):
            raise ValueError(f"int8_mm: bias must have shape ({b_nk.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != a.device:
            raise ValueError(f"int8_mm: bias on {bias.device}, operands on {a.device}")


def _canonical(x: Tensor) -> Tensor:
    """``x`` (2-D) with exactly the row-major strides ``(K, 1)``.

    ``Tensor.contiguous()`` keeps any stride of a size-1 dim (e.g. 0 after ``expand``), and
    ``torch._int_mm`` on CPU takes oneDNN's leading dimensions from the strides: oneDNN then rejects
    the call and the output is left uninitialized (pytorch/pytorch#195066)."""
    if x.stride() == (x.shape[1], 1):
        return x
    return torch.empty(x.shape, dtype=x.dtype).copy_(x)


def _rows(x: Tensor) -> tuple[Tensor, int]:
    """``x`` (2-D) with unit stride along K and its row stride (a copy only when needed)."""
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return x, (x.stride(0) if x.shape[0] > 1 else x.shape[1])


def _mm_native(lib: ctypes.CDLL, a: Tensor, b_nk: Tensor, bias: Tensor | None) -> Tensor:
    m, k = a.shape
    n = b_nk.shape[0]
    a_r, lda = _rows(a)
    b_r, ldb = _rows(b_nk)
    bias_c = None if bias is None else bias.contiguous()
    out = torch.empty(m, n, dtype=torch.int32)
    fn = lib.ivit_gemm_u8s8s32 if a.dtype == torch.uint8 else lib.ivit_gemm_s8s8s32
    rc = fn(a_r.data_ptr(), lda, b_r.data_ptr(), ldb, out.data_ptr(), n, m, n, k,
            None if bias_c is None else bias_c.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"int8_mm: the native GEMM could not allocate buffers for ({m}, {k}) x ({n}, {k})")
    return out


def _mm_torch(a: Tensor, b_nk: Tensor, bias: Tensor | None) -> Tensor:
    acc = torch.matmul(a.to(torch.int64), b_nk.to(torch.int64).t())
    if bias is not None:
        acc += bias.to(torch.int64)
    return acc.to(torch.int32)


def int8_mm(a: Tensor, b_nk: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """Exact int8 GEMM: ``out[m, n] = sum_k a[m, k] * b_nk[n, k] (+ bias[n])``.

    Args:
        a: int8 or uint8 ``(M, K)`` (any strides).
        b_nk: int8 ``(N, K)``: a weight in ``nn.Linear`` layout (any strides).
        bias: int32 ``(N,)`` or None.
        backend: None (this process's ``gemm_backend()``) or one of ``BACKENDS`` to force for this call
            (tests, benchmarks); ``"onednn"`` still takes only shapes it is proven exact on (int8 ``a``,
            ``K >= 2``) and the C kernel for the rest.

    Returns:
        int32 ``(M, N)``, equal to ``(a.long() @ b_nk.long().T + bias.long()).int()``.  Products fit
        16 bits signed-unsigned (``|a * b| <= 255 * 128``); the result is the exact integer while
        ``|acc| < 2**31``: ``K < 2**17`` for int8 ``a``, ``K <= 2**16`` for uint8 ``a`` (plus
        ``|bias| < 2**30``).  M, N or K may be 0.

    Raises:
        TypeError: wrong dtypes (or non-tensors).
        ValueError: wrong ranks, mismatched K, bias shape or devices, or an unknown ``backend``.
        RuntimeError: a forced ``backend`` is unavailable here (no C library, or oneDNN not proven exact).
        MemoryError: the C kernel could not allocate its packing buffers.
    """
    _check_operands(a, b_nk, bias)
    if backend is None:
        backend = gemm_backend() if a.device.type == "cpu" else "torch"
    elif backend not in BACKENDS:
        raise ValueError(f"int8_mm: backend must be one of {BACKENDS} or None, got {backend!r}")
    elif backend != "torch" and a.device.type != "cpu":
        raise ValueError(f"int8_mm: backend {backend!r} needs CPU tensors, got {a.device}")
    elif backend == "onednn" and not _probe_onednn()[0]:
        raise RuntimeError(f"int8_mm: oneDNN is not proven exact here: {_probe_onednn()[1]}")
    m, k = a.shape
    n = b_nk.shape[0]
    lib = library() if backend != "torch" else None
    if backend == "native" and lib is None:
        raise RuntimeError("int8_mm: the native C kernels are unavailable (no C compiler or IVIT_NO_CKERNELS=1)")
    if m == 0 or n == 0 or k == 0:
        out = torch.zeros(m, n, dtype=torch.int32, device=a.device)
        return out if bias is None or m == 0 else out + bias
    if backend == "onednn" and a.dtype == torch.int8 and k >= _ONEDNN_MIN_K:
        acc = torch._int_mm(_canonical(a), _canonical(b_nk).t())
        return acc if bias is None else acc.add_(bias)
    if lib is None:
        return _mm_torch(a, b_nk, bias)
    return _mm_native(lib, a, b_nk, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``ops.int_linear`` (same integers): ``acc[..., n] = sum_k x[..., k] * weight[n, k] + bias[n]``.

    Args:
        x: int8 ``(..., K)``.
        weight: int8 ``(N, K)``.
        bias: int32 ``(N,)`` or None (other integer biases go to the reference op).

    Returns:
        int32 ``(..., N)``: exact for ``K < 2**17`` and ``|bias| < 2**30`` (see ``int8_mm``).

    Raises:
        TypeError: ``x`` or ``weight`` is not int8 (as ``ops.int_linear``).
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        return ops.int_linear(x, weight, bias)
    if x.dtype != torch.int8:
        raise TypeError(f"x must be int8, got {x.dtype}")
    if weight.dtype != torch.int8:
        raise TypeError(f"weight must be int8, got {weight.dtype}")
    if x.is_cuda and weight.is_cuda:  # CUDA has no int64 matmul: cuBLASLt's exact int8 GEMM, padded
        return cuda_gemm.linear(x, weight, bias)
    fast_bias = bias is None or (isinstance(bias, Tensor) and bias.dtype == torch.int32
                                 and tuple(bias.shape) == (weight.shape[0],) and bias.device == x.device)
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.device != weight.device \
            or not fast_bias:
        return ops.int_linear(x, weight, bias)  # raises, or computes the remaining cases exactly
    acc = int8_mm(x.reshape(-1, x.shape[-1]), weight, bias)
    return acc.reshape(*x.shape[:-1], weight.shape[0])


def matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """``ops.int_matmul`` (same integers): batched ``a @ b`` (or ``a @ b^T`` when ``transpose_b``).

    ``out[..., m, n] = sum_k a[..., m, k] * b[..., k, n]`` (``b[..., n, k]`` when ``transpose_b``).
    Batched products (and uint8 ``a``) run in one call of the C kernel's batched entry whenever the
    library is built (a loop of ``torch._int_mm`` calls is slower for attention-sized matrices); a 2-D
    int8 product follows ``int8_mm``'s routing.

    Args:
        a: int8 or uint8 ``(..., M, K)``.
        b: int8 ``(..., K, N)``, or ``(..., N, K)`` when ``transpose_b``; batch dims broadcast.
        transpose_b: whether ``b`` is stored ``(..., N, K)``.

    Returns:
        int32 ``(..., M, N)``: exact for ``K <= 2**16`` (``|acc| <= K * 255 * 128 < 2**31``); beyond,
        still the reference's int32 (the exact sum modulo ``2**32``).

    Raises:
        TypeError: ``a`` is not int8/uint8 or ``b`` not int8 (as ``ops.int_matmul``).
        MemoryError: the C kernel could not allocate its packing buffers.
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.dim() < 2 or b.dim() < 2 \
            or a.device != b.device:
        return ops.int_matmul(a, b, transpose_b)
    if a.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"a must be int8 or uint8, got {a.dtype}")
    if b.dtype != torch.int8:
        raise TypeError(f"b must be int8, got {b.dtype}")
    if a.is_cuda and b.is_cuda:
        return cuda_gemm.matmul(a, b, transpose_b)
    m, k = a.shape[-2], a.shape[-1]
    kb, n = (b.shape[-1], b.shape[-2]) if transpose_b else (b.shape[-2], b.shape[-1])
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        return ops.int_matmul(a, b, transpose_b)  # raises the reference's error
    if kb != k:
        return ops.int_matmul(a, b, transpose_b)  # raises the reference's error
    nb = 1
    for d in batch:
        nb *= d
    if nb == 0 or m == 0 or n == 0 or k == 0:
        return torch.zeros(*batch, m, n, dtype=torch.int32, device=a.device)
    backend = gemm_backend() if a.device.type == "cpu" else "torch"
    lib = library() if backend != "torch" else None
    if len(batch) == 0 and (lib is None or (backend == "onednn" and a.dtype == torch.int8 and k >= _ONEDNN_MIN_K)):
        return int8_mm(a, b if transpose_b else b.t(), backend=backend)
    a3 = a.expand(*batch, m, k).reshape(nb, m, k)
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(nb, *b.shape[-2:])
    if lib is not None:
        a3 = a3.contiguous()
        b3 = b3.contiguous()
        out = torch.empty(nb, m, n, dtype=torch.int32)
        rc = lib.ivit_gemm_batched(1 if a.dtype == torch.uint8 else 0, a3.data_ptr(), m * k, k, b3.data_ptr(),
                                   0 if transpose_b else 1, n * k, k if transpose_b else n, out.data_ptr(), m * n, n,
                                   nb, m, n, k, torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"matmul: the native GEMM could not allocate buffers for {nb} x ({m}, {k}, {n})")
    elif backend == "onednn" and a.dtype == torch.int8 and k >= _ONEDNN_MIN_K:
        out = torch.empty(nb, m, n, dtype=torch.int32)
        for i in range(nb):
            bi = b3[i] if transpose_b else b3[i].t()
            torch._int_mm(_canonical(a3[i]), _canonical(bi).t(), out=out[i])
    else:
        b64 = b3.to(torch.int64)
        out = torch.bmm(a3.to(torch.int64), b64.transpose(1, 2) if transpose_b else b64).to(torch.int32)
    return out.reshape(*batch, m, n)
