"""Tests for ``ivit.nn.gelu``: ``QShiftGELU`` is ``ops.shiftgelu`` at ``x0 = floor(-1 / (1.702 S))`` with the
largest ``n`` that bounds its sum; the float surrogate is GELU (or QuickGELU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import exact_value, quant
from ivit import ops
from ivit.nn import QShiftGELU
from ivit.qtensor import QTensor


@pytest.mark.parametrize("quick", [False, True])
def test_qshiftgelu_approximates_gelu(quick: bool) -> None:
    x = quant(torch.linspace(-6, 6, 501), 8, track=True)
    m = QShiftGELU(16, 23, quick=quick)
    out = m(x)
    assert out.q.dtype == torch.int32
    assert torch.equal(out.value, exact_value(out))
    x0, n, s = m.consts(x.scale)
    assert x0 == ops.shift_exp_x0(1.702 * float(x.scale)) and n == ops.choose_shiftgelu_n(x0, 23)
    assert torch.equal(s, x.scale * 2.0**-15)
    assert torch.equal(out.q, ops.shiftgelu(x.q, x0, n, 16))
    xf = x.dequantize()
    ref = xf * torch.sigmoid(1.702 * xf) if quick else F.gelu(xf)
    assert (out.dequantize() - ref).abs().max() < 0.06  # x*sigmoid(1.702x) vs erf GELU: measured 0.036
    out.value.sum().backward()
    assert bool((x.value.grad != 0).any())


def test_qshiftgelu_rejects_wide_or_per_channel_input() -> None:
    m = QShiftGELU()
    with pytest.raises(ValueError, match="8-bit"):
        m(quant(torch.randn(4), 16))
    with pytest.raises(ValueError, match="8-bit"):
        m(QTensor(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3, dtype=torch.float64), 8))
