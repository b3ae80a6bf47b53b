"""``ivit.native.cuda_gemm``: the CUDA int8 GEMM path equals ``ops.int_linear`` / ``ops.int_matmul`` exactly.

The padding (M <= 16, K and N not multiples of 8, unaligned and strided views), the uint8 offset and the batch
loop are device-independent, so they are checked here on CPU tensors (``torch._int_mm`` exists on the CPU too and
is exact where the CPU has VNNI; the module is skipped where a probe shows it is not).  A quantized ViT's
forward and backward are then run with the CUDA GEMMs in place of the CPU ones under a mode that rejects every
integer ``matmul`` (CUDA has none): same integers, and nothing else in the model needs an integer matmul.
The same checks on real CUDA tensors are marked ``gpu``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from conftest import make_qmodel, random_pixels
from ivit import ops
from ivit.native import cuda_gemm
from ivit.native.kernels import EAGER


def _int_mm_exact_on_cpu() -> bool:
    """torch._int_mm on this CPU gives the exact product on saturating operands (no VNNI: it saturates)."""
    try:
        for v in (127, -128):
            a = torch.full((32, 64), v, dtype=torch.int8)
            b = torch.full((64, 8), v, dtype=torch.int8)
            if not torch.equal(torch._int_mm(a, b), torch.full((32, 8), 64 * v * v, dtype=torch.int32)):
                return False
    except RuntimeError:
        return False
    return True


EXACT = _int_mm_exact_on_cpu()
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not EXACT, reason="torch._int_mm is inexact on this CPU")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="no CUDA GPU")])]


def _ints(lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int, extreme: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64)
    if extreme:  # a third lo, a third hi
        pick = torch.randint(0, 3, shape, generator=g)
        x = torch.where(pick == 0, lo, torch.where(pick == 1, hi, x))
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 16, 17, 197])
@pytest.mark.parametrize("k", [1, 7, 8, 64, 100])
@pytest.mark.parametrize("n", [1, 10, 16])
def test_linear_pads_every_shape(device: str, m: int, k: int, n: int) -> None:
    for seed, extreme in ((0, False), (1, True)):
        x = _ints(-128, 127, (m, k), torch.int8, seed, extreme)
        w = _ints(-127, 127, (n, k), torch.int8, seed + 10, extreme)
        bias = _ints(-(2**30), 2**30, (n,), torch.int32, seed + 20)
        for b in (None, bias):
            want = ops.int_linear(x, w, b)
            got = cuda_gemm.linear(x.to(device), w.to(device), None if b is None else b.to(device))
            assert got.dtype == torch.int32 and got.is_contiguous() and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_batched_views_and_saturation(device: str) -> None:
    x = _ints(-128, 127, (2, 5, 3 * 24), torch.int8, 3, extreme=True).to(device)[..., 24:48]  # unaligned view
    w = _ints(-127, 127, (40, 24), torch.int8, 4, extreme=True).to(device)
    assert torch.equal(cuda_gemm.linear(x, w).cpu(), ops.int_linear(x.cpu(), w.cpu()))
    xs = torch.full((20, 4096), -128, dtype=torch.int8, device=device)  # |acc| = 4096 * 128 * 127 < 2**31
    ws = torch.full((8, 4096), -127, dtype=torch.int8, device=device)
    assert torch.equal(cuda_gemm.linear(xs, ws).cpu(), torch.full((20, 8), 4096 * 128 * 127, dtype=torch.int32))
    b64 = torch.tensor([1, -2, 3, -4, 5, -6, 7, -8], dtype=torch.int64, device=device)
    assert torch.equal(cuda_gemm.linear(xs[:3], ws, b64).cpu(), ops.int_linear(xs[:3].cpu(), ws.cpu(), b64.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("a_dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("mkn", [(17, 16, 17), (5, 3, 9), (49, 32, 49), (16, 8, 8)])
def test_matmul_batched(device: str, transpose_b: bool, a_dtype: torch.dtype, mkn: tuple[int, int, int]) -> None:
    m, k, n = mkn
    lo, hi = (0, 255) if a_dtype == torch.uint8 else (-128, 127)
    for seed, extreme in ((0, False), (1, True)):
        a = _ints(lo, hi, (2, 3, m, k), a_dtype, seed, extreme)
        b = _ints(-128, 127, (2, 3, n, k) if transpose_b else (2, 3, k, n), torch.int8, seed + 5, extreme)
        got = cuda_gemm.matmul(a.to(device), b.to(device), transpose_b)
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), ops.int_matmul(a, b, transpose_b))


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_broadcast_permuted_and_2d(device: str) -> None:
    qkv = _ints(-128, 127, (2, 17, 3, 2, 16), torch.int8, 7, extreme=True).to(device)  # (B, N, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided (B, H, N, d) views, as in attention
    s = cuda_gemm.matmul(q, k, True)
    assert torch.equal(s.cpu(), ops.int_matmul(q.cpu(), k.cpu(), True))
    p = _ints(0, 255, (2, 2, 17, 17), torch.uint8, 8, extreme=True).to(device)
    assert torch.equal(cuda_gemm.matmul(p, v).cpu(), ops.int_matmul(p.cpu(), v.cpu()))
    a = _ints(-128, 127, (1, 3, 20, 24), torch.int8, 9).to(device)
    b = _ints(-128, 127, (2, 1, 24, 12), torch.int8, 10).to(device)
    assert torch.equal(cuda_gemm.matmul(a, b).cpu(), ops.int_matmul(a.cpu(), b.cpu()))
    a2 = _ints(0, 255, (3, 24), torch.uint8, 11).to(device)
    assert torch.equal(cuda_gemm.matmul(a2, b[0, 0]).cpu(), ops.int_matmul(a2.cpu(), b[0, 0].cpu()))
    empty = cuda_gemm.matmul(a[:, :, :0], b)
    assert empty.shape == (2, 3, 0, 12) and empty.dtype == torch.int32


def test_errors() -> None:
    x8 = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError):
        cuda_gemm.linear(x8.to(torch.int16), x8)
    with pytest.raises(TypeError):
        cuda_gemm.matmul(x8, x8.to(torch.uint8))
    with pytest.raises(ValueError):
        cuda_gemm.linear(x8, torch.zeros(4, 7, dtype=torch.int8))
    with pytest.raises(ValueError):
        cuda_gemm.matmul(x8, x8)
    with pytest.raises(ValueError):
        cuda_gemm.linear(x8, x8, torch.zeros(3, dtype=torch.int32))


_MATMULS = {torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum, torch.nn.functional.linear,
            torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}


class _NoIntegerMatmul(TorchFunctionMode):
    """Rejects every integer matmul, as CUDA does (``torch._int_mm`` with int8 operands is allowed)."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        if func in _MATMULS:
            for t in [*args, *(kwargs or {}).values()]:
                if isinstance(t, Tensor) and not (t.is_floating_point() or t.is_complex()):
                    raise AssertionError(f"integer {getattr(func, '__name__', func)} on {t.dtype}: CUDA has none")
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not EXACT, reason="torch._int_mm is inexact on this CPU")
@pytest.mark.parametrize("name", ["vit_test", "swin_test"])
def test_qat_step_through_cuda_gemms_is_exact(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    qm = make_qmodel(name)
    pixels = random_pixels(3, qm.img_size, seed=5)
    want = qm.logits(pixels)
    monkeypatch.setitem(EAGER, "linear", cuda_gemm.linear)
    monkeypatch.setitem(EAGER, "matmul", lambda a, b, transpose_b: cuda_gemm.matmul(a, b, bool(transpose_b)))
    with _NoIntegerMatmul():
        with pytest.raises(AssertionError, match="CUDA has none"):  # the mode sees the reference's int64 matmul
            ops.int_linear(torch.zeros(2, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8))
        assert torch.equal(qm.logits(pixels), want)
        train = copy.deepcopy(qm).train()
        out = train(pixels)
        out.value.float().logsumexp(dim=1).mean().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in train.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["vit_test", "swin_test"])
def test_cuda_model_logits_equal_cpu(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantized model on CUDA, its GEMMs through this module, gives the CPU's integers."""
    lin, mm = EAGER["linear"], EAGER["matmul"]
    monkeypatch.setitem(EAGER, "linear", lambda x, weight, bias=None: cuda_gemm.linear(x, weight, bias)
                        if x.is_cuda else lin(x, weight, bias))
    monkeypatch.setitem(EAGER, "matmul", lambda a, b, transpose_b: cuda_gemm.matmul(a, b, bool(transpose_b))
                        if a.is_cuda else mm(a, b, transpose_b))
    qm = make_qmodel(name)
    pixels = random_pixels(4, qm.img_size, seed=6)
    want = qm.logits(pixels)
    got = copy.deepcopy(qm).cuda().logits(pixels.cuda())
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_native_gemm_routes_cuda_tensors_here() -> None:
    """``ivit.native.gemm`` (what the quantized modules call) sends CUDA tensors to this module (issue 15, item 1):
    fails until that routing is in place."""
    from ivit.native import gemm

    x = _ints(-128, 127, (2, 5, 24), torch.int8, 1)
    w = _ints(-127, 127, (12, 24), torch.int8, 2)
    p = _ints(0, 255, (2, 3, 5, 5), torch.uint8, 3)
    v = _ints(-128, 127, (2, 3, 5, 24), torch.int8, 4)
    assert torch.equal(gemm.linear(x.cuda(), w.cuda()).cpu(), ops.int_linear(x, w))
    assert torch.equal(gemm.matmul(p.cuda(), v.cuda()).cpu(), ops.int_matmul(p, v))
