"""Tests for ``ivit.layers``: observers, the integer path of each quantized module and its STE carrier.

The integer numerics of the ops themselves are covered by ``test_ops.py``; here we check what the
modules add on top: range observation (EMA, freezing, calibration errors), the scale bookkeeping
(the dequantized output approximates the float function), that the integer result is the same in
training and in eval, and the straight-through estimator (forward value = ``q * scale``, gradients
of the float surrogate reach every input and parameter).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ivit import ops
from ivit.layers import (
    NotCalibratedError,
    QAct,
    QEmbed,
    QLayerNorm,
    QLinear,
    QPatchEmbed,
    QResidualAdd,
    QShiftGELU,
    QShiftmax,
    RangeObserver,
)
from ivit.qtensor import QTensor, carry
from ivit.train import normalize


def quant(x: Tensor, bits: int, track: bool = False) -> QTensor:
    """Symmetric per-tensor quantization of a float tensor (with an STE leaf carrier if ``track``)."""
    scale = x.detach().abs().max().to(torch.float64) / ops.qmax(bits)
    q = ops.quantize_symmetric(x.detach(), scale, bits)
    value = None
    if track:
        value = (q.to(torch.float32) * scale.to(torch.float32)).requires_grad_(True)
    return QTensor(q, scale, bits, value)


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean().clamp(min=1e-30)))


def exact_value(out: QTensor) -> Tensor:
    return out.q.to(torch.float32) * out.scale.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# RangeObserver


def test_observer_first_batch_sets_range_then_ema_with_momentum_095() -> None:
    obs = RangeObserver(8)
    assert obs.momentum == 0.95
    obs.train()
    a = torch.tensor([-2.0, 1.0, 3.0])
    b = torch.tensor([-10.0, 0.5, 7.0])
    obs.observe(a)
    assert bool(obs.initialized)
    assert float(obs.running_min) == -2.0 and float(obs.running_max) == 3.0
    obs.observe(b)
    assert float(obs.running_min) == pytest.approx(0.95 * -2.0 + 0.05 * -10.0, rel=1e-15)
    assert float(obs.running_max) == pytest.approx(0.95 * 3.0 + 0.05 * 7.0, rel=1e-15)
    # scale = max(|min|, |max|) / qmax
    amax = max(abs(0.95 * -2.0 + 0.05 * -10.0), 0.95 * 3.0 + 0.05 * 7.0)
    assert float(obs.scale()) == pytest.approx(amax / 127, rel=1e-15)


def test_observer_custom_momentum() -> None:
    obs = RangeObserver(16, momentum=0.5).train()
    obs.observe(torch.tensor([0.0, 4.0]))
    obs.observe(torch.tensor([0.0, 8.0]))
    assert float(obs.running_max) == 6.0
    assert float(obs.scale()) == pytest.approx(6.0 / (2**15 - 1))


def test_observer_ignores_eval_and_frozen() -> None:
    obs = RangeObserver(8).train()
    obs.observe(torch.tensor([-1.0, 1.0]))
    obs.eval()
    obs.observe(torch.tensor([-100.0, 100.0]))
    assert float(obs.running_max) == 1.0
    obs.train()
    obs.frozen.fill_(True)
    assert not obs.observing
    obs.observe(torch.tensor([-100.0, 100.0]))
    assert float(obs.running_max) == 1.0 and float(obs.running_min) == -1.0
    obs.frozen.fill_(False)
    obs.observe(torch.tensor([-100.0, 100.0]))
    assert float(obs.running_max) > 1.0


def test_observer_before_calibration_raises() -> None:
    obs = RangeObserver(8)
    with pytest.raises(NotCalibratedError, match="calibrat"):
        obs.scale()


def test_observer_rejects_non_finite() -> None:
    obs = RangeObserver(8).train()
    with pytest.raises(FloatingPointError):
        obs.observe(torch.tensor([1.0, float("nan")]))
    assert not bool(obs.initialized)


def test_observer_clip_overrides_running_range() -> None:
    obs = RangeObserver(8).train()
    obs.observe(torch.tensor([-5.0, 5.0]))
    obs.clip.fill_(2.0)
    assert float(obs.amax()) == 2.0
    assert float(obs.scale()) == pytest.approx(2.0 / 127)


def test_observer_state_is_in_state_dict() -> None:
    obs = RangeObserver(8).train()
    obs.observe(torch.tensor([-3.0, 2.0]))
    other = RangeObserver(8)
    other.load_state_dict(obs.state_dict())
    assert float(other.scale()) == float(obs.scale())


# ---------------------------------------------------------------------------------------------
# carry (STE)


def test_carry_forward_is_exact_and_gradient_is_surrogate() -> None:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(1000, generator=g) * 1e3).requires_grad_(True)
    q = torch.randint(-(2**15), 2**15, (1000,), generator=g, dtype=torch.int32)
    scale = torch.tensor(3.7e-5, dtype=torch.float64)
    out = carry(s * 2.0, q, scale)
    assert torch.equal(out, q.to(torch.float32) * scale.to(torch.float32))
    out.sum().backward()
    assert torch.equal(s.grad, torch.full_like(s, 2.0))


# ---------------------------------------------------------------------------------------------
# Modules: integer path, scale bookkeeping, STE


def test_qact_requantizes_to_observed_scale() -> None:
    g = torch.Generator().manual_seed(1)
    x = quant(torch.randn(4, 10, 32, generator=g) * 3, 32)
    m = QAct(8).train()
    out = m(x)
    assert out.q.dtype == torch.int8 and out.bits == 8
    assert float(out.scale) == pytest.approx(float(x.dequantize().abs().max()) / 127, rel=1e-12)
    mult, shift, s = m.consts(x.scale)
    assert torch.equal(out.q, ops.requantize(x.q, mult, shift, 8))
    assert sqnr_db(x.dequantize(), out.dequantize()) > 38  # ~8-bit: measured 41.5 dB
    m.eval()
    assert torch.equal(m(x).q, out.q)


def test_qact_eval_before_calibration_raises() -> None:
    m = QAct(8).eval()
    x = quant(torch.randn(3, 4), 16)
    with pytest.raises(NotCalibratedError):
        m(x)


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


def test_qpatch_embed_rejects_overlapping_conv() -> None:
    with pytest.raises(ValueError):
        QPatchEmbed.from_conv(nn.Conv2d(3, 8, kernel_size=4, stride=2), (0.5,) * 3, (0.5,) * 3)


def test_qlayernorm_matches_float_and_is_exact_in_train_and_eval() -> None:
    torch.manual_seed(0)
    ln = nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.3, 0.3)
    m = QLayerNorm.from_float(ln).train()
    x = quant(torch.randn(2, 7, 48) * 5 + 1, 16, track=True)
    out = m(x)
    assert out.q.dtype == torch.int8
    assert torch.equal(out.value, exact_value(out))
    mult, shift, offset, _ = m.consts()
    assert torch.equal(out.q, ops.ilayernorm(x.q, mult, shift, offset, 8))
    with torch.no_grad():
        ref = ln(x.dequantize())
    assert sqnr_db(ref, out.dequantize()) > 33  # measured 37.7 dB
    out.value.sum().backward()
    assert bool((m.weight.grad != 0).any()) and bool((m.bias.grad != 0).any())
    assert bool((x.value.grad != 0).any())
    m.eval()
    assert torch.equal(m(QTensor(x.q, x.scale, x.bits)).q, out.q)


def test_qshiftmax_probabilities_and_mask() -> None:
    g = torch.Generator().manual_seed(0)
    scores = quant(torch.randn(2, 2, 9, 9, generator=g) * 3, 16, track=True)
    m = QShiftmax(8, 15)
    out = m(scores)
    assert out.q.dtype == torch.int8 and float(out.scale) == 2.0**-7
    assert torch.equal(out.value, exact_value(out))
    ref = torch.softmax(scores.dequantize(), dim=-1)
    assert (out.dequantize() - ref).abs().max() < 0.05  # measured 0.018
    out.value[..., 0].sum().backward()
    assert bool((scores.value.grad != 0).any())
    mask = torch.zeros(9, 9, dtype=torch.bool)
    mask[:, 4:] = True
    masked = m(QTensor(scores.q, scores.scale, 16), mask.expand(2, 2, 9, 9))
    assert int(masked.q[..., 4:].abs().max()) == 0
    assert int(masked.q[..., :4].sum(-1).min()) > 100  # rows still sum to ~1 (128 at scale 2^-7)


def test_qshiftgelu_approximates_gelu() -> None:
    x = quant(torch.linspace(-6, 6, 501), 8, track=True)
    m = QShiftGELU(16, 23)
    out = m(x)
    assert out.q.dtype == torch.int32
    assert torch.equal(out.value, exact_value(out))
    x0, n, s = m.consts(x.scale)
    assert torch.equal(out.q, ops.shiftgelu(x.q, x0, n, 16))
    ref = F.gelu(x.dequantize())
    assert (out.dequantize() - ref).abs().max() < 0.06  # x*sigmoid(1.702x) vs erf GELU: measured 0.036
    out.value.sum().backward()
    assert bool((x.value.grad != 0).any())


def test_qresidual_add() -> None:
    g = torch.Generator().manual_seed(0)
    a = quant(torch.randn(2, 5, 16, generator=g), 16, track=True)
    b = quant(torch.randn(2, 5, 16, generator=g) * 0.1, 32, track=True)
    m = QResidualAdd(16).train()
    out = m(a, b)
    assert out.q.dtype == torch.int16
    assert torch.equal(out.value, exact_value(out))
    assert sqnr_db(a.dequantize() + b.dequantize(), out.dequantize()) > 70  # 16-bit: measured 87 dB
    (out.value * torch.arange(16.0)).sum().backward()
    assert bool((a.value.grad != 0).any()) and bool((b.value.grad != 0).any())


def test_qembed_tokens_and_gradients() -> None:
    torch.manual_seed(0)
    m = QEmbed(dim=8, num_patches=4, num_prefix=1, bits=16).train()
    with torch.no_grad():
        m.cls_token.normal_()
        m.pos_embed.normal_(std=0.5)
    acc = quant(torch.randn(2, 4, 8), 32, track=True)
    out = m(acc)
    assert out.q.shape == (2, 5, 8) and out.q.dtype == torch.int16
    assert torch.equal(out.value, exact_value(out))
    ref = torch.cat(
        [(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), acc.dequantize() + m.pos_embed[:, 1:]], 1
    )
    assert sqnr_db(ref.detach(), out.dequantize()) > 70  # measured 92 dB
    out.value.sum().backward()
    assert bool((m.cls_token.grad != 0).any()) and bool((m.pos_embed.grad != 0).any())
    _, _, prefix, pos, s = m.consts(acc.scale)
    assert prefix.shape == (1, 8) and pos.shape == (4, 8)
    assert torch.equal(out.q[0, 0].to(torch.int32), prefix[0])
