"""Tests for ``ivit.nn.embed``: patch tokens + class token + position embedding on the residual scale."""

from __future__ import annotations

import torch

from conftest import exact_value, quant, sqnr_db
from ivit import ops
from ivit.nn import QEmbed


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
    mult, shift, prefix, pos, s = m.consts(acc.scale)
    assert prefix.shape == (1, 8) and pos.shape == (4, 8)
    assert torch.equal(out.q[0, 0].to(torch.int32), prefix[0])
    assert torch.equal(out.q, ops.embed_tokens(acc.q, mult, shift, prefix, pos, 16))


def test_qembed_without_prefix_or_prefix_position() -> None:
    torch.manual_seed(1)
    no_prefix = QEmbed(dim=8, num_patches=4, num_prefix=0, bits=12).train()
    acc = quant(torch.randn(2, 4, 8), 32)
    out = no_prefix(acc)
    assert out.q.shape == (2, 4, 8) and int(out.q.abs().max()) <= ops.qmax(12)
    assert no_prefix.consts(acc.scale)[2] is None
    no_pos = QEmbed(dim=8, num_patches=4, num_prefix=1, pos_on_prefix=False).train()
    with torch.no_grad():
        no_pos.cls_token.fill_(0.25)
    assert no_pos.pos_embed.shape == (1, 4, 8)
    out = no_pos(acc)
    _, _, prefix, _, s = no_pos.consts(acc.scale)
    assert torch.equal(prefix, torch.round(torch.full((1, 8), 0.25, dtype=torch.float64) / s).to(torch.int32))
