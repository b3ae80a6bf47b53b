"""The workflows through the Python API: float training, PTQ (with and without the search), QAT, evaluation
and latency, each a function of a dataclass; programs frozen through them are bit-exact and carry the
network that made them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

import ivit
from ivit import data, recipes
from ivit.backends import get_backend
from ivit.errors import IvitError
from ivit.workflows import (
    BenchRun,
    EvalRun,
    ModelSpec,
    PTQRun,
    QATRun,
    TrainRun,
    run_bench,
    run_eval,
    run_ptq,
    run_qat,
    run_train,
)

FAST = dict(device="cpu", progress=False)
CALIB = dict(calib_images=64, calib_batch=32, search_images=32)


@pytest.fixture(scope="module")
def float_run(tmp_path_factory: pytest.TempPathFactory) -> ivit.TrainResult:
    """vit_test trained in float on 1024 digits images (shared by the tests below)."""
    out = tmp_path_factory.mktemp("float")
    cfg = dataclasses.replace(recipes.FLOAT_TRAINING, epochs=4, lr=2e-3, batch_size=32, warmup_epochs=0.5)
    return run_train(TrainRun(ModelSpec("vit_test"), "digits", out, train=cfg, limit_train=1024, limit_eval=120,
                              **FAST))


@pytest.fixture(scope="module")
def weights(float_run: ivit.TrainResult) -> ModelSpec:
    return ModelSpec("vit_test", checkpoint=str(float_run.files["model"]))


def test_train_writes_weights_logs_and_the_spec(float_run: ivit.TrainResult) -> None:
    recs = [json.loads(x) for x in (float_run.out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4] and float_run.float_top1 == recs[-1]["float_top1"] > 0.2
    assert float_run.steps_run == 4 * (1024 // 32)
    assert (float_run.out_dir / "accuracy.png").stat().st_size > 1000
    # model.safetensors is a plain timm state dict (``--checkpoint``) that also records the network
    from safetensors.torch import load_file

    from ivit.workflows.spec import checkpoint_spec

    m = ModelSpec("vit_test", checkpoint=str(float_run.files["model"])).create()
    sd = load_file(float_run.files["model"])
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert checkpoint_spec(float_run.files["model"]) == ModelSpec("vit_test", num_classes=10, mean=(0.5,) * 3,
                                                                  std=(0.5,) * 3)


def test_ptq_freezes_a_bit_exact_program_with_its_network(weights: ModelSpec, tmp_path: Path) -> None:
    res = run_ptq(PTQRun(weights, "digits", tmp_path / "s.ivit", evaluate=True, limit_eval=120,
                         report=tmp_path / "s.json", **CALIB, **FAST))
    assert res.calib_images == 64 and res.eval_images == 120 and res.bitexact is True and res.top1 > 0.2
    prog = ivit.load_program(tmp_path / "s.ivit")
    assert prog.graph_json() == res.program.graph_json()
    assert prog.meta["model_args"] == {"num_classes": 10} and prog.meta["ptq"] == {"calib_images": 64, "search": True}
    assert prog.meta["float_params"] == sum(p.numel() for p in weights.create().parameters())
    # independently of the workflow's own check: the file's engine equals the PyTorch integer model
    x = data.digits("test", 32).images[120:152]
    assert torch.equal(ivit.load(tmp_path / "s.ivit")(x), res.qmodel.logits(x))
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["summary"]["search"].startswith("PTQ search:") and rep["summary"]["int_top1"] == res.top1
    assert {c["kind"] for c in rep["choices"]} == {"balance", "clip", "n"}
    fixed = run_ptq(PTQRun(weights, "digits", tmp_path / "f.ivit", search=False, **CALIB, **FAST))
    assert fixed.search is None and fixed.program.meta["ptq"]["search"] is False
    assert any(not torch.equal(prog.consts[k], fixed.program.consts[k]) for k in prog.consts)
    ev = run_eval(EvalRun(tmp_path / "s.ivit", "digits", limit_eval=120, progress=False))
    assert (ev.top1, ev.n, ev.model) == (res.top1, 120, "vit_test(num_classes=10)")


def test_qat_trains_from_the_float_weights_and_freezes_bit_exactly(float_run: ivit.TrainResult, weights: ModelSpec,
                                                                  tmp_path: Path) -> None:
    cfg = QATRun(weights, "digits", tmp_path / "qat", train=dataclasses.replace(
        recipes.QAT_TRAINING, epochs=1, lr=5e-5, batch_size=32, distill_alpha=0.5), limit_train=256,
        limit_eval=120, save_every=2, **CALIB, **FAST)
    res = run_qat(cfg)
    assert res.bitexact is True and res.output == tmp_path / "qat" / "model.ivit"
    assert [r["epoch"] for r in res.history] == [0, 1]
    assert res.float_top1 == pytest.approx(float_run.float_top1)  # the same float model, the same eval set
    assert abs(res.ptq_top1 - res.float_top1) < 0.1  # PTQ starting point close to float
    ev = run_eval(EvalRun(res.output, "digits", limit_eval=120, progress=False))
    assert ev.top1 == pytest.approx(res.qat_top1)  # the engine's accuracy is the PyTorch integer model's
    meta = ivit.load_program(res.output).meta
    assert meta["qat"]["epochs"] == 1 and meta["model_args"] == {"num_classes": 10}
    # a finished run resumed is a no-op that rewrites the program; without resume the folder is protected
    again = run_qat(dataclasses.replace(cfg, resume="auto"))
    assert again.history == res.history and again.program.graph_json() == res.program.graph_json()
    with pytest.raises(IvitError, match="pass --resume"):
        run_qat(cfg)
    # QAT of other float weights cannot continue this run
    other = tmp_path / "other.safetensors"
    other.write_bytes(Path(weights.checkpoint).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IvitError, match="different run: weights is sha256:"):
        run_qat(dataclasses.replace(cfg, model=dataclasses.replace(weights, checkpoint=str(other)), resume="auto"))


def test_qat_without_a_folder_writes_only_the_program(weights: ModelSpec, tmp_path: Path) -> None:
    cfg = dataclasses.replace(recipes.QAT_TRAINING, epochs=1, batch_size=32)
    res = run_qat(QATRun(weights, "digits", None, output=tmp_path / "q.ivit", train=cfg, limit_train=64,
                         limit_eval=32, **CALIB, **FAST))
    assert res.bitexact is True and sorted(p.name for p in tmp_path.iterdir()) == ["q.ivit"]


def test_bench_times_the_same_float_network(weights: ModelSpec, tmp_path: Path) -> None:
    spec = ModelSpec("vit_test", {"depth": 1, "embed_dim": 48, "num_heads": 3})
    res = run_ptq(PTQRun(spec, "random", tmp_path / "m.ivit", search=False, calib_images=4, calib_batch=4, **FAST))
    b = run_bench(BenchRun(tmp_path / "m.ivit", batch=2, iters=2))
    assert b.model == "vit_test(depth=1, embed_dim=48, num_heads=3)"
    assert b.float_params == res.float_params == spec.num_params() != ModelSpec("vit_test").num_params()
    assert [m for m, _ in b.rows][:2] == ["torch fp32", "torch bf16 autocast"] and b.rows[2][0].startswith("ivit int")
    # a program whose metadata names a network it cannot be: no float twin, said in one note
    prog = ivit.load_program(tmp_path / "m.ivit")
    prog.meta["model_args"] = {"depth": 1, "embed_dim": 48, "num_heads": 3, "mlp_ratio": 64.0}
    prog.save(tmp_path / "lie.ivit")
    b = run_bench(BenchRun(tmp_path / "lie.ivit", batch=1, iters=1))
    assert b.model is None and "parameters but the program was frozen from a network with" in b.note
    assert [m for m, _ in b.rows] == [f"ivit int ({get_backend('fast').name})"]


def test_outputs_are_checked_before_any_work(weights: ModelSpec, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(IvitError, match="output folder does not exist"):
        run_ptq(PTQRun(weights, "digits", tmp_path / "m.ivit", report=tmp_path / "missing" / "r.json", **FAST))
    with pytest.raises(IvitError, match="is a directory"):
        run_ptq(PTQRun(weights, "digits", tmp_path, **FAST))
    with pytest.raises(IvitError, match="same file"):
        run_ptq(PTQRun(weights, "digits", tmp_path / "m.ivit", report=tmp_path / "m.ivit", **FAST))
    with pytest.raises(IvitError, match="unknown dataset"):
        run_ptq(PTQRun(weights, "digits-typo", tmp_path / "m.ivit", evaluate=True, **FAST))
    assert time.perf_counter() - t0 < 5 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make,match", [
    (lambda: QATRun(ModelSpec("vit_test"), "digits", None), "needs an output folder or an output .ivit file"),
    (lambda: QATRun(ModelSpec("vit_test"), "digits", None, output="m.ivit", resume="auto"), "need an output folder"),
    (lambda: PTQRun(ModelSpec("vit_test"), "random", "m.ivit", evaluate=True), "needs labelled data"),
    (lambda: PTQRun(ModelSpec("vit_test"), "digits", "m.ivit", calib_images=0), "calib-images must be"),
    (lambda: TrainRun("vit_test", "digits", "out"), "must be a ModelSpec"),  # type: ignore[arg-type]
    (lambda: EvalRun("m.ivit", "digits", split="dev"), "unknown split"),
])
def test_configs_validate_themselves(make: object, match: str) -> None:
    with pytest.raises(IvitError, match=match):
        make()  # type: ignore[operator]


def test_random_data_cannot_train(tmp_path: Path) -> None:
    with pytest.raises(IvitError, match="--data random only calibrates"):
        run_train(TrainRun(ModelSpec("vit_test"), "random", tmp_path / "r", **FAST))
