"""Tests for ``ivit.quant.ptq``: per-layer clipping ranges, ShiftExp shifts and LayerNorm channel balancing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import ivit
from conftest import make_qmodel, random_pixels
from ivit import data
from ivit.errors import IvitError
from ivit.nn import QShiftGELU, QShiftmax, RangeObserver
from ivit.quant.ptq import balance_layernorms, ptq, reset_observers, search
from ivit.training.trainer import CHECKPOINT_NAME, FloatWrapper, TrainConfig, Trainer


def _batches(n: int = 2, size: int = 32) -> list[torch.Tensor]:
    imgs = data.digits("train", 32).images
    return [imgs[i * size:(i + 1) * size] for i in range(n)]


def _float_model(outlier_scale: float = 1.0) -> torch.nn.Module:
    """``vit_test`` with a random LayerNorm affine (and optional outlier channels moved into the next linear layer,
    which keeps the float function)."""
    torch.manual_seed(0)
    m = ivit.create_model("vit_test")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in m.blocks:  # random LayerNorm affine, plus optional outlier channels (float function kept)
            for norm, lin in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
                norm.weight.mul_(1 + 0.3 * torch.randn(norm.weight.shape, generator=g))
                norm.bias.add_(0.1 * torch.randn(norm.bias.shape, generator=g))
                if outlier_scale > 1:
                    norm.weight[:2] *= outlier_scale
                    norm.bias[:2] *= outlier_scale
                    lin.weight[:, :2] /= outlier_scale
    return m


def _rel_err(qmodel: ivit.models.base.QModel, fmodel: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = FloatWrapper(fmodel).eval()(x)
        out = qmodel.eval()(x).dequantize()
    return float(((out - ref) ** 2).mean() / (ref**2).mean())


def test_search_is_deterministic_applied_and_bit_exact() -> None:
    batches = _batches()
    runs = []
    for _ in range(2):
        q = ivit.quantize(_float_model())
        report = ptq(q, batches, search_batches=1)
        runs.append((q, report))
    (q, report), (q2, report2) = runs
    assert report.to_json() == report2.to_json()
    p1, p2 = ivit.freeze(q), ivit.freeze(q2)
    assert all(torch.equal(p1.consts[k], p2.consts[k]) for k in p1.consts)
    kinds = {c.kind for c in report.choices}
    assert kinds == {"balance", "clip", "n"}
    modules = dict(q.named_modules())
    for c in report.choices:
        assert c.mse <= c.mse_default  # never worse than the default on the search data
        m = modules[c.module]
        if c.kind == "clip":
            assert float(m.observer.clip) == (0.0 if c.choice == c.default else pytest.approx(c.choice))
        elif c.kind == "n":
            assert isinstance(m, (QShiftmax, QShiftGELU)) and m.n_max == c.choice
    assert any(c.choice != c.default for c in report.choices if c.kind == "clip")
    x = data.digits("test", 32).images[:16]
    assert torch.equal(ivit.Engine(p1)(x), q.logits(x))  # the frozen program carries every choice
    assert report.summary().startswith("PTQ search:")


def test_balancing_keeps_the_float_function() -> None:
    q = ivit.quantize(_float_model(outlier_scale=32.0))
    ivit.calibrate(q, _batches())
    blk = q.blocks[0]
    x = torch.randn(5, 32)

    def f() -> torch.Tensor:
        return F.linear(F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps), blk.attn.qkv.weight)

    before = f().detach()
    report = balance_layernorms(q, _batches(1))
    assert [c.module for c in report.choices] == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                                  "blocks.1.norm2"]
    assert all(c.choice > 0 for c in report.choices)  # the outliers are moved into the weights
    assert float(blk.norm1.weight.detach().abs().max()) < 8.0  # was ~32 on the outlier channels
    torch.testing.assert_close(f().detach(), before, rtol=1e-4, atol=1e-4)


def test_search_rescues_outlier_model_that_fixed_ptq_breaks() -> None:
    fmodel = _float_model(outlier_scale=64.0)
    x = data.digits("test", 32).images[:64]
    fixed = ivit.quantize(fmodel)
    ptq(fixed, _batches(), search_params=False)
    searched = ivit.quantize(fmodel)
    ptq(searched, _batches(), search_batches=1)
    no_balance = ivit.quantize(fmodel)
    ptq(no_balance, _batches(), search_batches=1, balance=False)
    e_fixed, e_search, e_clip = (_rel_err(q, fmodel, x) for q in (fixed, searched, no_balance))
    assert e_search < e_fixed / 5, (e_fixed, e_search)
    assert e_clip <= e_fixed


def test_search_choices_survive_a_training_checkpoint(tmp_path: Path) -> None:
    q = ivit.quantize(_float_model())
    ptq(q, _batches(), search_batches=1)
    ds = Subset(data.digits("train", 32), range(64))
    shift_mods = [m for m in q.modules() if isinstance(m, (QShiftmax, QShiftGELU))]
    shift_mods[0].n_max = 12  # a non-default shift must travel too
    Trainer(q, ds, TrainConfig(epochs=1, batch_size=32), out_dir=tmp_path, progress=False).save()
    fresh = ivit.quantize(_float_model())
    t = Trainer(fresh, ds, TrainConfig(epochs=1, batch_size=32), progress=False)
    t.load(tmp_path / CHECKPOINT_NAME)
    pa, pb = ivit.freeze(q), ivit.freeze(fresh)
    assert pa.graph_json() == pb.graph_json()
    assert all(torch.equal(pa.consts[k], pb.consts[k]) for k in pa.consts)


def test_reset_observers_and_bad_input() -> None:
    q = ivit.quantize(_float_model())
    ivit.calibrate(q, _batches(1))
    q2 = copy.deepcopy(q)
    reset_observers(q2)
    assert not any(bool(m.initialized) for m in q2.modules() if isinstance(m, RangeObserver))
    with pytest.raises(IvitError, match="quantized model"):
        search(_float_model(), _batches(1))
    with pytest.raises(IvitError, match="no calibration data"):
        search(q, [])


def test_search_replays_finished_blocks_with_identical_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The segment cache changes the cost, never the result: same program, fewer block forwards."""
    from ivit.models.vit import QBlock
    from ivit.quant import ptq as ptq_mod

    calls = [0]
    forward = QBlock.forward

    def counting(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls[0] += 1
        return forward(self, *a, **k)

    monkeypatch.setattr(QBlock, "forward", counting)
    xs = [random_pixels(8, 32, seed=s) for s in range(2)]
    programs, counts = [], []
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(ptq_mod, "_segments", lambda m: [])
        q = make_qmodel("vit_test", depth=3)
        calls[0] = 0
        ptq_mod.search(q, xs)
        counts.append(calls[0])
        programs.append(ivit.freeze(q, self_check=False))
    a, b = programs
    assert a.graph_json() == b.graph_json()
    assert all(torch.equal(a.consts[k], b.consts[k]) for k in a.consts)
    assert counts[0] < 0.7 * counts[1], counts
