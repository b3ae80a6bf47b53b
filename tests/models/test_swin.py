"""Tests for ``ivit.models.swin``: timm Swin Transformers converted to integers and frozen.

Covers the issue's acceptance check (Swin-T, random init, quantize + calibrate + forward/backward on
a batch of 2), the window geometry against timm (partition/reverse, relative position index,
shifted-window mask, per-stage windows and shifts, padding), masked positions getting exactly zero
probability, the relative-position bias added exactly at the score scale, bit-exactness of the
engine (both backends, any batch size, a sample independent of its batch), the ``.ivit`` round trip
and ``ivit inspect``, input validation, unsupported variants and a QAT step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models import swin_transformer as tswin
from torch import Tensor

import ivit
from conftest import make_qmodel, random_pixels, sqnr_db
from ivit import Engine, Program, ops
from ivit.backends.compiled import build as compiled_build
from ivit.cli import main as cli_main
from ivit.ir.opset import expand_window_mask
from ivit.models.base import QModel
from ivit.models.swin import (
    QSwin,
    QSwinBlock,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from ivit.nn import NotCalibratedError
from ivit.training.trainer import FloatWrapper

#: case -> (model name, create_model kwargs).  Together they run every geometry timm has: plain and
#: shifted windows, windows cut to a small stage, padding after the roll, odd patch merging,
#: always_partition (window larger than the stage), non-square images and windows, no qkv bias.
CASES: dict[str, tuple[str, dict]] = {
    "swin_test": ("swin_test", {}),
    "swin_digits": ("swin_digits", {}),
    "pad": ("swin_test", dict(img_size=24)),
    "odd_merge": ("swin_test", dict(img_size=20, window_size=2, depths=(2, 2, 2), num_heads=(2, 2, 2))),
    "always_partition": ("swin_test", dict(img_size=16, window_size=3, always_partition=True)),
    "rect_noqkvbias": ("swin_test", dict(img_size=(16, 24), patch_size=2, window_size=(4, 3), qkv_bias=False,
                                         num_classes=7)),
}
#: SQNR (dB) of integer vs float logits, measured rel8 / shiftmax8: 33.1 / 33.3, 33.0 / 32.4, 34.3 / 34.4,
#: 32.5 / 33.8, 33.8 / 33.9, 32.4 / 32.3; asserted with margin in both modes.
SQNR_MIN = {"swin_test": 29.0, "swin_digits": 28.0, "pad": 30.0, "odd_merge": 28.0, "always_partition": 29.0,
            "rect_noqkvbias": 28.0}
PROBS = ["rel8", "shiftmax8"]


def blocks(q: QSwin) -> list[QSwinBlock]:
    return [b for st in q.stages for b in st.blocks]


def timm_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [b for st in model.layers for b in st.blocks]


class Case:
    """A float timm Swin, its calibrated integer twin (in one ``probs`` mode), the frozen program and 5 test
    images with their per-sample logits."""

    def __init__(self, key: str, probs: str) -> None:
        name, kw = CASES[key]
        self.key = key
        self.probs = probs
        torch.manual_seed(0)
        self.float_model = ivit.create_model(name, **kw).eval()
        self.model: QSwin = ivit.quantize(self.float_model, ivit.QuantConfig(probs=probs))
        ivit.calibrate(self.model, [random_pixels(4, self.model.img_size, seed=i) for i in range(2)])
        self.program: Program = ivit.freeze(self.model)
        self.x = random_pixels(5, self.model.img_size, seed=100)
        self.per_sample = torch.cat([self.model.logits(self.x[i:i + 1]) for i in range(5)])


_CASES: dict[tuple[str, str], Case] = {}


@pytest.fixture(scope="module", params=[(k, p) for k in sorted(CASES) for p in PROBS], ids=lambda p: "-".join(p))
def case(request: pytest.FixtureRequest) -> Case:
    if request.param not in _CASES:
        _CASES.clear()  # one model alive at a time
        _CASES[request.param] = Case(*request.param)
    return _CASES[request.param]


@pytest.fixture(scope="module")
def small() -> QSwin:
    """Calibrated ``swin_test`` (32x32, patch 4, 8x8 grid, window 4: plain + shifted windows, then 4x4)."""
    return make_qmodel("swin_test")


@pytest.fixture(scope="module", params=PROBS)
def small_by_probs(request: pytest.FixtureRequest) -> QSwin:
    """``small`` in each ``probs`` mode."""
    return make_qmodel("swin_test", config=ivit.QuantConfig(probs=request.param))


# ---------------------------------------------------------------------------------------------
# The acceptance check: Swin-T (random init) quantize + calibrate + forward/backward, batch 2


def test_swin_tiny_quantize_calibrate_forward_backward_batch2() -> None:
    torch.manual_seed(0)
    model = ivit.create_model("swin_tiny_patch4_window7_224")
    q = ivit.quantize(model)
    assert isinstance(q, QSwin) and q.family == "swin" and q.meta["name"] == "swin_tiny_patch4_window7_224"
    assert q.meta["depths"] == [2, 2, 6, 2] and q.meta["num_heads"] == [3, 6, 12, 24]
    assert q.meta["embed_dims"] == [96, 192, 384, 768] and q.meta["window_sizes"] == [[7, 7]] * 4
    geo = [(b.resolution, b.window, b.shift) for b in blocks(q)]
    assert geo[:2] == [((56, 56), (7, 7), (0, 0)), ((56, 56), (7, 7), (3, 3))]
    assert geo[-2:] == [((7, 7), (7, 7), (0, 0)), ((7, 7), (7, 7), (0, 0))]  # 7x7 stage: one window, no shift
    x = random_pixels(2, 224)
    ivit.calibrate(q, [x])
    ivit.freeze_ranges(q)
    q.train()
    out = q(x)
    assert out.q.dtype == torch.int32 and out.q.shape == (2, 1000)
    assert torch.equal(out.value, out.q.to(torch.float32) * out.scale.to(torch.float32))
    loss = F.cross_entropy(out.value, torch.tensor([3, 7]))
    assert bool(torch.isfinite(loss))
    loss.backward()
    watched = {
        "patch_embed.weight": q.patch_embed.weight,
        "patch_norm.weight": q.patch_norm.weight,
        "stages.0.blocks.1.rel_bias_table": q.stages[0].blocks[1].rel_bias_table,
        "stages.0.blocks.1.attn.qkv.weight": q.stages[0].blocks[1].attn.qkv.weight,
        "stages.1.downsample.reduction.weight": q.stages[1].downsample.reduction.weight,
        "stages.3.blocks.1.mlp.fc2.weight": q.stages[3].blocks[1].mlp.fc2.weight,
        "norm.weight": q.norm.weight,
        "head.weight": q.head.weight,
    }
    for name, p in watched.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name


# ---------------------------------------------------------------------------------------------
# Conversion: weights, geometry and float agreement


def check_converted(model: torch.nn.Module, q: QSwin) -> None:
    assert torch.equal(q.patch_embed.weight, model.patch_embed.proj.weight.reshape(q.embed_dim, -1))
    assert torch.equal(q.patch_norm.weight, model.patch_embed.norm.weight)
    for qst, st in zip(q.stages, model.layers, strict=True):
        if qst.downsample is not None:
            assert torch.equal(qst.downsample.norm.weight, st.downsample.norm.weight)
            assert torch.equal(qst.downsample.reduction.weight, st.downsample.reduction.weight)
    for qb, b in zip(blocks(q), timm_blocks(model), strict=True):
        assert (qb.resolution, qb.window, qb.shift) == (b.input_resolution, b.window_size, b.shift_size)
        assert torch.equal(qb.rel_bias_table, b.attn.relative_position_bias_table)
        assert torch.equal(qb.rel_index, b.attn.relative_position_index)
        assert (qb.attn_mask is None) == (b.attn_mask is None)
        if b.attn_mask is not None:
            assert torch.equal(qb.attn_mask, b.attn_mask != 0)
        assert torch.equal(qb.attn.qkv.weight, b.attn.qkv.weight)
        assert torch.equal(qb.attn.proj.weight, b.attn.proj.weight)
        assert torch.equal(qb.norm1.weight, b.norm1.weight) and torch.equal(qb.mlp.fc2.bias, b.mlp.fc2.bias)
    assert torch.equal(q.norm.weight, model.norm.weight)
    assert torch.equal(q.head.weight, model.head.fc.weight) and not q.head.per_channel


def test_conversion_and_float_agreement(case: Case) -> None:
    check_converted(case.float_model, case.model)
    with torch.no_grad():
        f = FloatWrapper(case.float_model).eval()(case.x)
    i = case.model.eval()(case.x).dequantize()
    assert sqnr_db(f, i) > SQNR_MIN[case.key]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_small_patch4_window7_224", "swin_base_patch4_window7_224"])
def test_larger_swins_convert_and_run_bitexact(name: str) -> None:
    torch.manual_seed(0)
    model = ivit.create_model(name)
    q = ivit.quantize(model)
    check_converted(model, q)
    ivit.calibrate(q, [random_pixels(2, 224)])
    x = random_pixels(2, 224, seed=5)
    assert torch.equal(Engine(ivit.freeze(q), backend="cpu")(x), q.logits(x))


def test_geometry_matches_timm() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-100, 100, (2, 6, 9, 5), generator=g)
    win = window_partition(t, (2, 3))
    theirs = tswin.window_partition(t, (2, 3))
    assert torch.equal(win, theirs.reshape(-1, 6, 5))
    assert torch.equal(window_reverse(win, (2, 3), 6, 9), t)
    for ws in ((7, 7), (4, 3), (2, 2)):
        assert torch.equal(relative_position_index(ws), tswin.get_relative_position_index(*ws))
    # shifted-window masks: every configuration the CASES use, against timm's blocks
    for res, ws, shift in (((8, 8), (4, 4), (2, 2)), ((8, 12), (4, 3), (2, 1)), ((6, 6), (4, 4), (2, 2)),
                           ((2, 2), (3, 3), (1, 1)), ((56, 56), (7, 7), (3, 3))):
        blk = tswin.SwinTransformerBlock(8, res, num_heads=2, window_size=ws, shift_size=shift,
                                         always_partition=True)
        padded = (-(-res[0] // ws[0]) * ws[0], -(-res[1] // ws[1]) * ws[1])
        assert torch.equal(shifted_window_mask(padded, ws, shift), blk.attn_mask != 0)
    assert shifted_window_mask((8, 8), (4, 4), (0, 0)) is None


# ---------------------------------------------------------------------------------------------
# Exactness: masked probabilities, relative-position bias, engine vs model


def _capture(module: torch.nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda m, args, out: store.append((args, out)))


def test_shifted_window_mask_gives_exactly_zero_probability(small_by_probs: QSwin) -> None:
    small = small_by_probs
    blk = small.stages[0].blocks[1]
    assert blk.shift == (2, 2) and blk.attn_mask is not None and bool(blk.attn_mask.any())
    seen: list = []
    h = _capture(blk.attn.softmax, seen)
    try:
        x = random_pixels(3, 32, seed=4)
        small.logits(x)
    finally:
        h.remove()
    (scores, values, mask), ctx = seen[0]
    nw = blk.attn_mask.shape[0]
    assert torch.equal(mask, blk.attn_mask)
    full = expand_window_mask(mask, scores.q.shape)  # (B*nW, H, N, N): the mask repeats per image
    assert torch.equal(full[:nw, 0], blk.attn_mask) and torch.equal(full[nw:2 * nw, 1], blk.attn_mask)
    # the engine's probability node of that block: exactly zero at the masked positions
    prog = ivit.freeze(small)
    p_op = "shiftmax_rel" if small.config.probs.value == "rel8" else "shiftmax"
    idx = [i for i, nd in enumerate(prog.nodes) if nd.op == p_op and "mask" in nd.consts]
    assert len(idx) == 1  # only the one shifted block of swin_test
    outs: dict[int, Tensor] = {}
    Engine(prog, backend="reference").run(x, trace=lambda i, o: outs.__setitem__(i, o) if i in idx else None)
    probs = outs[idx[0]]
    assert probs.shape == full.shape
    assert int(probs[full].abs().max()) == 0  # masked: exactly zero
    assert bool((probs.to(torch.int64).sum(-1) > 0).all())  # every row still has probability mass
    # without the mask the same scores do give those positions a probability: the mask is what zeroes them
    x0, n, _ = blk.attn.softmax.consts(scores.scale, scores.q.shape[-1])
    unmasked = ops.shiftmax_rel(scores.q, x0) if p_op == "shiftmax_rel" else ops.shiftmax(scores.q, x0, n, 8)
    assert int(unmasked[full].max()) > 0
    # the model's context is the masked probabilities times v: the same integers the program computes
    masked = ops.shiftmax_rel(scores.q, x0, full) if p_op == "shiftmax_rel" else ops.shiftmax(scores.q, x0, n, 8,
                                                                                               full)
    assert torch.equal(masked, probs)
    acc = ops.int_matmul(masked, values.q)
    assert torch.equal(ctx.q, ops.attn_normalize(acc, masked) if p_op == "shiftmax_rel" else acc)


def test_relative_position_bias_added_exactly_at_score_scale(small: QSwin) -> None:
    blk = small.stages[0].blocks[0]
    attn = blk.attn
    got: dict[str, list] = {"q": [], "k": [], "s": []}
    hs = [_capture(attn.q_act, got["q"]), _capture(attn.k_act, got["k"]), _capture(attn.score_act, got["s"])]
    try:
        small.logits(random_pixels(2, 32, seed=6))
    finally:
        for h in hs:
            h.remove()
    q8, k8 = got["q"][0][1], got["k"][0][1]
    scores_in = got["s"][0][0][0]  # the int32 scores fed to the score requantizer
    s_scale = attn.score_scale(q8.scale, k8.scale)
    assert torch.equal(scores_in.scale, s_scale)
    bias = blk.rel_bias().detach()
    bias_int = attn.rel_bias_int(bias, s_scale)
    want = torch.round(bias.double() / s_scale).to(torch.int32)
    assert bias_int.dtype == torch.int32 and bias_int.shape == (2, 16, 16) and torch.equal(bias_int, want)
    assert int(bias_int.abs().max()) > 0  # the bias is not rounded away
    b_, n_, c_ = q8.q.shape
    heads = attn.num_heads
    qh = q8.q.reshape(b_, n_, heads, c_ // heads).permute(0, 2, 1, 3)  # (B*nW, H, N, d)
    kh = k8.q.reshape(b_, n_, heads, c_ // heads).permute(0, 2, 1, 3)
    qk = ops.int_matmul(qh, kh, transpose_b=True)
    assert torch.equal(scores_in.q, (qk.to(torch.int64) + bias_int).to(torch.int32))
    # the program carries the very same constant, in the block's first add_const node
    prog = ivit.freeze(small)
    node = next(nd for nd in prog.nodes if nd.op == "add_const")
    assert node.consts["const"].startswith("stages.0.blocks.0.attn.")
    assert torch.equal(prog.consts[node.consts["const"]], bias_int)
    # the bias saturates instead of wrapping: |scores| < 2**30 keeps scores + bias inside int32
    huge = attn.rel_bias_int(torch.full((2, 16, 16), 1e30), s_scale)
    assert int(huge.max()) == 2**30


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
@pytest.mark.parametrize("backend", ["reference", "cpu", "compiled"])
def test_engine_bitexact_vs_model(case: Case, backend: str, batch: int) -> None:
    if backend == "compiled" and not compiled_build.available():
        pytest.skip("no C compiler with OpenMP")
    engine = Engine(case.program, backend=backend)
    x = case.x[:batch]
    out = engine(x)
    assert out.dtype == torch.int32 and out.shape == (batch, case.model.num_classes)
    assert torch.equal(out, case.model.logits(x))
    assert torch.equal(out, case.per_sample[:batch])  # each sample alone through the model


def test_sample_result_independent_of_batch(case: Case) -> None:
    engine = Engine(case.program, backend="cpu")
    other = random_pixels(3, case.model.img_size, seed=999)
    mixed = torch.cat([other[:2], case.x[3:4], other[2:]])
    assert torch.equal(engine(mixed)[2], case.per_sample[3])
    assert torch.equal(case.model.logits(mixed)[2], case.per_sample[3])


def test_program_uses_generic_data_movement_ops(case: Case) -> None:
    ops_used = {n.op for n in case.program.nodes}
    assert {"reshape", "permute", "mean", "add_const"} <= ops_used
    assert ("roll" in ops_used) == any(b.shift != (0, 0) for b in blocks(case.model))
    has_pad = any(b.pad != (0, 0) for b in blocks(case.model)) or any(
        st.downsample is not None and st.downsample.pad != (0, 0) for st in case.model.stages)
    assert ("pad" in ops_used) == has_pad
    p_op = "shiftmax_rel" if case.probs == "rel8" else "shiftmax"
    n_masks = sum(1 for n in case.program.nodes if n.op == p_op and "mask" in n.consts)
    assert n_masks == sum(1 for b in blocks(case.model) if b.attn_mask is not None)
    assert all(not t.is_floating_point() for t in case.program.consts.values())


# ---------------------------------------------------------------------------------------------
# File round trip and inspect


def test_freeze_save_load(tmp_path: Path, small: QSwin) -> None:
    path = tmp_path / "swin.ivit"
    ivit.freeze(small, name="swin_test").save(path)
    engine = ivit.load(path)
    x = random_pixels(3, 32, seed=8)
    assert torch.equal(engine(x), small.logits(x))
    assert engine.meta["family"] == "swin" and engine.meta["arch"]["depths"] == [2, 2]


def test_inspect(tmp_path: Path, small: QSwin, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "swin.ivit"
    ivit.freeze(small, name="swin_test").save(path)
    capsys.readouterr()
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "integer-only: yes" in out and "(swin)" in out and "shiftmax_rel" in out


# ---------------------------------------------------------------------------------------------
# Bad inputs, unsupported variants, calibration state


@pytest.mark.parametrize("bad", [
    lambda: random_pixels(2, 16),  # wrong size
    lambda: random_pixels(2, (32, 40)),
    lambda: random_pixels(2, 32).to(torch.float32),
    lambda: random_pixels(2, 32, chans=1),
    lambda: random_pixels(2, 32)[:0],
])
def test_bad_inputs_raise_ivit_error(small: QSwin, bad) -> None:  # noqa: ANN001
    engine = Engine(ivit.freeze(small))
    x = bad()
    for fn in (small, engine):
        with pytest.raises(ivit.IvitError) as e, torch.no_grad():
            fn(x)
        assert "\n" not in str(e.value)


SMALL = dict(img_size=16, patch_size=4, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(2, 2),
             num_classes=10)


@pytest.mark.parametrize("kw,match", [
    (dict(global_pool="max"), "avg"),
    (dict(num_classes=0), "classifier"),
    (dict(strict_img_size=False), "dynamic"),
    (dict(head_dim=4), "head_dim"),
    (dict(norm_layer=torch.nn.RMSNorm), "LayerNorm"),
])
def test_unsupported_swin_variants_raise(kw: dict, match: str) -> None:
    model = tswin.SwinTransformer(**{**SMALL, **kw})
    with pytest.raises(ivit.IvitError, match=match):
        ivit.quantize(model)


def test_resized_timm_model_is_rejected_not_misconverted() -> None:
    model = tswin.SwinTransformer(**SMALL)
    model.layers[0].blocks[0].shift_size = (1, 1)  # geometry no longer what the hyper-parameters give
    with pytest.raises(ivit.IvitError, match="geometry"):
        ivit.quantize(model)


def test_uncalibrated_model_raises() -> None:
    q = ivit.quantize(ivit.create_model("swin_test")).eval()
    with pytest.raises(NotCalibratedError):
        q(random_pixels(1, 32))
    with pytest.raises(ivit.IvitError, match="calibrat"):
        ivit.freeze(q)


# ---------------------------------------------------------------------------------------------
# QAT


def test_qat_step_changes_weights_and_stays_bitexact() -> None:
    q: QModel = make_qmodel("swin_test", seed=3)
    ivit.freeze_ranges(q)
    x = random_pixels(8, 32, seed=3)
    y = torch.arange(8) % 10
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    opt = torch.optim.AdamW(q.parameters(), lr=1e-3)
    q.train()
    out = q(x)
    assert torch.equal(out.value, out.q.to(torch.float32) * out.scale.to(torch.float32))  # STE forward = integers
    assert torch.equal(out.q, q.eval().logits(x))  # the same integers in training and in eval
    loss = F.cross_entropy(out.value, y)
    assert bool(torch.isfinite(loss))
    opt.zero_grad()
    loss.backward()
    for n, p in q.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), n
        assert float(p.grad.abs().sum()) > 0, n
    opt.step()
    changed = {n for n, p in q.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before)
    q.eval()
    x2 = random_pixels(3, 32, seed=12)
    assert torch.equal(Engine(ivit.freeze(q), backend="cpu")(x2), q.logits(x2))


def test_state_dict_round_trip_rebuilds_the_same_integers(small: QSwin) -> None:
    """Masks and index tables are rebuilt from the hyper-parameters; the state dict carries the rest."""
    torch.manual_seed(123)  # a different random init, overwritten by the state dict
    fresh = ivit.quantize(ivit.create_model("swin_test"))
    fresh.load_state_dict(small.state_dict())
    fresh.eval()
    x = random_pixels(3, 32, seed=21)
    assert torch.equal(fresh.logits(x), small.logits(x))


# ---------------------------------------------------------------------------------------------
# The demo, end to end through the CLI (short schedule; the full one is ``ivit demo --model swin``)


def test_demo_swin_cli_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    out = tmp_path / "demo"
    assert cli_main(["demo", "--model", "swin", "--out", str(out), "--epochs", "1", "--qat-epochs", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "swin_digits" and report["n_test"] == 360
    assert report["bitexact"] is True and report["integer_only"] is True
    assert Path(report["ivit_file"]).is_file()
    assert "bit-exact" in capsys.readouterr().out
