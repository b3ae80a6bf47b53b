"""Tests for ``ivit.nn.mlp``: fc1 -> int8 -> ShiftGELU -> int8 -> fc2, in integers, tracking the float MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import exact_value, quant, sqnr_db
from ivit import QuantConfig, ops
from ivit.nn import QMlp


def test_qmlp_chain_is_exact_and_tracks_float() -> None:
    torch.manual_seed(0)
    m = QMlp(16, 32, QuantConfig()).train()
    x = quant(torch.randn(2, 5, 16), 8, track=True)
    out = m(x)
    assert out.q.dtype == torch.int32 and out.q.shape == (2, 5, 16)
    assert torch.equal(out.value, exact_value(out))
    m.eval()
    # the chain written out with the reference ops and the modules' constants
    h = m.fc1(x)
    mult, shift, _ = m.act_in.consts(h.scale)
    a = ops.requantize(h.q, mult, shift, 8)
    x0, n, s_g = m.gelu.consts(m.act_in.observer.scale())
    g = ops.shiftgelu(a, x0, n, 16)
    mult, shift, _ = m.act_out.consts(s_g)
    w2, sw2 = m.fc2.int_weight()
    want = ops.int_linear(ops.requantize(g, mult, shift, 8), w2, m.fc2.int_bias(sw2 * m.act_out.observer.scale()))
    assert torch.equal(m(x).q, want)
    with torch.no_grad():
        ref = F.linear(F.gelu(F.linear(x.dequantize(), m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
    assert sqnr_db(ref, out.dequantize()) > 28  # measured 33.7 dB
    out.value.sum().backward()
    assert all(p.grad is not None and bool((p.grad != 0).any()) for p in m.parameters())
