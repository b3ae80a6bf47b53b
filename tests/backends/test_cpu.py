"""Each fast kernel equals its reference twin in ``ivit.ops`` exactly (``torch.equal``)."""

from __future__ import annotations

import pytest
import torch

from ivit import engine, kernels, ops

needs_c = pytest.mark.skipif(not kernels.c_kernels_available(), reason="no C compiler for the fast kernels")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=_g(seed), dtype=torch.int64).to(dtype)


def _consts(n: int, seed: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Multipliers/shifts as ``dyadic`` makes them, over a wide range of ratios."""
    g = _g(seed)
    ratio = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-20, 3, generator=g))
    if signed:
        ratio = ratio * torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0).to(torch.float64)
    m, s = ops.dyadic(ratio)
    return m.to(torch.int32), s.to(torch.int32)


@pytest.mark.parametrize("shape", [(1, 197, 384), (3, 17, 96), (2, 5, 3, 8)])
def test_int_linear_fast(shape: tuple[int, ...]) -> None:
    x = _randint(-128, 128, shape, torch.int8, 0)
    w = _randint(-127, 128, (48, shape[-1]), torch.int8, 1)
    b = _randint(-(2**30), 2**30, (48,), torch.int32, 2)
    assert torch.equal(kernels.int_linear_fast(x, w, b), ops.int_linear(x, w, b))
    assert torch.equal(kernels.int_linear_fast(x, w), ops.int_linear(x, w))


@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("batch", [(1, 2), (3, 4), (5,)])
def test_int_matmul_fast(transpose_b: bool, batch: tuple[int, ...]) -> None:
    a = _randint(-128, 128, (*batch, 19, 16), torch.int8, 3)
    b = _randint(-128, 128, (*batch, 23, 16) if transpose_b else (*batch, 16, 23), torch.int8, 4)
    assert torch.equal(kernels.int_matmul_fast(a, b, transpose_b), ops.int_matmul(a, b, transpose_b))
    # non-contiguous operands (as produced by permutes in the program)
    at = a.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(kernels.int_matmul_fast(at, b, transpose_b), ops.int_matmul(at, b, transpose_b))


def test_int_matmul_fast_extremes() -> None:
    a = torch.full((2, 8, 3072), -128, dtype=torch.int8)
    b = torch.full((2, 3072, 8), -128, dtype=torch.int8)
    out = kernels.int_matmul_fast(a, b)
    assert torch.equal(out, ops.int_matmul(a, b))
    assert int(out[0, 0, 0]) == 3072 * 128 * 128


@needs_c
@pytest.mark.parametrize("in_dtype,bits", [(torch.int32, 8), (torch.int32, 16), (torch.int16, 8), (torch.int16, 16)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize_fast(in_dtype: torch.dtype, bits: int, per_channel: bool) -> None:
    hi = 2**31 - 1 if in_dtype == torch.int32 else 2**15 - 1
    x = _randint(-hi, hi + 1, (3, 7, 40), in_dtype, 5)
    x[0, 0, :4] = torch.tensor([hi, -hi, 0, 1], dtype=in_dtype)
    m, s = _consts(40 if per_channel else 1, 6, signed=True)
    if not per_channel:
        m, s = m.reshape(()), s.reshape(())
    assert torch.equal(kernels.requantize_fast(x, m, s, bits), ops.requantize(x, m, s, bits))


@needs_c
def test_requantize_fast_on_a_slice() -> None:
    """Reads a last-dim chunk of a wider tensor (the q/k/v split of qkv) through its row stride."""
    acc = _randint(-(2**24), 2**24, (2, 9, 96), torch.int32, 7)
    chunk = acc[..., 32:64]
    m, s = _consts(32, 8)
    assert torch.equal(kernels.requantize_fast(chunk, m, s, 8), ops.requantize(chunk, m, s, 8))


@needs_c
@pytest.mark.parametrize("per_channel_a", [False, True])
def test_add_requantize_fast(per_channel_a: bool) -> None:
    a = _randint(-32767, 32768, (2, 11, 64), torch.int16, 9)
    b = _randint(-(2**31) + 1, 2**31, (2, 11, 64), torch.int32, 10)
    ma, sa = _consts(64 if per_channel_a else 1, 11)
    mb, sb = _consts(64, 12, signed=True)
    want = ops.add_requantize(a, b, ma, sa, mb, sb, 16)
    assert torch.equal(kernels.add_requantize_fast(a, b, ma, sa, mb, sb, 16), want)


@needs_c
@pytest.mark.parametrize("c", [32, 384, 768])
def test_layernorm_fast(c: int) -> None:
    x = _randint(-32767, 32768, (2, 13, c), torch.int16, 13)
    x[0, 0] = 1234  # constant token: std = 0
    x[0, 1] = 32767
    x[0, 1, 0] = -32767  # one element differs
    g = torch.empty(c, dtype=torch.float64).uniform_(-2, 2, generator=_g(14))
    m, s = ops.dyadic(g * c**0.5 / 2**ops.LN_Z_BITS / 0.02)
    off = _randint(-200, 200, (c,), torch.int32, 15)
    m, s = m.to(torch.int32), s.to(torch.int32)
    assert torch.equal(kernels.layernorm_fast(x, m, s, off, 8), ops.ilayernorm(x, m, s, off, 8))


@needs_c
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("scale", [2.0, 0.3, 1e-3, 3e-5, 1e-9])
@pytest.mark.parametrize("n_tok", [1, 49, 197])
def test_shiftmax_fast(dtype: torch.dtype, scale: float, n_tok: int) -> None:
    hi = 32767 if dtype == torch.int16 else 2**31 - 1
    x = _randint(-hi, hi + 1, (2, 3, n_tok, n_tok), dtype, 16)
    x[0, 0, 0] = hi  # all equal
    x0 = ops.shift_exp_x0(scale)
    n = ops.choose_shiftmax_n(x0, n_tok)
    assert torch.equal(kernels.shiftmax_fast(x, x0, n, 8), ops.shiftmax(x, x0, n, 8))


@needs_c
def test_shiftmax_fast_with_window_mask() -> None:
    """Batch-major windows: x is (B*nW, H, N, N) and the (nW, N, N) mask repeats over the batch."""
    b, nw, h, n_tok = 2, 4, 3, 16
    x = _randint(-32767, 32768, (b * nw, h, n_tok, n_tok), torch.int16, 17)
    mask = torch.rand(nw, n_tok, n_tok, generator=_g(18)) < 0.4
    mask[0, 0] = True  # a fully masked row
    x0 = ops.shift_exp_x0(1e-3)
    n = ops.choose_shiftmax_n(x0, n_tok)
    want = engine.REFERENCE_KERNELS["shiftmax"](x, x0=x0, n=n, k_out=8, mask=mask)
    got = kernels.shiftmax_fast(x, x0, n, 8, mask)
    assert torch.equal(got, want)
    assert int(got[:, :, :, :][mask.repeat(b, 1, 1).unsqueeze(1).expand(-1, h, -1, -1)].abs().sum()) == 0


@pytest.mark.parametrize("scale", [2.0, 0.05, 1e-3])
def test_shiftgelu_fast_table(scale: float) -> None:
    x0 = ops.shift_exp_x0(1.702 * scale)
    n = ops.choose_shiftgelu_n(x0)
    x = _randint(-128, 128, (4, 9, 33), torch.int8, 19)
    assert torch.equal(kernels.shiftgelu_fast(x, x0, n, 16), ops.shiftgelu(x, x0, n, 16))


def test_fast_backend_without_c_kernels_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the C kernels disabled every fast op falls back to an exact path."""
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setattr(kernels, "_LIB_FAILED", True)
    x = _randint(-(2**20), 2**20, (2, 5, 16), torch.int32, 20)
    m, s = _consts(16, 21)
    assert torch.equal(kernels.requantize_fast(x, m, s, 8), ops.requantize(x, m, s, 8))
    x16 = _randint(-32767, 32768, (2, 4, 7, 7), torch.int16, 22)
    assert torch.equal(kernels.shiftmax_fast(x16, -50, 15, 8), ops.shiftmax(x16, -50, 15, 8))


def test_fused_gelu_step_matches_reference(tiny_vit) -> None:  # noqa: ANN001 - fixture
    """The fast plan fuses requantize -> ShiftGELU -> requantize and still gives identical logits."""
    import ivit
    from conftest import random_pixels

    prog = ivit.freeze(tiny_vit)
    fast = ivit.Engine(prog, backend="fast")
    ref = ivit.Engine(prog, backend="reference")
    fused = [s for s in fast.steps if len(s.nodes) == 3]
    assert len(fused) == tiny_vit.meta["depth"]
    assert [prog.nodes[i].op for i in fused[0].nodes] == ["requantize", "shiftgelu", "requantize"]
    x = random_pixels(3, tiny_vit.img_size, seed=23)
    assert torch.equal(fast(x), ref(x))


def _attention_reference(q, k, v, s_mult, s_shift, x0, n, bias=None, mask=None):  # noqa: ANN001, ANN202
    scores = ops.int_matmul(q, k, transpose_b=True)
    if bias is not None:
        scores = (scores.to(torch.int64) + bias.to(torch.int64)).to(torch.int32)
    s16 = ops.requantize(scores, torch.tensor(s_mult), torch.tensor(s_shift), 16)
    probs = engine.REFERENCE_KERNELS["shiftmax"](s16, x0=x0, n=n, k_out=8, mask=mask)
    return ops.int_matmul(probs, v)


@needs_c
@pytest.mark.parametrize("b,h,n_tok,d", [(1, 2, 17, 16), (3, 3, 49, 32), (2, 6, 197, 64), (1, 1, 5, 4)])
@pytest.mark.parametrize("with_bias_mask", [False, True])
def test_fused_attention(b: int, h: int, n_tok: int, d: int, with_bias_mask: bool) -> None:
    """The fused attention kernel equals matmul -> [add bias] -> requantize -> Shiftmax -> matmul."""
    qkv = _randint(-128, 128, (b, n_tok, 3, h, d), torch.int8, 24)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))  # non-contiguous (B, H, N, d) views
    m, s = ops.dyadic(torch.tensor(3e-3, dtype=torch.float64))
    x0 = ops.shift_exp_x0(0.004)
    n = ops.choose_shiftmax_n(x0, n_tok)
    bias = mask = None
    if with_bias_mask:
        bias = _randint(-3000, 3000, (h, n_tok, n_tok), torch.int32, 25)
        nw = 1 if b == 1 else b
        mask = torch.rand(nw, n_tok, n_tok, generator=_g(26)) < 0.3
        mask[0, 0] = True  # a fully masked row
    want = _attention_reference(q, k, v, int(m), int(s), x0, n, bias, mask)
    got = kernels._attention(q, k, v, s_mult=int(m), s_shift=int(s), s_bits=16, x0=x0, n=n, bias=bias,
                             mask=None if mask is None else mask.to(torch.uint8))
    assert got.shape == want.shape
    assert torch.equal(got, want)


@needs_c
def test_kernels_with_two_threads() -> None:
    """OpenMP-parallel C kernels give the same integers with two threads as the reference."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = _randint(-(2**24), 2**24, (4, 37, 96), torch.int32, 27)
        m, s = _consts(96, 28)
        assert torch.equal(kernels.requantize_fast(x, m, s, 8), ops.requantize(x, m, s, 8))
        qkv = _randint(-128, 128, (4, 37, 3, 3, 32), torch.int8, 29)
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
        mm, ss = ops.dyadic(torch.tensor(3e-3, dtype=torch.float64))
        x0 = ops.shift_exp_x0(0.004)
        n = ops.choose_shiftmax_n(x0, 37)
        want = _attention_reference(q, k, v, int(mm), int(ss), x0, n)
        got = kernels._attention(q, k, v, s_mult=int(mm), s_shift=int(ss), s_bits=16, x0=x0, n=n, bias=None,
                                 mask=None)
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(old)
