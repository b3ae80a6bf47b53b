"""Tests for ``ivit.nn.residual``: ``QResidualAdd`` requantizes both branches to the observed output scale."""

from __future__ import annotations

import pytest
import torch

from conftest import exact_value, quant, sqnr_db
from ivit import ops
from ivit.nn import QResidualAdd


@pytest.mark.parametrize("bits", [16, 12, 9])
def test_qresidual_add(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    a = quant(torch.randn(2, 5, 16, generator=g), 16, track=True)
    b = quant(torch.randn(2, 5, 16, generator=g) * 0.1, 32, track=True)
    m = QResidualAdd(bits).train()
    out = m(a, b)
    assert out.q.dtype == torch.int16 and out.bits == bits
    assert int(out.q.abs().max()) <= ops.qmax(bits)
    ma, sa, mb, sb, _ = m.consts(a.scale, b.scale)
    assert torch.equal(out.q, ops.add_requantize(a.q, b.q, ma, sa, mb, sb, bits))
    assert torch.equal(out.value, exact_value(out))
    if bits == 16:
        assert sqnr_db(a.dequantize() + b.dequantize(), out.dequantize()) > 70  # 16-bit: measured 87 dB
    (out.value * torch.arange(16.0)).sum().backward()
    assert bool((a.value.grad != 0).any()) and bool((b.value.grad != 0).any())


def test_qresidual_observes_the_sum() -> None:
    a = quant(torch.tensor([1.0, -2.0]), 16)
    b = quant(torch.tensor([3.0, -1.0]), 16)
    m = QResidualAdd(16).train()
    m(a, b)
    assert float(m.observer.running_max) == pytest.approx(4.0, rel=1e-4)
    assert float(m.observer.running_min) == pytest.approx(-3.0, rel=1e-4)
