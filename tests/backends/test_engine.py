"""Tests for ``ivit.backends.engine``: bit-exactness against the PyTorch integer model on every backend, the
loaded-file interface, old ``.ivit`` files, input checks and the integer-only proof on real programs.

The headline property: the engine's int32 logits equal the quantized model's eval logits bit for bit, for every
supported family and size, in both attention-probability modes (``QuantConfig.probs``) and both I-LayerNorm
impls, at any batch size, on the reference and the cpu backend, and a sample's logits do not depend on the batch
it is in.  Families: ViT/DeiT (custom sizes, LayerScale, non-square input, DeiT-T at 224) and Swin (shifted
windows with masks, patch merging, mean pooling).  Files written by ivit 0.1 (format 1) still load and give
exactly the logits stored with them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

import ivit
from conftest import make_qmodel, random_pixels
from ivit import Engine, Program, verify_integer_only
from ivit.backends import base as backend_base
from ivit.backends import get_backend
from ivit.backends.compiled import build as compiled_build
from ivit.ir import OPSET
from ivit.models.base import QModel

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BACKENDS = ["reference", "cpu", *(["compiled"] if compiled_build.available() else [])]
FAST_HERE = get_backend("fast").name  # compiled where a C compiler is, else cpu

#: model -> (model name, create_model kwargs, calibration batches, calibration batch size, largest test batch)
MODELS: dict[str, tuple[str, dict, int, int, int]] = {
    "vit_test": ("vit_test", {}, 2, 4, 7),
    "vit_digits": ("vit_digits", {}, 2, 4, 7),
    "vit_layerscale": ("vit_test", dict(init_values=0.1, depth=3), 2, 4, 7),
    "vit_rect": ("vit_test", dict(img_size=(32, 48), patch_size=16, embed_dim=48, num_heads=3, depth=1,
                                  num_classes=7, qkv_bias=False), 2, 4, 7),
    "deit_tiny": ("deit_tiny_patch16_224", {}, 1, 2, 2),  # 224x224: reference int64 matmuls are slow
    "swin_test": ("swin_test", {}, 2, 4, 7),  # plain + shifted (masked) windows, patch merging
    "swin_digits": ("swin_digits", {}, 2, 4, 7),
}
#: (probs, layernorm) modes: the default and the legacy one for every model, the two mixed ones where cheap
MODES = [("rel8", "int32"), ("shiftmax8", "int64")]
MIXED = [("rel8", "int64"), ("shiftmax8", "int32")]


def _case_params() -> list:
    params = []
    for key in MODELS:
        for mode in MODES + (MIXED if key in ("vit_test", "swin_test") else []):
            marks = [pytest.mark.slow] if key == "deit_tiny" and mode != MODES[0] else []
            params.append(pytest.param((key, *mode), id=f"{key}-{mode[0]}-{mode[1]}", marks=marks))
    return params


class Case:
    """A calibrated model, its frozen program, engines on both backends, test images and per-sample logits."""

    def __init__(self, key: str, probs: str, layernorm: str) -> None:
        name, kw, n_calib, calib_batch, self.n = MODELS[key]
        cfg = ivit.QuantConfig(probs=probs, layernorm=layernorm)
        self.model: QModel = make_qmodel(name, calib_batches=n_calib, batch=calib_batch, config=cfg, **kw)
        self.program: Program = ivit.freeze(self.model)
        self.engines = {b: Engine(self.program, backend=b) for b in BACKENDS}
        self.x = random_pixels(self.n, self.model.img_size, seed=100)
        # one sample at a time: the reference for "a sample's result does not depend on its batch"
        self.per_sample = torch.cat([self.model.logits(self.x[i:i + 1]) for i in range(self.n)])


_CASES: dict[tuple[str, str, str], Case] = {}


@pytest.fixture(scope="module", params=_case_params())
def case(request: pytest.FixtureRequest) -> Case:
    if request.param not in _CASES:
        _CASES.clear()  # keep one model alive at a time
        _CASES[request.param] = Case(*request.param)
    return _CASES[request.param]


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_bitexact_vs_model(case: Case, backend: str, batch: int) -> None:
    """Batch sizes 1, 2, 3, 5, 7 (1 and 2 for the 224px model): engine == batched model == each sample alone."""
    if batch > case.n:
        pytest.skip(f"batch {case.n} is the largest batch of this model")
    engine = case.engines[backend]
    x = case.x[:batch]
    out = engine(x)
    assert out.dtype == torch.int32 and out.shape == (batch, case.model.num_classes)
    assert torch.equal(out, case.model.logits(x))  # batched model eval
    assert torch.equal(out, case.per_sample[:batch])  # each sample alone through the model
    if batch == case.n:  # and each sample alone through the engine
        for i in range(batch):
            assert torch.equal(engine(x[i:i + 1])[0], out[i])


def test_sample_result_independent_of_batch_companions(case: Case) -> None:
    other = random_pixels(3, case.model.img_size, seed=999)
    mixed = torch.cat([other[:2], case.x[1:2], other[2:]])
    for backend in BACKENDS:
        assert torch.equal(case.engines[backend](mixed)[2], case.per_sample[1]), backend


def test_program_ops_follow_the_config(case: Case) -> None:
    cfg = ivit.QuantConfig.from_json(case.program.meta["config"])
    ops_used = {n.op for n in case.program.nodes}
    rel = cfg.probs.value == "rel8"
    assert ("shiftmax_rel" in ops_used) == rel and ("attn_normalize" in ops_used) == rel
    assert ("shiftmax" in ops_used) == (not rel)
    assert ("layernorm32" in ops_used) == (cfg.layernorm.value == "int32")
    assert ("layernorm" in ops_used) == (cfg.layernorm.value == "int64")


def test_engine_executes_the_backends_passes(case: Case) -> None:
    """``.executed`` is the program after the backend's passes: unchanged for the reference, fused for cpu."""
    ref, cpu = case.engines["reference"], case.engines["cpu"]
    assert ref.backend == "reference" and cpu.backend == "cpu"
    assert ref.executed.nodes == case.program.nodes
    fused = [n for n in cpu.executed.nodes if OPSET[n.op].fused]
    n_attn = sum(1 for n in case.program.nodes if n.op in ("shiftmax", "shiftmax_rel"))
    assert sum(1 for n in fused if n.op == "attention") == n_attn
    assert {n.attrs["probs"] for n in fused if n.op == "attention"} == {
        1 if "shiftmax_rel" in {n.op for n in case.program.nodes} else 0}
    assert sum(1 for n in fused if n.op == "requantize_table") == sum(
        1 for n in case.program.nodes if n.op == "shiftgelu")
    for eng in (ref, cpu):
        assert len(eng.steps) == len(eng.executed.nodes)
        assert eng.info.output.describe() == f"int32(B, {case.model.num_classes})"


def test_dequantize_and_logit_scale(case: Case) -> None:
    engine = case.engines["cpu"]
    x = case.x[:1]
    logits = engine(x)
    deq = engine(x, dequantize=True)
    assert deq.dtype == torch.float32
    scale = float(case.model.eval()(x).scale)
    assert case.program.meta["logit_scale"] == pytest.approx(scale, rel=1e-12)
    assert torch.equal(deq, logits.to(torch.float32) * float(case.program.meta["logit_scale"]))
    assert torch.equal(deq.argmax(-1), logits.argmax(-1))


def test_verify_integer_only_ok_on_real_program(case: Case) -> None:
    if case.model.img_size[0] >= 224:
        pytest.skip("dispatch-mode recording of a 224px model is slow; the small models cover the check")
    check = verify_integer_only(case.engines["reference"])
    assert check.ok, check.summary()
    assert check.static_problems == [] and check.float_ops == {}
    assert set(check.value_dtypes) <= {"uint8", "int8", "int16", "int32"}
    assert sum(check.value_dtypes.values()) == len(case.program.nodes)
    assert sum(check.aten_ops.values()) > len(case.program.nodes)
    assert check.summary().startswith("integer-only: yes")


# ---------------------------------------------------------------------------------------------
# Random models and configs: cpu == reference == model


@pytest.mark.parametrize(
    "seed,cfg",
    [
        (1, dict(per_channel_weights=False)),
        (2, dict(residual_bits=12, score_bits=12)),
        (3, dict(gelu_sigmoid_bits=8, shiftmax_n_max=10, shiftgelu_n_max=12, probs="shiftmax8")),
        (4, dict(residual_bits=9, score_bits=20, momentum=0.5)),
        (5, dict(residual_bits=16, score_bits=24, probs="shiftmax8", layernorm="int64")),
        (6, dict(score_bits=9, layernorm="int64")),
    ],
)
def test_random_models_and_configs(seed: int, cfg: dict) -> None:
    torch.manual_seed(seed)
    model = ivit.create_model("vit_test", depth=1, num_heads=4)
    with torch.no_grad():  # spread the weights so that ranges differ a lot between layers
        for p in model.parameters():
            p.mul_(torch.empty(()).uniform_(0.5, 20.0))
    q = ivit.quantize(model, ivit.QuantConfig(**cfg))
    ivit.calibrate(q, [random_pixels(4, 32, seed=seed + i) for i in range(3)])
    prog = ivit.freeze(q)
    x = random_pixels(5, 32, seed=seed + 50)
    want = q.logits(x)
    for backend in BACKENDS:
        assert torch.equal(Engine(prog, backend=backend)(x), want), backend


# ---------------------------------------------------------------------------------------------
# Files of format 1 (ivit 0.1)


@pytest.fixture(scope="module")
def v1_expected() -> dict[str, Tensor]:
    return load_file(str(FIXTURES / "v1_expected.safetensors"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["vit_test", "swin_test"])
def test_format1_files_give_their_stored_logits(v1_expected: dict[str, Tensor], name: str, backend: str) -> None:
    path = FIXTURES / f"{name}_v1.ivit"
    engine = ivit.load(path, backend=backend)
    prog = engine.program
    assert prog.format_version == 1 and prog.meta["ivit_version"] == "0.1.0"
    ops_used = {n.op for n in prog.nodes}
    assert {"layernorm", "shiftmax"} <= ops_used  # the legacy numerics
    assert not ops_used & {"layernorm32", "shiftmax_rel", "attn_normalize"}
    pixels, logits = v1_expected[f"{name}.pixels"], v1_expected[f"{name}.logits"]
    assert torch.equal(engine(pixels), logits)
    for i in range(pixels.shape[0]):  # and sample by sample
        assert torch.equal(engine(pixels[i:i + 1])[0], logits[i])
    if backend == "cpu":  # the fused legacy attention (probs = 0) runs on old files too
        assert {n.attrs["probs"] for n in engine.executed.nodes if n.op == "attention"} == {0}


def test_format1_files_resave_as_format2_with_the_same_integers(v1_expected: dict[str, Tensor],
                                                                tmp_path: Path) -> None:
    for name in ("vit_test", "swin_test"):
        prog = ivit.load_program(FIXTURES / f"{name}_v1.ivit")
        again = ivit.load_program(prog.save(tmp_path / f"{name}.ivit"))
        assert again.format_version == 2 and again.nodes == prog.nodes
        assert torch.equal(Engine(again)(v1_expected[f"{name}.pixels"]), v1_expected[f"{name}.logits"])


# ---------------------------------------------------------------------------------------------
# The integer-only proof must be able to fail


@pytest.fixture(scope="module")
def small() -> tuple[QModel, Program]:
    q = make_qmodel("vit_test", depth=1)
    return q, ivit.freeze(q)


def _with_const(prog: Program, key: str, value: Tensor) -> Program:
    return Program(prog.nodes, {**prog.consts, key: value}, prog.input, prog.output, prog.meta)


def test_verify_flags_unused_float_constant(small: tuple[QModel, Program]) -> None:
    _, prog = small
    engine = Engine(prog, backend="reference")
    engine.program = _with_const(prog, "logit_scale", torch.tensor(0.01))
    check = verify_integer_only(engine)
    assert not check.ok
    assert any("logit_scale" in p for p in check.static_problems)
    assert check.summary().startswith("integer-only: NO")


def test_verify_flags_float_constant_used_by_a_kernel(monkeypatch: pytest.MonkeyPatch,
                                                      small: tuple[QModel, Program]) -> None:
    """A float constant that slipped past the engine's validation is still caught (statically and at run time)."""
    _, prog = small
    key = prog.nodes[-1].consts["bias"]  # the head's bias, read by int_linear with .to(int64)
    bad = _with_const(prog, key, prog.consts[key].to(torch.float32))
    monkeypatch.setattr(ivit.backends.engine, "validate", lambda p, limits=None: ivit.ir.validate(prog, limits))
    check = verify_integer_only(Engine(bad, backend="reference"))
    assert not check.ok
    assert any(key in p for p in check.static_problems)
    assert check.float_ops  # the run touched the float tensor too


def _float_gelu(x: Tensor, x0: int, n: int, k_out: int) -> Tensor:  # integer in, integer out, float inside
    return torch.round(F.gelu(x.to(torch.float32)) * 2 ** (k_out - 1)).to(torch.int32)


def test_verify_flags_kernel_swapped_for_float_op(monkeypatch: pytest.MonkeyPatch,
                                                  small: tuple[QModel, Program]) -> None:
    _, prog = small
    monkeypatch.setitem(OPSET, "shiftgelu", dataclasses.replace(OPSET["shiftgelu"], reference=_float_gelu))
    check = verify_integer_only(Engine(prog, backend="reference"))
    assert check.static_problems == []
    assert set(check.value_dtypes) <= {"uint8", "int8", "int16", "int32"}
    assert not check.ok
    assert "gelu" in check.float_ops
    assert "float aten op gelu" in check.summary()


def test_verify_flags_float_valued_node(monkeypatch: pytest.MonkeyPatch, small: tuple[QModel, Program]) -> None:
    _, prog = small
    ref = OPSET["linear"].reference
    n_cls = prog.meta["num_classes"]

    def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = ref(x, weight, bias)
        return out.to(torch.float64) if weight.shape[0] == n_cls else out  # the head returns floats

    monkeypatch.setitem(OPSET, "linear", dataclasses.replace(OPSET["linear"], reference=linear))
    check = verify_integer_only(Engine(prog, backend="reference"))
    assert not check.ok and not check.aten_ok
    assert check.value_dtypes.get("float64") == 1


def test_engine_rejects_float_program(small: tuple[QModel, Program]) -> None:
    _, prog = small
    key = next(iter(prog.consts))
    with pytest.raises(ivit.IvitError, match="non-integer"):
        Engine(_with_const(prog, key, prog.consts[key].to(torch.float32)))


# ---------------------------------------------------------------------------------------------
# Loading, backends, inputs


def test_load_returns_callable_engine(tmp_path: Path, small: tuple[QModel, Program]) -> None:
    q, prog = small
    path = prog.save(tmp_path / "m.ivit")
    engine = ivit.load(path)
    assert isinstance(engine, Engine) and engine.backend == FAST_HERE
    x = random_pixels(3, 32, seed=8)
    logits = engine(x)
    assert logits.dtype == torch.int32 and torch.equal(logits, q.logits(x))
    assert engine.num_classes == 10 and engine.meta["family"] == "vit"
    assert torch.equal(ivit.load(str(path), backend="reference")(x), logits)
    assert torch.allclose(engine(x, dequantize=True), q.eval()(x).dequantize(), rtol=1e-6, atol=0)


def test_backend_selection(monkeypatch: pytest.MonkeyPatch, small: tuple[QModel, Program]) -> None:
    _, prog = small
    with pytest.raises(ivit.IvitError, match="unknown backend"):
        Engine(prog, backend="tensorrt")
    assert Engine(prog).backend == Engine(prog, backend="fast").backend == FAST_HERE  # the default is "fast"
    no_cc = dataclasses.replace(backend_base.BACKENDS["compiled"], available=lambda: False)
    monkeypatch.setitem(backend_base.BACKENDS, "compiled", no_cc)  # no C compiler: fast is cpu
    assert Engine(prog).backend == "cpu"
    monkeypatch.undo()
    monkeypatch.setenv("IVIT_BACKEND", "reference")
    assert Engine(prog).backend == "reference"
    assert Engine(prog, backend="cpu").backend == "cpu"
    monkeypatch.setenv("IVIT_BACKEND", "nope")
    with pytest.raises(ivit.IvitError, match="unknown backend"):
        Engine(prog)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: random_pixels(2, 32).to(torch.float32),
        lambda: torch.full((1, 3, 32, 32), float("nan")),
        lambda: random_pixels(2, 32).to(torch.int32),
        lambda: random_pixels(2, 16),
        lambda: random_pixels(2, 32, chans=1),
        lambda: random_pixels(1, 32)[0],
        lambda: random_pixels(2, 32)[:0],
        lambda: random_pixels(2, 32).numpy(),
    ],
    ids=["float32", "nan", "int32", "size", "channels", "3d", "empty", "numpy"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_rejects_bad_pixels(small: tuple[QModel, Program], backend: str, bad) -> None:  # noqa: ANN001
    _, prog = small
    with pytest.raises(ivit.IvitError) as e:
        Engine(prog, backend=backend)(bad())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_accepts_noncontiguous_pixels(small: tuple[QModel, Program], backend: str) -> None:
    q, prog = small
    x = random_pixels(4, 32, seed=3)
    view = x.permute(0, 1, 3, 2)  # a valid (B, 3, 32, 32) uint8 view with other strides
    assert torch.equal(Engine(prog, backend=backend)(view), q.logits(view.contiguous()))


def test_cpu_backend_refuses_other_devices(small: tuple[QModel, Program]) -> None:
    _, prog = small
    with pytest.raises(ivit.IvitError, match="runs on cpu"):
        Engine(prog, backend="cpu", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_engine_on_cuda_matches_cpu(small: tuple[QModel, Program]) -> None:
    _, prog = small
    x = random_pixels(33, 32, seed=5)
    cpu = Engine(prog, backend="reference")(x)
    gpu = Engine(prog, backend="reference", device="cuda")(x.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
