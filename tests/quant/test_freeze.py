"""Tests for ``ivit.quant.freeze``: a calibrated model becomes an integer ``Program`` (its own forward, traced)
that computes exactly what the model computes in eval mode, with nothing float inside and the model left
untouched.

(Family x size x batch x backend bit-exactness is in ``tests/backends/test_engine.py``.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ivit
from conftest import make_qmodel, random_pixels
from ivit import Engine
from ivit.ir import OPSET, validate
from ivit.ir.trace import Tracer, call
from ivit.models.base import QModel
from ivit.nn import QShiftGELU
from ivit.qtensor import QTensor

#: (probs, layernorm) -> (probability op, layernorm op)
MODES = {("rel8", "int32"): ("shiftmax_rel", "layernorm32"), ("shiftmax8", "int64"): ("shiftmax", "layernorm"),
         ("rel8", "int64"): ("shiftmax_rel", "layernorm"), ("shiftmax8", "int32"): ("shiftmax", "layernorm32")}


@pytest.mark.parametrize("probs,layernorm", sorted(MODES))
def test_program_structure_of_vit_test(probs: str, layernorm: str) -> None:
    q = make_qmodel("vit_test", config=ivit.QuantConfig(probs=probs, layernorm=layernorm))
    prog = ivit.freeze(q)
    validate(prog)
    depth = q.meta["depth"]
    counts = Counter(n.op for n in prog.nodes)
    assert set(counts) <= set(OPSET) and not any(OPSET[op].fused for op in counts)  # fusions are backend passes
    sm_op, ln_op = MODES[(probs, layernorm)]
    assert counts["patchify"] == 1 and counts["embed"] == 1 and counts["select"] == 1
    assert counts["linear"] == 1 + 4 * depth + 1  # patch embed, (qkv, proj, fc1, fc2) per block, head
    assert counts[sm_op] == depth and counts["shiftgelu"] == depth
    assert counts["attn_normalize"] == (depth if probs == "rel8" else 0)
    assert counts[ln_op] == 2 * depth + 1 and counts["add_requantize"] == 2 * depth
    assert counts["matmul"] == 2 * depth
    assert counts["layernorm" if ln_op == "layernorm32" else "layernorm32"] == 0
    assert counts["shiftmax" if sm_op == "shiftmax_rel" else "shiftmax_rel"] == 0
    assert prog.nodes[0].inputs == ("pixels",) and prog.input == "pixels"
    assert prog.output == prog.nodes[-1].output
    assert all(t.dtype in (torch.int8, torch.int32, torch.bool) for t in prog.consts.values())
    # int8 weights in the symmetric range, int32 everything else
    for node in prog.nodes:
        if node.op == "linear":
            w = prog.consts[node.consts["weight"]]
            assert w.dtype == torch.int8 and int(w.min()) >= -127
            assert prog.consts[node.consts["bias"]].dtype == torch.int32
    x = random_pixels(3, 32, seed=1)
    assert torch.equal(Engine(prog, backend="reference")(x), q.logits(x))


def test_constants_are_named_after_their_modules(tiny_vit: QModel) -> None:
    prog = ivit.freeze(tiny_vit)
    names = set(prog.consts)
    for key in ("head.weight", "head.bias", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "norm.mult",
                "embed.pos", "embed.prefix", "patch_embed.weight"):
        assert key in names, key
    assert all(not k.startswith("model.") for k in names)


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


class _UntracedGELU(QShiftGELU):
    """Computes its integers outside ``ivit.ir.trace.call``: the result has no program value."""

    def forward(self, x: QTensor) -> QTensor:
        out = super().forward(x)
        return QTensor(out.q.clone(), out.scale, out.bits, out.value, None)


class _EditedGELU(QShiftGELU):
    """Records its op, then changes the integers behind the program's back."""

    def forward(self, x: QTensor) -> QTensor:
        out = super().forward(x)
        return QTensor(out.q * 2, out.scale, out.bits, out.value, out.name)


@pytest.mark.parametrize("cls,match", [(_UntracedGELU, "outside the traced ops"), (_EditedGELU, "disagrees")])
def test_an_op_outside_the_trace_is_caught(tiny_vit: QModel, cls: type, match: str) -> None:
    """The program is the traced forward: integers computed outside ``call`` make freeze fail, never a wrong
    program (the untraced value has no name; an edited value fails the self-check against the model)."""
    q = make_qmodel("vit_test", depth=1)
    old = q.blocks[0].mlp.gelu
    new = cls(old.k_sig, old.n_max, old.quick)
    q.blocks[0].mlp.gelu = new
    with pytest.raises(RuntimeError, match=match):
        ivit.freeze(q)


def test_self_check_can_be_skipped(tiny_vit: QModel) -> None:
    a = ivit.freeze(tiny_vit, self_check=False)
    assert a.graph_json() == ivit.freeze(tiny_vit).graph_json()


def test_traced_constants_are_stored_in_the_op_set_dtypes() -> None:
    """Constants become the dtype the op set prescribes (checked to fit), get unique names and are copies."""
    x = QTensor(torch.zeros(2, 3, dtype=torch.int8), torch.ones((), dtype=torch.float64), 8, None, "pixels")
    w = torch.tensor([[1, -2, 3]], dtype=torch.int64)
    with Tracer(nn.Identity()) as t:
        call("linear", [x], {"weight": w, "bias": torch.tensor([5])})
        call("linear", [x], {"weight": w})
        with pytest.raises(ValueError, match="does not fit"):
            call("linear", [x], {"weight": torch.tensor([[128, 0, 0]])})
        with pytest.raises(ValueError, match="does not fit"):
            call("linear", [x], {"weight": w, "bias": torch.tensor([2**31])})
        with pytest.raises(TypeError, match="float"):
            call("linear", [x], {"weight": w.to(torch.float32)})
    assert list(t.consts) == ["model.weight", "model.bias", "model.weight_1"]
    assert t.consts["model.weight"].dtype == torch.int8 and t.consts["model.bias"].dtype == torch.int32
    assert all(c.is_contiguous() for c in t.consts.values())
    w[0, 0] = 100
    assert int(t.consts["model.weight"][0, 0]) == 1  # a copy
    assert [n.op for n in t.nodes] == ["linear", "linear"] and t.nodes[0].inputs == ("pixels",)
    assert "bias" not in t.nodes[1].consts  # an absent optional constant


@pytest.mark.parametrize("probs", ["rel8", "shiftmax8"])
def test_qat_then_freeze_is_bitexact(probs: str) -> None:
    """After QAT steps (weights and ranges moved), the program still equals the model."""
    q = make_qmodel("vit_test", seed=3, depth=1, config=ivit.QuantConfig(probs=probs))
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
    assert torch.equal(Engine(after, backend="cpu")(xt), q.logits(xt))


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


def test_freeze_with_24_bit_scores() -> None:
    """score_bits may be 9..24 (QuantConfig); every allowed config must freeze."""
    q = make_qmodel("vit_test", depth=1, config=ivit.QuantConfig(score_bits=24))
    prog = ivit.freeze(q)
    x = random_pixels(2, 32, seed=7)
    assert torch.equal(Engine(prog, backend="reference")(x), q.logits(x))


def test_freeze_with_24_bit_scores_legacy_probs() -> None:
    q = make_qmodel("vit_test", depth=1, config=ivit.QuantConfig(score_bits=24, probs="shiftmax8"))
    prog = ivit.freeze(q)
    x = random_pixels(2, 32, seed=7)
    assert torch.equal(Engine(prog, backend="cpu")(x), q.logits(x))
