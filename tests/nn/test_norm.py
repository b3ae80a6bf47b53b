"""Tests for ``ivit.nn.norm``: ``QLayerNorm`` with gamma/beta folded into integer constants, in both
``LayerNormImpl`` modes (the 32-bit default and the 64-bit original)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import exact_value, quant, sqnr_db
from ivit import LayerNormImpl, ops
from ivit.nn import NotCalibratedError, QLayerNorm
from ivit.qtensor import QTensor

IMPL_OPS = {LayerNormImpl.INT32: (ops.ilayernorm32, "layernorm32"), LayerNormImpl.INT64: (ops.ilayernorm, "layernorm")}


@pytest.mark.parametrize("impl", list(LayerNormImpl))
def test_qlayernorm_matches_float_and_is_exact_in_train_and_eval(impl: LayerNormImpl) -> None:
    torch.manual_seed(0)
    ln = nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.3, 0.3)
    m = QLayerNorm.from_float(ln, impl=impl).train()
    assert m.impl is impl and m.op == IMPL_OPS[impl][1]
    x = quant(torch.randn(2, 7, 48) * 5 + 1, 16, track=True)
    out = m(x)
    assert out.q.dtype == torch.int8
    assert torch.equal(out.value, exact_value(out))
    mult, shift, offset, _ = m.consts()
    assert torch.equal(out.q, IMPL_OPS[impl][0](x.q, mult, shift, offset, 8))
    with torch.no_grad():
        ref = ln(x.dequantize())
    assert sqnr_db(ref, out.dequantize()) > 33  # measured 37.7 dB
    out.value.sum().backward()
    assert bool((m.weight.grad != 0).any()) and bool((m.bias.grad != 0).any())
    assert bool((x.value.grad != 0).any())
    m.eval()
    assert torch.equal(m(QTensor(x.q, x.scale, x.bits)).q, out.q)


def test_impls_agree_almost_everywhere() -> None:
    """Both impls from one calibrated module: at most 1 LSB apart, on very few elements."""
    torch.manual_seed(1)
    ln = nn.LayerNorm(384, eps=1e-6)
    a = QLayerNorm.from_float(ln, impl=LayerNormImpl.INT32).train()
    x = quant(torch.randn(4, 50, 384) * 3, 16)
    qa = a(x).q
    b = QLayerNorm.from_float(ln, impl=LayerNormImpl.INT64)
    b.load_state_dict(a.state_dict())
    qb = b.eval()(x).q
    assert int((qa.to(torch.int16) - qb.to(torch.int16)).abs().max()) <= 1
    assert float((qa == qb).double().mean()) > 0.99


def test_qlayernorm_offset_is_clamped_per_impl() -> None:
    """``offset`` is clamped to int32's safe range: +-2**30 for the 32-bit impl (validated), 2**31 - 1 else."""
    for impl, lim in ((LayerNormImpl.INT32, 2**30), (LayerNormImpl.INT64, 2**31 - 1)):
        m = QLayerNorm(4, impl=impl).train()
        m.observer.observe(torch.tensor([-1e-9, 1e-9]))
        with torch.no_grad():
            m.bias.fill_(1e6)
        _, _, offset, _ = m.consts()
        assert offset.dtype == torch.int64 and int(offset.max()) == lim


def test_qlayernorm_16bit_output() -> None:
    m = QLayerNorm(32, bits=16).train()
    x = quant(torch.randn(3, 32), 16)
    out = m(x)
    assert out.q.dtype == torch.int16 and out.bits == 16
    mult, shift, offset, _ = m.consts()
    assert torch.equal(out.q, ops.ilayernorm32(x.q, mult, shift, offset, 16))


def test_qlayernorm_eval_before_calibration_raises() -> None:
    with pytest.raises(NotCalibratedError):
        QLayerNorm(8).eval()(quant(torch.randn(2, 8), 16))
