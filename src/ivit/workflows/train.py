"""Float training (``ivit train``): a timm model trained on uint8 data with ``Trainer`` (the float-training
recipe by default); writes ``model.safetensors``, a timm state dict for ``--checkpoint``.

    res = ivit.run_train(ivit.TrainRun(ivit.ModelSpec("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7}),
                                       data="fashion-mnist", out_dir="runs/float"))
    res.float_top1, res.files["model"]

Under ``torchrun`` every rank runs this function (the same command line); rank 0 writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import IvitError
from ..training import distributed as D
from ..training.trainer import FloatWrapper, TrainConfig, Trainer
from . import recipes
from .common import (
    RunOptions,
    datasets,
    model_geometry,
    prepare_out_dir,
    resolve_spec,
    resume_path,
    save_state_dict,
    seed_rank,
)
from .spec import ModelSpec

__all__ = ["TrainRun", "TrainResult", "run_train"]


@dataclass(frozen=True)
class TrainRun(RunOptions):
    """Float training of one model (and the ``RunOptions``: augmentation, limits, resume, ...).

    Attributes:
        model: the network (``ModelSpec``); its weights start random unless it names a checkpoint or
            pretrained weights.  A model trained from scratch on a built-in dataset normalizes with that
            dataset's recipe (``recipes.DATASETS``).
        data: ``digits``, ``fashion-mnist`` or an ImageNet-layout folder (``train/``, ``val/``).
        out_dir: folder of the run: ``checkpoint.safetensors``, ``log.jsonl``, ``log.csv``, ``accuracy.png``
            and the result, ``model.safetensors``.
        train: optimizer and schedule (``recipes.FLOAT_TRAINING``).
    """

    model: ModelSpec
    data: str
    out_dir: str | Path
    train: TrainConfig = recipes.FLOAT_TRAINING

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, ModelSpec) or not isinstance(self.train, TrainConfig):
            raise IvitError("TrainRun.model must be a ModelSpec and TrainRun.train a TrainConfig")


@dataclass
class TrainResult:
    """What a float training run produced (rank 0 fills ``files``)."""

    model: FloatWrapper
    spec: ModelSpec
    history: list[dict[str, Any]]
    out_dir: Path
    steps_run: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def float_top1(self) -> float | None:
        return self.history[-1].get("float_top1") if self.history else None


def run_train(cfg: TrainRun) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; write ``out_dir/model.safetensors`` (with the spec recorded)."""
    info = D.init_distributed(cfg.device)
    try:
        out = prepare_out_dir(cfg.out_dir, info)
        resume = resume_path(cfg.resume, out, cfg.progress)
        spec = resolve_spec(cfg.model, cfg.data)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = spec.create().to(info.device)
        img, mean, std = model_geometry(model)
        train_ds, eval_ds = datasets(cfg.data, img, mean, std, cfg.augment, cfg.limit_train, cfg.limit_eval)
        assert train_ds is not None
        seed_rank(cfg.train.seed, info.rank)
        fmodel = FloatWrapper(model)
        identity = {"model": spec.name, "model_args": spec.program_meta()["model_args"], "img_size": img,
                    "num_classes": int(getattr(model, "num_classes", 0))}
        trainer = Trainer(fmodel, train_ds, cfg.train, eval_ds=eval_ds, out_dir=out, save_every=cfg.save_every,
                          identity=identity, progress=cfg.progress, num_workers=cfg.workers, desc="train",
                          title=f"{spec.describe()} on {cfg.data}: float training")
        if resume is not None:
            trainer.load(resume)
        step0 = trainer.step
        history = trainer.fit()
        res = TrainResult(fmodel, spec, history, out, steps_run=trainer.step - step0)
        if info.is_main:
            path = out / "model.safetensors"
            save_state_dict(model, path, spec)
            res.files = {"model": path, "checkpoint": out / "checkpoint.safetensors", "log": out / "log.jsonl",
                         "plot": out / "accuracy.png"}
        return res
    finally:
        D.shutdown_distributed(info)
