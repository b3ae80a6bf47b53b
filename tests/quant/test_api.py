"""Tests for ``ivit.quant.api`` and ``ivit.models.factory``: the public workflow create_model -> quantize ->
calibrate -> freeze -> load (in both ``QuantConfig.probs`` modes), observer semantics over calibration,
timm checkpoints, and import hygiene."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import ivit
from conftest import random_pixels
from ivit.backends import get_backend
from ivit.models.base import QModel
from ivit.nn import RangeObserver


def observer_state(q: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in q.state_dict().items()
        if k.rsplit(".", 1)[-1] in ("running_min", "running_max")
    }


# ---------------------------------------------------------------------------------------------
# create_model / list_models


def test_public_names_exist() -> None:
    for name in ivit.__all__:
        assert hasattr(ivit, name), name


def test_list_models_has_supported_names() -> None:
    names = ivit.list_models()
    for n in (
        "deit_tiny_patch16_224",
        "deit_small_patch16_224",
        "deit_base_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_test",
        "vit_digits",
    ):
        assert n in names
    assert names == sorted(names)


def test_create_custom_model_and_overrides() -> None:
    m = ivit.create_model("vit_digits")
    assert isinstance(m, VisionTransformer)
    assert m.embed_dim == 64 and len(m.blocks) == 4 and m.head.out_features == 10
    assert tuple(m.patch_embed.img_size) == (16, 16) and m.pretrained_cfg["architecture"] == "vit_digits"
    m2 = ivit.create_model("vit_test", num_classes=3, depth=1)
    assert m2.head.out_features == 3 and len(m2.blocks) == 1


def test_create_timm_model_num_classes() -> None:
    m = ivit.create_model("deit_tiny_patch16_224", num_classes=5)
    assert m.head.out_features == 5 and m.embed_dim == 192


@pytest.mark.parametrize("name", ["resnet_but_not_really", "deit_tiny", "", "vit_test "])
def test_unknown_model_name(name: str) -> None:
    with pytest.raises(ivit.IvitError, match="unknown model") as e:
        ivit.create_model(name)
    assert "\n" not in str(e.value)


def test_custom_model_has_no_pretrained_weights() -> None:
    with pytest.raises(ivit.IvitError, match="pretrained"):
        ivit.create_model("vit_test", pretrained=True)


# ---------------------------------------------------------------------------------------------
# quantize / calibrate / freeze_ranges


def test_quantize_rejects_other_models() -> None:
    with pytest.raises(ivit.IvitError, match="cannot quantize"):
        ivit.quantize(nn.Sequential(nn.Linear(4, 4)))


def test_quantize_is_idempotent_and_names_the_model() -> None:
    q = ivit.quantize(ivit.create_model("vit_test"))
    assert isinstance(q, QModel) and q.meta["name"] == "vit_test"
    assert ivit.quantize(q) is q


def test_calibrate_sets_ranges_and_leaves_eval_mode() -> None:
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model("vit_test"))
    out = ivit.calibrate(q, [random_pixels(4, 32)])
    assert out is q and not q.training
    obs = [m for m in q.modules() if isinstance(m, RangeObserver)]
    assert obs and all(bool(o.initialized) for o in obs)
    assert all(p.grad is None for p in q.parameters())  # no graph, no gradients


def test_calibrate_accepts_labelled_batches_and_max_batches() -> None:
    batches = [random_pixels(4, 32, seed=i) for i in range(3)]
    torch.manual_seed(0)
    a = ivit.quantize(ivit.create_model("vit_test"))
    torch.manual_seed(0)
    b = ivit.quantize(ivit.create_model("vit_test"))
    ivit.calibrate(a, batches[:2])
    ivit.calibrate(b, ((x, torch.zeros(4, dtype=torch.long)) for x in batches), max_batches=2)
    sa, sb = observer_state(a), observer_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "batches,match",
    [([], "no calibration data"), ([[1, 2, 3]], "uint8 tensors"), (["images"], "uint8 tensors")],
)
def test_calibrate_bad_data(batches: list, match: str) -> None:
    q = ivit.quantize(ivit.create_model("vit_test"))
    with pytest.raises(ivit.IvitError, match=match):
        ivit.calibrate(q, batches)


def test_calibration_ema_over_batches() -> None:
    """The embedding observer (first in the network, so its input does not depend on other ranges)
    follows ``r = 0.95 r + 0.05 batch`` from the second batch on."""
    xa, xb = random_pixels(4, 32, seed=1), random_pixels(4, 32, seed=2) // 2

    def fresh() -> QModel:
        torch.manual_seed(0)
        return ivit.quantize(ivit.create_model("vit_test"))

    qa, qb, qab = fresh(), fresh(), fresh()
    ivit.calibrate(qa, [xa])
    ivit.calibrate(qb, [xb])
    ivit.calibrate(qab, [xa, xb])
    for attr in ("running_min", "running_max"):
        ra, rb, rab = (float(getattr(q.embed.observer, attr)) for q in (qa, qb, qab))
        assert ra != rb
        assert rab == pytest.approx(0.95 * ra + 0.05 * rb, rel=1e-12)


def test_freeze_ranges_stops_and_restarts_observers() -> None:
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model("vit_test"))
    ivit.calibrate(q, [random_pixels(4, 32, seed=0)])
    ivit.freeze_ranges(q)
    before = observer_state(q)
    ivit.calibrate(q, [random_pixels(4, 32, seed=5) // 3])  # train-mode passes with frozen observers
    q.train()
    q(random_pixels(2, 32, seed=6))  # a QAT-style forward too
    after = observer_state(q)
    assert all(torch.equal(before[k], after[k]) for k in before)
    ivit.freeze_ranges(q, frozen=False)
    ivit.calibrate(q, [random_pixels(4, 32, seed=5) // 3])
    again = observer_state(q)
    assert any(not torch.equal(before[k], again[k]) for k in before)


def test_eval_forward_never_updates_observers() -> None:
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model("vit_test"))
    ivit.calibrate(q, [random_pixels(4, 32)])
    before = observer_state(q)
    q.logits(random_pixels(4, 32, seed=9) // 4)
    assert all(torch.equal(before[k], v) for k, v in observer_state(q).items())


# ---------------------------------------------------------------------------------------------
# Whole workflow


@pytest.mark.parametrize("probs,layernorm", [("rel8", "int32"), ("shiftmax8", "int64")])
def test_workflow_end_to_end(tmp_path: Path, probs: str, layernorm: str) -> None:
    model = ivit.create_model("vit_test")
    qmodel = ivit.quantize(model, ivit.QuantConfig(probs=probs, layernorm=layernorm))
    ivit.calibrate(qmodel, [random_pixels(8, 32, seed=i) for i in range(2)])
    program = ivit.freeze(qmodel)
    ops_used = {n.op for n in program.nodes}
    assert ("shiftmax_rel" in ops_used) == (probs == "rel8") and ("shiftmax" in ops_used) == (probs == "shiftmax8")
    assert ("layernorm32" in ops_used) == (layernorm == "int32")
    program.save(tmp_path / "model.ivit")
    engine = ivit.load(tmp_path / "model.ivit")
    assert engine.backend == get_backend("fast").name
    x = random_pixels(4, 32, seed=20)
    logits = engine(x)
    assert logits.dtype == torch.int32 and torch.equal(logits, qmodel.logits(x))
    assert ivit.verify_integer_only(engine).ok


def test_quantize_keeps_the_config_and_moves_to_the_model_device() -> None:
    cfg = ivit.QuantConfig(probs="shiftmax8", residual_bits=12)
    q = ivit.quantize(ivit.create_model("vit_test"), cfg)
    assert q.config is cfg and q.blocks[0].attn.softmax.probs == ivit.Probs.SHIFTMAX8
    assert next(q.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_safetensors_and_pth(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = ivit.create_model("vit_test")
    sd = src.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd, "epoch": 3}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        torch.manual_seed(2)
        m = ivit.create_model("vit_test", checkpoint=str(tmp_path / f))
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), (f, k)


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(ivit.IvitError, match="not found"):
        ivit.create_model("vit_test", checkpoint=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 50)
    with pytest.raises(ivit.IvitError, match="cannot read"):
        ivit.create_model("vit_test", checkpoint=str(tmp_path / "junk.safetensors"))
    other = ivit.create_model("vit_test", embed_dim=16).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ivit.IvitError, match="does not match"):
        ivit.create_model("vit_test", checkpoint=str(tmp_path / "other.safetensors"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ivit.IvitError, match="state dict"):
        ivit.create_model("vit_test", checkpoint=str(tmp_path / "list.pth"))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_checkpoint_pickle_payload_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pth")
    (tmp_path / "evil2.pt").write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=2))
    for f in ("evil.pth", "evil2.pt"):
        with pytest.raises(ivit.IvitError, match="cannot read"):
            ivit.create_model("vit_test", checkpoint=str(tmp_path / f))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Import hygiene


def test_import_does_not_initialize_cuda() -> None:
    code = (
        "import ivit, ivit.cli, ivit.backends, ivit.native.kernels, ivit.workflows.demo, ivit.training\n"
        "import torch\n"
        "ivit.QuantConfig(); ivit.list_models()\n"
        "print(torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
