"""Tests for ``ivit.nn.attention``: ``QAttention`` (multi-head self-attention in integers, with the Swin
relative-position bias and window mask), in both ``QuantConfig.probs`` modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import exact_value, quant, sqnr_db
from ivit import Probs, QuantConfig, ops
from ivit.nn import QAttention
from ivit.qtensor import QTensor


def make_attention(probs: Probs, dim: int = 32, heads: int = 4, seed: int = 0) -> QAttention:
    torch.manual_seed(seed)
    m = QAttention(dim, heads, QuantConfig(probs=probs))
    with torch.no_grad():
        m.qkv.weight.normal_(std=0.3)
        m.proj.weight.normal_(std=0.2)
    return m


def float_attention(m: QAttention, x: torch.Tensor, rel_bias: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    b, n, c = x.shape
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    s = qkv[0] @ qkv[1].transpose(-1, -2) * m.sm_scale
    if rel_bias is not None:
        s = s + rel_bias
    if mask is not None:
        s = s.masked_fill(mask.repeat(b // mask.shape[0], 1, 1).unsqueeze(1), float("-inf"))
    ctx = (torch.softmax(s, -1) @ qkv[2]).transpose(1, 2).reshape(b, n, c)
    return F.linear(ctx, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("probs", list(Probs))
def test_qattention_tracks_float_and_is_the_same_in_train_and_eval(probs: Probs) -> None:
    m = make_attention(probs)
    g = torch.Generator().manual_seed(1)
    x = quant(torch.randn(3, 17, 32, generator=g), 8, track=True)
    m.train()
    out = m(x)
    assert out.q.dtype == torch.int32 and out.q.shape == (3, 17, 32)
    assert torch.equal(out.value, exact_value(out))
    with torch.no_grad():
        ref = float_attention(m, x.dequantize())
    assert sqnr_db(ref, out.dequantize()) > 25  # measured 31.0 dB (rel8), 30.5 dB (shiftmax8)
    out.value.square().sum().backward()
    for p in (m.qkv.weight, m.qkv.bias, m.proj.weight, x.value):
        g_ = p.grad
        assert g_ is not None and bool(torch.isfinite(g_).all()) and bool((g_ != 0).any())
    m.eval()
    assert torch.equal(m(QTensor(x.q, x.scale, 8)).q, out.q)


@pytest.mark.parametrize("probs", list(Probs))
def test_qattention_window_mask_and_bias(probs: Probs) -> None:
    """Swin form: windows ``(B*nW, N, C)``, a float ``(H, N, N)`` bias and a ``(nW, N, N)`` mask.  Masked keys get
    probability exactly 0: changing the masked tokens changes no unmasked query's output."""
    m = make_attention(probs, seed=2)
    n, nw = 16, 2
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(4, n, n, generator=g) * 0.5
    mask = torch.zeros(nw, n, n, dtype=torch.bool)
    mask[1, :, 8:] = True  # window 1 of every image: keys 8.. masked for every query
    x = quant(torch.randn(2 * nw, n, 32, generator=g), 8)
    m.train()
    out = m(x, bias, mask)
    m.eval()
    assert torch.equal(m(x, bias, mask).q, out.q)
    with torch.no_grad():
        ref = float_attention(m, x.dequantize(), bias, mask)
    assert sqnr_db(ref, out.dequantize()) > 25  # measured 30.0 dB (rel8), 29.9 dB (shiftmax8)
    # perturb the masked tokens (keys and values 8.. of window 1, both images): queries 0..7 of window 1 do not move
    q2 = x.q.clone()
    q2[1::2, 8:] = torch.randint(-127, 128, q2[1::2, 8:].shape, generator=g, dtype=torch.int64).to(torch.int8)
    out2 = m(QTensor(q2, x.scale, 8), bias, mask)
    assert torch.equal(out2.q[1::2, :8], out.q[1::2, :8])
    assert torch.equal(out2.q[0::2], out.q[0::2])  # window 0 untouched
    assert not torch.equal(out2.q[1::2, 8:], out.q[1::2, 8:])


def test_rel_bias_int_rounds_at_the_score_scale_and_saturates() -> None:
    m = make_attention(Probs.REL8)
    s_scale = torch.tensor(3.1e-4, dtype=torch.float64)
    bias = torch.randn(4, 9, 9, generator=torch.Generator().manual_seed(4))
    b = m.rel_bias_int(bias, s_scale)
    assert b.dtype == torch.int32 and torch.equal(b, torch.round(bias.double() / s_scale).to(torch.int32))
    huge = m.rel_bias_int(torch.full((4, 9, 9), 1e30), s_scale)
    assert int(huge.max()) == 2**30 and int(m.rel_bias_int(torch.full((1,), -1e30), s_scale).min()) == -(2**30)


def test_score_scale_and_scores_fed_to_the_requantizer() -> None:
    """Scores are ``q k^T`` in int32 at ``S_q S_k / sqrt(d)`` (+ the integer bias at that scale)."""
    m = make_attention(Probs.REL8, seed=5).train()
    x = quant(torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(6)), 8)
    seen: list = []
    hooks = [mod.register_forward_hook(lambda mod, a, o: seen.append((a, o))) for mod in (m.q_act, m.k_act,
                                                                                         m.score_act)]
    bias = torch.randn(4, 9, 9, generator=torch.Generator().manual_seed(7))
    try:
        m(x, bias)
    finally:
        for h in hooks:
            h.remove()
    q8, k8, scores = seen[0][1], seen[1][1], seen[2][0][0]
    s_scale = m.score_scale(q8.scale, k8.scale)
    assert torch.equal(scores.scale, s_scale) and torch.equal(s_scale, q8.scale * k8.scale * 8**-0.5)
    qh = q8.q.reshape(2, 9, 4, 8).permute(0, 2, 1, 3)
    kh = k8.q.reshape(2, 9, 4, 8).permute(0, 2, 1, 3)
    qk = ops.int_matmul(qh, kh, transpose_b=True)
    assert torch.equal(scores.q, (qk.to(torch.int64) + m.rel_bias_int(bias, s_scale)).to(torch.int32))
