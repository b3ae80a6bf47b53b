"""Tests for ``ivit.engine``: bit-exactness against the PyTorch integer model, backends, the
integer-only proof and the loaded-file interface.

The headline property (issue 3): the engine's int32 logits equal the quantized model's eval logits
bit for bit, for every supported family and size, at any batch size, with every backend, and a
sample's logits do not depend on the batch it is in.  Families: ViT/DeiT (custom sizes, LayerScale,
non-square input, DeiT-T at 224) and Swin (custom sizes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import ivit
from conftest import make_qmodel, random_pixels
from ivit.api import CUSTOM_MODELS
from ivit.engine import REFERENCE_KERNELS, Engine, verify_integer_only
from ivit.kernels import fast_kernels
from ivit.models.base import QModel
from ivit.program import Program

#: case -> (model name, create_model kwargs, calibration batches, calibration batch size, largest test batch)
MODELS: dict[str, tuple[str, dict, int, int, int]] = {
    "vit_test": ("vit_test", {}, 2, 4, 7),
    "vit_digits": ("vit_digits", {}, 2, 4, 7),
    "vit_layerscale": ("vit_test", dict(init_values=0.1, depth=3), 2, 4, 7),
    "vit_rect": (
        "vit_test",
        dict(
            img_size=(32, 48),
            patch_size=16,
            embed_dim=48,
            num_heads=3,
            depth=1,
            num_classes=7,
            qkv_bias=False,
        ),
        2,
        4,
        7,
    ),
    "deit_tiny": ("deit_tiny_patch16_224", {}, 1, 2, 2),  # 224x224: int64 reference matmuls are slow
}
for _swin in ("swin_test", "swin_digits"):  # shifted windows with masks, patch merging, mean pooling
    if _swin in CUSTOM_MODELS:
        MODELS[_swin] = (_swin, {}, 2, 4, 7)


class Case:
    """A calibrated model, its frozen program, test images and the model's per-sample logits."""

    def __init__(self, key: str) -> None:
        name, kw, n_calib, calib_batch, self.n = MODELS[key]
        self.model: QModel = make_qmodel(name, calib_batches=n_calib, batch=calib_batch, **kw)
        self.program: Program = ivit.freeze(self.model)
        self.x = random_pixels(self.n, self.model.img_size, seed=100)
        # one sample at a time: the reference for "a sample's result does not depend on its batch"
        self.per_sample = torch.cat([self.model.logits(self.x[i : i + 1]) for i in range(self.n)])


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request: pytest.FixtureRequest) -> Case:
    if request.param not in _CASES:
        _CASES.clear()  # keep one model alive at a time
        _CASES[request.param] = Case(request.param)
    return _CASES[request.param]


@pytest.mark.parametrize("batch", [1, 2, "all"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_engine_bitexact_vs_model(case: Case, backend: str, batch: int | str) -> None:
    """Batch sizes 1, 2 and 7 (1 and 2 for the 224px model)."""
    if batch == "all" and case.n == 2:
        pytest.skip("batch 2 is the largest batch of this model")
    batch = case.n if batch == "all" else int(batch)
    engine = Engine(case.program, backend=backend)
    x = case.x[:batch]
    out = engine(x)
    assert out.dtype == torch.int32 and out.shape == (batch, case.model.num_classes)
    assert torch.equal(out, case.model.logits(x))  # batched model eval
    assert torch.equal(out, case.per_sample[:batch])  # each sample alone
    if batch == case.n:  # and each sample alone through the engine
        for i in sorted({0, batch - 1}):
            assert torch.equal(engine(x[i : i + 1])[0], out[i])


def test_sample_result_independent_of_batch_companions(case: Case) -> None:
    engine = Engine(case.program, backend="fast")
    other = random_pixels(3, case.model.img_size, seed=999)
    mixed = torch.cat([other[:2], case.x[1:2], other[2:]])
    assert torch.equal(engine(mixed)[2], case.per_sample[1])


def test_dequantize_and_logit_scale(case: Case) -> None:
    engine = Engine(case.program)
    x = case.x[:1]
    logits = engine(x)
    deq = engine(x, dequantize=True)
    assert deq.dtype == torch.float32
    scale = float(case.model.eval()(x).scale)
    assert case.program.meta["logit_scale"] == pytest.approx(scale, rel=1e-12)
    assert torch.equal(deq, logits.to(torch.float32) * float(case.program.meta["logit_scale"]))
    assert torch.equal(deq.argmax(-1), logits.argmax(-1))


def test_fast_kernels_match_reference_node_by_node(case: Case) -> None:
    """Every fast kernel, fed the reference engine's actual intermediate values, gives the same integers."""
    if case.model.img_size[0] >= 224:
        pytest.skip("the small models feed every fast kernel already; 224px adds only run time")
    fast = fast_kernels()
    assert fast, "the fast backend overrides no kernel"
    prog = case.program
    ref = Engine(prog, backend="reference")
    values: dict[str, Tensor] = {prog.input: case.x[:1]}
    ref.run(case.x[:1], trace=lambda i, out: values.__setitem__(prog.nodes[i].output, out))
    checked = 0
    for node in prog.nodes:
        if node.op not in fast:
            continue
        args = [values[v] for v in node.inputs]
        kw = {k: ref.consts[key] for k, key in node.consts.items()}
        want = REFERENCE_KERNELS[node.op](*args, **kw, **node.attrs)
        got = fast[node.op](*args, **kw, **node.attrs)
        assert got.dtype == want.dtype and torch.equal(got, want), node
        checked += 1
    assert checked > 0


def test_verify_integer_only_ok_on_real_program(case: Case) -> None:
    if case.model.img_size[0] >= 224:
        pytest.skip("dispatch-mode recording of a 224px model is slow; the small models cover the check")
    check = verify_integer_only(Engine(case.program, backend="reference"))
    assert check.ok, check.summary()
    assert check.static_problems == [] and check.float_ops == {}
    assert len(check.value_dtypes) == len(case.program.nodes)
    assert sum(check.aten_ops.values()) > len(case.program.nodes)
    assert check.summary().startswith("integer-only: yes")


# ---------------------------------------------------------------------------------------------
# Random models and configs: fast == reference == model


@pytest.mark.parametrize(
    "seed,cfg",
    [
        (1, dict(per_channel_weights=False)),
        (2, dict(residual_bits=12, score_bits=12)),
        (3, dict(gelu_sigmoid_bits=8, shiftmax_n_max=10, shiftgelu_n_max=12)),
        (4, dict(residual_bits=24, score_bits=24, momentum=0.5)),
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
    for backend in ("reference", "fast"):
        assert torch.equal(Engine(prog, backend=backend)(x), want), backend


def test_fast_linear_and_matmul_extremes() -> None:
    """int8 extremes (-128 inputs, +-127 weights) and non-contiguous operands."""
    fast = fast_kernels()
    g = torch.Generator().manual_seed(0)
    if "linear" in fast:
        k = 4096
        x = torch.full((3, 5, k), -128, dtype=torch.int8)
        w = torch.full((16, k), -127, dtype=torch.int8)
        w[1::2] = 127
        b = torch.randint(-(2**30), 2**30, (16,), dtype=torch.int32, generator=g)
        assert torch.equal(fast["linear"](x, w, b), REFERENCE_KERNELS["linear"](x, w, b))
        xr = torch.randint(-128, 128, (2, 9, 64), dtype=torch.int8, generator=g).transpose(0, 1)
        wr = torch.randint(-127, 128, (10, 64), dtype=torch.int8, generator=g)
        assert torch.equal(fast["linear"](xr, wr, None), REFERENCE_KERNELS["linear"](xr, wr, None))
    if "matmul" in fast:
        a = torch.randint(-128, 128, (2, 4, 9, 16), dtype=torch.int8, generator=g).permute(
            0, 2, 1, 3
        )  # (2,9,4,16)
        bt = torch.randint(-128, 128, (2, 9, 5, 16), dtype=torch.int8, generator=g)
        for tb, bb in ((True, bt), (False, bt.transpose(-1, -2))):
            assert torch.equal(fast["matmul"](a, bb, tb), REFERENCE_KERNELS["matmul"](a, bb, tb))
        ones = torch.full((1, 3, 8, 2048), -128, dtype=torch.int8)
        assert torch.equal(fast["matmul"](ones, ones, True), REFERENCE_KERNELS["matmul"](ones, ones, True))


# ---------------------------------------------------------------------------------------------
# The integer-only proof must be able to fail


@pytest.fixture(scope="module")
def small() -> tuple[QModel, Program]:
    q = make_qmodel("vit_test", depth=1)
    return q, ivit.freeze(q)


def test_verify_flags_unused_float_constant(small: tuple[QModel, Program]) -> None:
    _, prog = small
    engine = Engine(prog, backend="reference")
    engine.program = Program(
        prog.nodes, {**prog.consts, "logit_scale": torch.tensor(0.01)}, prog.input, prog.output, prog.meta
    )
    check = verify_integer_only(engine)
    assert not check.ok
    assert any("logit_scale" in p for p in check.static_problems)
    assert check.summary().startswith("integer-only: NO")


def test_verify_flags_float_constant_used_by_a_kernel(
    monkeypatch: pytest.MonkeyPatch, small: tuple[QModel, Program]
) -> None:
    """A float constant that slipped past the static checker is still caught (statically and at run time)."""
    _, prog = small
    key = prog.nodes[-1].consts["bias"]  # the head's bias, read by int_linear with .to(int64)
    bad = Program(
        prog.nodes,
        {**prog.consts, key: prog.consts[key].to(torch.float32)},
        prog.input,
        prog.output,
        prog.meta,
    )
    monkeypatch.setattr(ivit.engine, "check_program", lambda p: None)  # simulate a checker bug
    check = verify_integer_only(Engine(bad, backend="reference"))
    assert not check.ok
    assert any(key in p for p in check.static_problems)
    assert check.float_ops  # the run touched the float tensor too


def test_verify_flags_kernel_swapped_for_float_op(
    monkeypatch: pytest.MonkeyPatch, small: tuple[QModel, Program]
) -> None:
    _, prog = small

    def float_gelu(x: Tensor, x0: int, n: int, k_out: int) -> Tensor:  # integer in, integer out, float inside
        return torch.round(F.gelu(x.to(torch.float32)) * 2 ** (k_out - 1)).to(torch.int32)

    monkeypatch.setitem(REFERENCE_KERNELS, "shiftgelu", float_gelu)
    check = verify_integer_only(Engine(prog, backend="reference"))
    assert check.static_problems == []
    assert all(d.startswith("torch.int") for d in check.value_dtypes.values())
    assert not check.ok
    assert "gelu" in check.float_ops
    assert "float aten op gelu" in check.summary()


def test_verify_flags_float_valued_node(
    monkeypatch: pytest.MonkeyPatch, small: tuple[QModel, Program]
) -> None:
    _, prog = small
    ref = REFERENCE_KERNELS["linear"]
    n_cls = prog.meta["num_classes"]

    def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = ref(x, weight, bias)
        return out.to(torch.float64) if weight.shape[0] == n_cls else out  # the head returns floats

    monkeypatch.setitem(REFERENCE_KERNELS, "linear", linear)
    check = verify_integer_only(Engine(prog, backend="reference"))
    assert not check.ok
    assert check.value_dtypes[f"{len(prog.nodes) - 1}:linear"] == "torch.float64"


def test_engine_rejects_float_program(small: tuple[QModel, Program]) -> None:
    _, prog = small
    key = next(iter(prog.consts))
    bad = Program(
        prog.nodes,
        {**prog.consts, key: prog.consts[key].to(torch.float32)},
        prog.input,
        prog.output,
        prog.meta,
    )
    with pytest.raises(ivit.IvitError, match="non-integer"):
        Engine(bad)


# ---------------------------------------------------------------------------------------------
# Loading, backends, inputs


def test_load_returns_callable_engine(tmp_path: Path, small: tuple[QModel, Program]) -> None:
    q, prog = small
    path = prog.save(tmp_path / "m.ivit")
    engine = ivit.load(path)
    assert isinstance(engine, Engine) and engine.backend == "fast"
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
    monkeypatch.setenv("IVIT_BACKEND", "reference")
    assert Engine(prog).backend == "reference"
    assert Engine(prog, backend="fast").backend == "fast"
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
def test_engine_rejects_bad_pixels(small: tuple[QModel, Program], bad) -> None:  # noqa: ANN001
    _, prog = small
    with pytest.raises(ivit.IvitError) as e:
        Engine(prog)(bad())
    assert "\n" not in str(e.value)


def test_engine_accepts_noncontiguous_pixels(small: tuple[QModel, Program]) -> None:
    q, prog = small
    x = random_pixels(4, 32, seed=3)
    view = x.permute(0, 1, 3, 2)  # a valid (B, 3, 32, 32) uint8 view with other strides
    assert torch.equal(Engine(prog)(view), q.logits(view.contiguous()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_engine_on_cuda_matches_cpu(small: tuple[QModel, Program], backend: str) -> None:
    _, prog = small
    x = random_pixels(33, 32, seed=5)
    cpu = Engine(prog, backend="reference")(x)
    gpu = Engine(prog, backend=backend, device="cuda")(x.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
