"""Tests for ``ivit.nn.softmax``: ``QShiftmax(s, v, mask)`` returns the attention context ``softmax(s) @ v`` in
integers, in both ``QuantConfig.probs`` modes: ``rel8`` (``shiftmax_rel`` -> u8 x s8 GEMM -> ``attn_normalize``,
int32 at ``S_v * 2**-16``) and ``shiftmax8`` (the I-ViT Shiftmax -> GEMM, int32 at ``S_v * 2**-7``)."""

from __future__ import annotations

import pytest
import torch

from conftest import exact_value, quant
from ivit import Probs, ops
from ivit.nn import QShiftmax
from ivit.qtensor import QTensor


def scores_and_values(n: int = 9, d: int = 8, std: float = 3.0, seed: int = 0, track: bool = True
                      ) -> tuple[QTensor, QTensor]:
    g = torch.Generator().manual_seed(seed)
    s = quant(torch.randn(2, 2, n, n, generator=g) * std, 16, track=track)
    v = quant(torch.randn(2, 2, n, d, generator=g), 8, track=track)
    return s, v


def reference_context(m: QShiftmax, s: QTensor, v: QTensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The module's integers from the reference ops, written out."""
    x0, n, _ = m.consts(s.scale, s.q.shape[-1])
    full = None if mask is None else mask.expand(s.q.shape)
    if m.probs == Probs.REL8:
        p = ops.shiftmax_rel(s.q, x0, full)
        return ops.attn_normalize(ops.int_matmul(p, v.q), p)
    return ops.int_matmul(ops.shiftmax(s.q, x0, n, 8, full), v.q)


@pytest.mark.parametrize("probs", list(Probs))
def test_qshiftmax_context_is_exact_and_tracks_float(probs: Probs) -> None:
    s, v = scores_and_values()
    m = QShiftmax(8, 15, probs)
    out = m(s, v)
    assert out.q.dtype == torch.int32 and out.q.shape == (2, 2, 9, 8) and out.bits == 32
    assert torch.equal(out.q, reference_context(m, s, v))
    frac = ops.CTX_FRAC_BITS if probs == Probs.REL8 else 7
    assert torch.equal(out.scale, v.scale * 2.0**-frac)
    assert torch.equal(out.value, exact_value(out))
    ref = torch.softmax(s.dequantize(), dim=-1) @ v.dequantize()
    err = float((out.dequantize() - ref).abs().max() / ref.abs().max())
    assert err < 0.05  # measured 0.013 (rel8), 0.016 (shiftmax8)
    out.value.sum().backward()
    assert bool((s.value.grad != 0).any()) and bool((v.value.grad != 0).any())


@pytest.mark.parametrize("probs", list(Probs))
def test_qshiftmax_consts(probs: Probs) -> None:
    m = QShiftmax(8, 15, probs)
    scale = torch.tensor(7.6e-4, dtype=torch.float64)
    x0, n, p_scale = m.consts(scale, 197)
    assert x0 == ops.shift_exp_x0(7.6e-4)
    if probs == Probs.REL8:
        assert float(p_scale) == 1 / 255
    else:
        assert n == ops.choose_shiftmax_n(x0, 197, 15) and float(p_scale) == 2.0**-7


@pytest.mark.parametrize("probs", list(Probs))
def test_qshiftmax_mask_gives_the_unmasked_subproblem(probs: Probs) -> None:
    """Masking keys 4.. (a (1, N, N) window mask) gives exactly the context of the first 4 keys alone."""
    s, v = scores_and_values(track=False)
    m = QShiftmax(8, 15, probs)
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[..., 4:] = True
    masked = m(s, v, mask)
    assert torch.equal(masked.q, reference_context(m, s, v, mask))
    # the same x0 / n as the full problem (they depend on the scale and, for shiftmax8, on N)
    x0, n, _ = m.consts(s.scale, 9)
    sub_s, sub_v = s.q[..., :4], v.q[..., :4, :]
    if probs == Probs.REL8:
        p = ops.shiftmax_rel(sub_s, x0)
        want = ops.attn_normalize(ops.int_matmul(p, sub_v), p)
    else:
        want = ops.int_matmul(ops.shiftmax(sub_s, x0, n, 8), sub_v)
    assert torch.equal(masked.q, want)


@pytest.mark.parametrize("probs", list(Probs))
def test_qshiftmax_flat_long_rows(probs: Probs) -> None:
    """197 tokens of flat scores (std 0.5): rel8 keeps the context (error < 5%), shiftmax8 loses most of it."""
    s, v = scores_and_values(n=197, d=16, std=0.5, seed=3, track=False)
    out = QShiftmax(8, 15, probs)(s, v)
    ref = torch.softmax(s.dequantize().double(), dim=-1) @ v.dequantize().double()
    err = float((out.dequantize().double() - ref).norm() / ref.norm())
    if probs == Probs.REL8:
        assert err < 0.05  # measured 0.020
    else:
        assert err > 0.2  # measured 0.46


@pytest.mark.parametrize("probs", [Probs.REL8, Probs.SHIFTMAX8])
def test_qshiftmax_fine_score_scale(probs: Probs) -> None:
    """24-bit scores (QuantConfig allows score_bits up to 24) of small amplitude still give the context."""
    g = torch.Generator().manual_seed(0)
    s = quant(torch.randn(2, 2, 9, 9, generator=g) * 1e-3, 24)
    v = quant(torch.randn(2, 2, 9, 8, generator=g), 8)
    out = QShiftmax(8, 15, probs)(s, v)
    ref = torch.softmax(s.dequantize(), -1) @ v.dequantize()
    assert float((out.dequantize() - ref).norm() / ref.norm()) < 0.05
