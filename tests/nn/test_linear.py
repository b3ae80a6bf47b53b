"""Tests for ``ivit.nn.linear``: int8 weights (per channel or per tensor), the int32 accumulator, the bias at
the accumulator scale, the patch embedding with the input normalization folded in, and the STE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import exact_value, quant, sqnr_db
from ivit import ops
from ivit.nn import QLinear, QPatchEmbed
from ivit.qtensor import QTensor
from ivit.training.trainer import normalize


def test_qlinear_int_weight_per_channel_and_per_tensor() -> None:
    lin = nn.Linear(16, 6)
    with torch.no_grad():
        lin.weight[2].mul_(100.0)  # one channel with a much larger range
    pc = QLinear.from_float(lin, per_channel=True)
    w_int, s = pc.int_weight()
    assert w_int.dtype == torch.int8 and s.shape == (6,)
    assert int(w_int.abs().max()) == 127
    assert torch.equal(w_int.abs().amax(dim=1), torch.full((6,), 127, dtype=torch.int8))
    assert torch.allclose(s, lin.weight.detach().double().abs().amax(dim=1) / 127)
    pt = QLinear.from_float(lin, per_channel=False)
    w_pt, s_pt = pt.int_weight()
    assert s_pt.shape == ()
    assert int(w_pt[2].abs().max()) == 127 and int(w_pt[0].abs().max()) < 10
    # per-channel keeps small channels precise
    err_pc = (w_int.double() * s.unsqueeze(1) - lin.weight.double()).abs()[0].max()
    err_pt = (w_pt.double() * s_pt - lin.weight.double()).abs()[0].max()
    assert err_pc < err_pt


@pytest.mark.parametrize("per_channel", [True, False])
def test_qlinear_forward_matches_int_linear_and_float(per_channel: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    m = QLinear.from_float(lin, per_channel)
    x = quant(torch.randn(2, 5, 32), 8)
    out = m(x)
    w_int, s_w = m.int_weight()
    acc_scale = s_w * x.scale
    assert out.q.dtype == torch.int32 and out.bits == 32
    assert torch.equal(out.q, ops.int_linear(x.q, w_int, m.int_bias(acc_scale)))
    assert torch.allclose(out.scale, acc_scale)
    with torch.no_grad():
        ref = lin(x.dequantize())
    assert sqnr_db(ref, out.dequantize()) > 40  # measured 47.8 / 48.3 dB


def test_qlinear_extreme_inputs_are_exact() -> None:
    """-128 inputs against +-127 weights over 3072 inputs (the widest MLP): the exact int32 GEMM."""
    m = QLinear(3072, 16, bias=True)
    with torch.no_grad():
        m.weight.fill_(-1.0)
        m.weight[1::2] = 1.0
        m.bias.fill_(0.5)
    x = QTensor(torch.full((2, 3, 3072), -128, dtype=torch.int8), torch.tensor(0.01, dtype=torch.float64), 8)
    out = m(x)
    w_int, s_w = m.int_weight()
    assert int(w_int.abs().min()) == 127
    want = ops.int_linear(x.q, w_int, m.int_bias(s_w * x.scale))
    assert torch.equal(out.q, want)
    assert int(out.q[0, 0, 0]) - int(m.int_bias(s_w * x.scale)[0]) == 3072 * 128 * 127


def test_qlinear_rejects_wide_or_per_channel_input() -> None:
    m = QLinear(8, 4)
    with pytest.raises(ValueError, match="8-bit"):
        m(quant(torch.randn(2, 8), 16))
    per_ch = QTensor(torch.zeros(2, 8, dtype=torch.int8), torch.ones(8, dtype=torch.float64), 8)
    with pytest.raises(ValueError):
        m(per_ch)


def test_qlinear_ste_value_and_gradients() -> None:
    torch.manual_seed(0)
    m = QLinear.from_float(nn.Linear(16, 8))
    x = quant(torch.randn(3, 16), 8, track=True)
    out = m(x)
    assert torch.equal(out.value, exact_value(out))
    out.value.square().sum().backward()
    for t in (m.weight.grad, m.bias.grad, x.value.grad):
        assert t is not None and bool(torch.isfinite(t).all()) and bool((t != 0).any())


def test_qlinear_bias_clamped_to_int30() -> None:
    m = QLinear(4, 2)
    with torch.no_grad():
        m.bias.fill_(1e6)
    b = m.int_bias(torch.tensor(1e-9, dtype=torch.float64))
    assert b.dtype == torch.int32 and int(b.max()) == 2**30


@pytest.mark.parametrize(
    "mean,std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)]
)
def test_qpatch_embed_folds_normalization(mean: tuple, std: tuple) -> None:
    """``linear(p - 128, w', b') == conv((p / 255 - mean) / std)`` in float (the folding is exact math)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 12, kernel_size=4, stride=4)
    m = QPatchEmbed.from_conv(conv, mean, std)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8, generator=g)
    patches = ops.patchify(pixels, 4)  # int8 (B, L, 48)
    w, b = m.effective()
    folded = F.linear(patches.double(), w.double(), b.double())
    with torch.no_grad():
        ref = conv.double()(normalize(pixels, mean, std).double()).flatten(2).transpose(1, 2)  # (B, L, 12)
    assert torch.allclose(folded, ref, rtol=1e-5, atol=1e-5)


def test_qpatch_embed_patchify_is_the_reference_op() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    m = QPatchEmbed.from_conv(conv, (0.5,) * 3, (0.5,) * 3)
    px = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    p = m.patchify(QTensor(px, torch.ones((), dtype=torch.float64), 8))
    assert p.q.dtype == torch.int8 and torch.equal(p.q, ops.patchify(px, 4)) and p.value is None


@pytest.mark.parametrize("kw", [dict(kernel_size=4, stride=2), dict(kernel_size=4, stride=4, padding=1),
                                dict(kernel_size=4, stride=4, dilation=2), dict(kernel_size=(4, 2), stride=(4, 2))])
def test_qpatch_embed_rejects_non_patch_convs(kw: dict) -> None:
    with pytest.raises(ValueError):
        QPatchEmbed.from_conv(nn.Conv2d(3, 8, **kw), (0.5,) * 3, (0.5,) * 3)
