"""Tests for ``ivit.freeze``: a calibrated model becomes an integer ``Program`` that computes exactly
what the model computes in eval mode, with nothing float inside and the model left untouched.

(Family x size x batch x backend bit-exactness is in ``test_engine.py``.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ivit
from conftest import make_qmodel, random_pixels
from ivit.engine import Engine
from ivit.freeze import Builder, emit
from ivit.models.base import QModel
from ivit.program import OPS, check_program


def test_program_structure_of_vit_test(tiny_vit: QModel) -> None:
    prog = ivit.freeze(tiny_vit)
    check_program(prog)
    depth = tiny_vit.meta["depth"]
    counts = Counter(n.op for n in prog.nodes)
    assert set(counts) <= set(OPS)
    assert counts["patchify"] == 1 and counts["embed"] == 1 and counts["select"] == 1
    assert counts["linear"] == 1 + 4 * depth + 1  # patch embed, (qkv, proj, fc1, fc2) per block, head
    assert counts["shiftmax"] == depth and counts["shiftgelu"] == depth
    assert counts["layernorm"] == 2 * depth + 1 and counts["add_requantize"] == 2 * depth
    assert counts["matmul"] == 2 * depth
    assert prog.nodes[0].inputs == ("pixels",) and prog.input == "pixels"
    assert prog.output == prog.nodes[-1].output
    assert all(t.dtype in (torch.int8, torch.int32, torch.bool) for t in prog.consts.values())
    # int8 weights in the symmetric range, int32 everything else
    for node in prog.nodes:
        if node.op == "linear":
            w = prog.consts[node.consts["weight"]]
            assert w.dtype == torch.int8 and int(w.min()) >= -127
            assert prog.consts[node.consts["bias"]].dtype == torch.int32


def test_meta(tiny_vit: QModel) -> None:
    prog = ivit.freeze(tiny_vit, name="my_model", extra_meta={"dataset": "none"})
    m = prog.meta
    assert m["family"] == "vit" and m["model"] == "my_model" and m["dataset"] == "none"
    assert m["input_shape"] == [3, 32, 32] and m["num_classes"] == 10
    assert ivit.QuantConfig.from_json(m["config"]) == tiny_vit.config
    assert m["ivit_version"] == ivit.__version__
    assert m["arch"]["depth"] == 2 and m["arch"]["embed_dim"] == 32
    x = random_pixels(2, 32, seed=1)
    assert m["logit_scale"] == pytest.approx(float(tiny_vit.eval()(x).scale), rel=1e-12)
    assert ivit.freeze(tiny_vit).meta["model"] == "vit_test"  # default: the timm architecture name


def test_freeze_is_deterministic_and_leaves_model_untouched(tiny_vit: QModel) -> None:
    tiny_vit.eval()
    state = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    a = ivit.freeze(tiny_vit)
    b = ivit.freeze(tiny_vit)
    assert a.graph_json() == b.graph_json()
    assert all(torch.equal(a.consts[k], b.consts[k]) for k in a.consts)
    assert not tiny_vit.training
    for k, v in tiny_vit.state_dict().items():
        assert torch.equal(v, state[k]), k
    # constants are copies: editing the program does not reach the model
    key = next(k for k in a.consts if k.endswith("head.weight"))
    a.consts[key].zero_()
    assert ivit.freeze(tiny_vit).consts[key].abs().sum() > 0


def test_freeze_in_train_mode_equals_eval(tiny_vit: QModel) -> None:
    """Freezing reads constants only; the training flag does not change the program."""
    tiny_vit.train()
    try:
        prog = ivit.freeze(tiny_vit)
        assert tiny_vit.training
    finally:
        tiny_vit.eval()
    x = random_pixels(3, 32, seed=2)
    assert torch.equal(Engine(prog, backend="reference")(x), tiny_vit.logits(x))


def test_freeze_uncalibrated_raises_ivit_error() -> None:
    q = ivit.quantize(ivit.create_model("vit_test"))
    with pytest.raises(ivit.IvitError, match="calibrat"):
        ivit.freeze(q)


def test_freeze_rejects_non_qmodel() -> None:
    with pytest.raises(ivit.IvitError, match="quantized model"):
        ivit.freeze(ivit.create_model("vit_test"))  # the float model


def test_emit_unknown_module_raises(tiny_vit: QModel) -> None:
    with pytest.raises(ivit.IvitError, match="no freeze rule"):
        emit(Builder(tiny_vit), nn.ReLU(), None)


def test_builder_guards() -> None:
    b = Builder(nn.Identity())
    b.const("a", torch.tensor([1, 2]), torch.int8)
    with pytest.raises(RuntimeError, match="duplicate"):
        b.const("a", torch.tensor([1]), torch.int8)
    with pytest.raises(ValueError, match="does not fit"):
        b.const("big", torch.tensor([128]), torch.int8)
    with pytest.raises(ValueError, match="does not fit"):
        b.const("big32", torch.tensor([2**31]), torch.int32)
    assert b.consts["a"].dtype == torch.int8 and b.consts["a"].is_contiguous()


def test_qat_then_freeze_is_bitexact() -> None:
    """After QAT steps (weights and ranges moved), the program still equals the model."""
    q = make_qmodel("vit_test", seed=3, depth=1)
    x = random_pixels(8, 32, seed=4)
    y = torch.arange(8) % 10
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    q.train()
    before = ivit.freeze(q)
    for _ in range(3):
        loss = F.cross_entropy(q(x).value, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    after = ivit.freeze(q)
    changed = [k for k in after.consts if not torch.equal(after.consts[k], before.consts[k])]
    assert len(changed) > len(after.consts) // 2
    xt = random_pixels(5, 32, seed=5)
    assert torch.equal(Engine(after, backend="reference")(xt), q.logits(xt))
    assert torch.equal(Engine(after, backend="fast")(xt), q.logits(xt))


def test_per_tensor_weights_and_narrow_residual() -> None:
    cfg = ivit.QuantConfig(per_channel_weights=False, residual_bits=12)
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model("vit_test", depth=1), cfg)
    ivit.calibrate(q, [random_pixels(4, 32, seed=i) for i in range(2)])
    prog = ivit.freeze(q)
    for node in prog.nodes:
        if node.op in ("add_requantize", "embed"):
            assert node.attrs["bits"] == 12
    x = random_pixels(3, 32, seed=6)
    assert torch.equal(Engine(prog, backend="reference")(x), q.logits(x))
