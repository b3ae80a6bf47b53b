"""The training loop: the resumable ``Trainer`` (float and QAT), its sampler, schedule, loss, logs and
``TrainConfig`` (the 2-process ``torchrun`` run is in ``test_ddp.py``)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import ivit
from ivit import data
from ivit.errors import IvitError
from ivit.training import trainer as trainer_module
from ivit.training.trainer import (
    EpochSampler,
    FloatWrapper,
    LogitsModule,
    TrainConfig,
    Trainer,
    _loss,
    cosine_lr,
    evaluate_dataset,
)


def _digits(n_train: int = 256, img: int = 32) -> tuple[Subset, Subset]:
    return Subset(data.digits("train", img), range(n_train)), Subset(data.digits("test", img), range(120))


def test_epoch_sampler_shards_are_disjoint_full_batches_and_reproducible() -> None:
    n, batch, world = 103, 8, 3
    shards = [list(EpochSampler(n, batch, True, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert all(len(s) == (n // world // batch) * batch for s in shards)  # whole batches, equal per rank
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat))  # disjoint
    assert shards[0] == list(EpochSampler(n, batch, True, seed=5, rank=0, world_size=world))  # reproducible
    s = EpochSampler(n, batch, True, seed=5)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first  # a new order each epoch
    s.set_epoch(0, skip_batches=3)
    assert list(s) == first[3 * batch:]  # resume inside the epoch: same order, minus the done batches
    assert len(s) == len(first) - 3 * batch


def test_cosine_schedule_warms_up_and_decays() -> None:
    lrs = [cosine_lr(s, 100, 1.0, warmup=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_distillation_loss_is_cross_entropy_when_teacher_agrees() -> None:
    logits = torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    cfg = TrainConfig(distill_alpha=0.25, label_smoothing=0.0)
    plain = _loss(logits, y, logits, cfg, None)
    same = _loss(logits, y, logits, cfg, teacher=lambda x: x)  # teacher(x) returns the same logits: KL = 0
    assert same.item() == pytest.approx(0.75 * plain.item(), rel=1e-5)
    other = _loss(logits, y, logits, cfg, teacher=lambda x: -x)
    assert other.item() > same.item()


def test_float_trainer_learns_and_writes_logs(tmp_path: Path) -> None:
    train_ds, test_ds = _digits(1024)
    torch.manual_seed(0)
    model = FloatWrapper(ivit.create_model("vit_test"))
    cfg = TrainConfig(epochs=4, lr=2e-3, batch_size=32, warmup_epochs=0.5, seed=0)
    hist = Trainer(model, train_ds, cfg, eval_ds=test_ds, out_dir=tmp_path, progress=False).fit()
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert hist[-1]["step"] == 4 * (1024 // 32)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["float_top1"] > 0.25  # chance is 0.1
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]
    csv_lines = (tmp_path / "log.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and {"epoch", "step", "lr", "loss", "float_top1", "time"} <= set(csv_lines[0].split(","))
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn after the last epoch
    assert (tmp_path / "checkpoint.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_qat_trainer_keeps_integer_model_bit_exact(tmp_path: Path) -> None:
    train_ds, test_ds = _digits(128)
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model("vit_test"))
    ivit.calibrate(q, [train_ds[i][0].unsqueeze(0) for i in range(16)])
    before = {k: v.clone() for k, v in q.state_dict().items()}
    hist = Trainer(q, train_ds, TrainConfig(epochs=1, lr=1e-3, batch_size=32), eval_ds=test_ds,
                   progress=False).fit()
    assert set(hist[0]) >= {"int_top1", "int_top5", "loss", "lr"}
    assert not torch.equal(before["head.weight"], q.state_dict()["head.weight"])  # trained through the STE
    assert not torch.equal(before["blocks.0.add1.observer.running_max"], q.blocks[0].add1.observer.running_max)
    prog = ivit.freeze(q)
    x = torch.stack([test_ds[i][0] for i in range(8)])
    assert torch.equal(ivit.Engine(prog)(x), q.logits(x))
    assert evaluate_dataset(q, test_ds)["int_top1"] == pytest.approx(hist[0]["int_top1"])


def test_there_is_one_training_loop() -> None:
    assert not hasattr(trainer_module, "train")  # the old in-memory loop is gone: Trainer is the loop
    assert "train" not in trainer_module.__all__


@pytest.mark.parametrize("field,value,match", [
    ("epochs", 0, "epochs must be >= 1"),
    ("lr", 0.0, "lr must be > 0"),
    ("lr", math.nan, "lr must be a finite float"),
    ("batch_size", 2.5, "batch_size must be a finite int"),
    ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\)"),
    ("distill_alpha", 2.0, r"distill_alpha must be in \[0, 1\]"),
    ("weight_decay", -1.0, "weight_decay must be >= 0"),
    ("epochs", True, "epochs must be a finite int"),
])
def test_train_config_validates_itself(field: str, value: object, match: str) -> None:
    with pytest.raises(IvitError, match=match):
        TrainConfig(**{field: value})
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_diverging_run_stops_with_one_line(tmp_path: Path) -> None:
    train_ds, _ = _digits(64)
    torch.manual_seed(0)
    model = FloatWrapper(ivit.create_model("vit_test"))
    with torch.no_grad():
        model.model.head.weight.fill_(float("nan"))
    t = Trainer(model, train_ds, TrainConfig(epochs=1, batch_size=32), out_dir=tmp_path, progress=False)
    with pytest.raises(IvitError, match="training diverged in epoch 1"):
        t.fit()
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_trainer_rejects_tiny_data_and_missing_folder(tmp_path: Path) -> None:
    model = FloatWrapper(ivit.create_model("vit_test"))
    train_ds, _ = _digits(16)
    with pytest.raises(IvitError, match="smaller than one batch"):
        Trainer(model, train_ds, TrainConfig(batch_size=32), progress=False)
    with pytest.raises(IvitError, match="does not exist"):
        Trainer(model, train_ds, TrainConfig(batch_size=8), out_dir=tmp_path / "nope", progress=False)


def test_logits_module_gives_tensors_for_ddp() -> None:
    q = ivit.quantize(ivit.create_model("vit_test"))
    x = data.digits("train", 32).images[:4]
    ivit.calibrate(q, [x])
    q.train()
    out = LogitsModule(q)(x)
    assert isinstance(out, torch.Tensor) and out.requires_grad and out.shape == (4, 10)
