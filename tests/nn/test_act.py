"""Tests for ``ivit.nn.act``: ``QAct`` requantizes to the observed scale with ``ops.requantize``."""

from __future__ import annotations

import pytest
import torch

from conftest import exact_value, quant, sqnr_db
from ivit import ops
from ivit.nn import NotCalibratedError, QAct
from ivit.qtensor import QTensor


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


@pytest.mark.parametrize("bits", [8, 16])
def test_qact_per_channel_input_and_ste(bits: int) -> None:
    """A per-channel int32 accumulator (a GEMM output) becomes a per-tensor ``bits``-wide tensor; the carrier's
    forward value is the integer result and the gradient passes straight through."""
    g = torch.Generator().manual_seed(2)
    acc = torch.randint(-(2**20), 2**20, (3, 7, 12), generator=g, dtype=torch.int32)
    scale = torch.rand(12, generator=g, dtype=torch.float64) * 1e-4 + 1e-5
    value = (acc.to(torch.float32) * scale.to(torch.float32)).requires_grad_(True)
    x = QTensor(acc, scale, 32, value)
    m = QAct(bits).train()
    out = m(x)
    assert out.per_tensor and out.q.dtype == ops.storage_dtype(bits)
    mult, shift, _ = m.consts(x.scale)
    assert mult.shape == (12,) and torch.equal(out.q, ops.requantize(acc, mult, shift, bits))
    assert torch.equal(out.value, exact_value(out))
    out.value.sum().backward()
    assert torch.allclose(value.grad, torch.ones_like(value))


def test_qact_eval_before_calibration_raises() -> None:
    m = QAct(8).eval()
    x = quant(torch.randn(3, 4), 16)
    with pytest.raises(NotCalibratedError):
        m(x)
