"""Quantization-aware training (``ivit qat``, ``ivit quantize --qat-epochs``): float model -> calibration (the
PTQ starting point, optionally searched) -> QAT with ``Trainer`` (the paper's recipe by default) -> ``.ivit``.

    res = ivit.run_qat(ivit.QATRun(ivit.ModelSpec("deit_tiny_patch16_224", pretrained=True),
                                   data="imagenet", out_dir="runs/qat"))
    res.ptq_top1, res.qat_top1, res.bitexact, res.output        # runs/qat/model.ivit

Under ``torchrun`` every rank runs this function (the same command line); rank 0 writes the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import check_output_path
from ..backends import Engine
from ..config import QuantConfig
from ..errors import IvitError
from ..ir.program import Program
from ..models.base import QModel
from ..quant import freeze
from ..training import distributed as D
from ..training.trainer import FloatWrapper, TrainConfig, Trainer, evaluate_dataset
from . import recipes
from .common import (
    RunOptions,
    check_nonneg,
    check_positive,
    datasets,
    first_images,
    model_geometry,
    prepare_out_dir,
    resolve_spec,
    resume_path,
    seed_rank,
    state_dict_sha256,
)
from .ptq import build_qmodel, calibrate_qmodel
from .spec import ModelSpec

__all__ = ["QATRun", "QATResult", "run_qat"]


@dataclass(frozen=True)
class QATRun(RunOptions):
    """Quantization-aware training of one model (and the ``RunOptions``: augmentation, limits, resume, ...).

    Attributes:
        model: the float network (``ModelSpec``); usually a checkpoint of ``ivit train`` or pretrained weights.
        data: ``digits``, ``fashion-mnist`` or an ImageNet-layout folder (``train/``, ``val/``).
        out_dir: folder of the run: ``checkpoint.safetensors`` (rolling, atomic), ``log.jsonl``, ``log.csv``,
            ``accuracy.png`` and ``model.ivit``; None: no files except ``output``.
        output: the ``.ivit`` file (default ``out_dir/model.ivit``; required without ``out_dir``).
        train: optimizer and schedule (``recipes.QAT_TRAINING``, the I-ViT paper's recipe); a
            ``distill_alpha > 0`` distills from the float model.
        calib_images, calib_batch: calibration before QAT (``recipes.CALIBRATION_IMAGES`` / ``_BATCH``).
        ptq_search: start from the searched PTQ (LayerNorm balancing, clipping ranges, ShiftExp shifts).
        search_images: calibration images the search evaluates candidates on.
        quant: bit widths (``QuantConfig``).
        bitexact_images: held-out images on which the engine must equal the PyTorch integer model (0: all).
        eval_batch: evaluation batch size (default ``2 * train.batch_size``).
    """

    model: ModelSpec
    data: str
    out_dir: str | Path | None
    output: str | Path | None = None
    train: TrainConfig = recipes.QAT_TRAINING
    calib_images: int = recipes.CALIBRATION_IMAGES
    calib_batch: int = recipes.CALIBRATION_BATCH
    ptq_search: bool = False
    search_images: int = recipes.SEARCH_IMAGES
    quant: QuantConfig = field(default_factory=QuantConfig)
    bitexact_images: int = recipes.BITEXACT_IMAGES
    eval_batch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, ModelSpec) or not isinstance(self.train, TrainConfig):
            raise IvitError("QATRun.model must be a ModelSpec and QATRun.train a TrainConfig")
        if self.out_dir is None and self.output is None:
            raise IvitError("QAT needs an output folder or an output .ivit file")
        if self.out_dir is None and (self.resume is not None or self.save_every):
            raise IvitError("--resume and --save-every need an output folder")
        check_positive(calib_images=self.calib_images, calib_batch=self.calib_batch,
                       search_images=self.search_images, **({"eval_batch": self.eval_batch}
                                                            if self.eval_batch is not None else {}))
        check_nonneg(self, "bitexact_images")


@dataclass
class QATResult:
    """What a QAT run produced (rank 0 fills ``program``, ``output``, ``files`` and ``bitexact``)."""

    qmodel: QModel
    history: list[dict[str, Any]]
    out_dir: Path | None
    program: Program | None = None
    output: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    float_top1: float | None = None
    ptq_top1: float | None = None
    qat_top1: float | None = None
    bitexact: bool | None = None
    search: str | None = None


def _weights_id(spec: ModelSpec, model: nn.Module) -> str | None:
    """Identifies the float weights a QAT run starts from (a run cannot continue from other weights)."""
    if spec.checkpoint is None and not spec.pretrained:
        return None  # random initial weights: the seed (in the training config) identifies them
    return "sha256:" + state_dict_sha256(model)


def run_qat(cfg: QATRun) -> QATResult:
    """Calibrate then train the integer model of ``cfg.model``; freeze it to ``cfg.output``."""
    info = D.init_distributed(cfg.device)
    try:
        out_dir = None if cfg.out_dir is None else prepare_out_dir(cfg.out_dir, info)
        target = cfg.output if cfg.output is not None else Path(cfg.out_dir or ".") / "model.ivit"
        output = check_output_path(target, ".ivit output")
        resume = resume_path(cfg.resume, out_dir, cfg.progress)
        spec = resolve_spec(cfg.model, cfg.data)
        seed = cfg.train.seed
        model, qmodel, float_params = build_qmodel(spec, cfg.quant, seed)
        weights = _weights_id(spec, model)
        img, mean, std = model_geometry(model)
        train_ds, eval_ds = datasets(cfg.data, img, mean, std, cfg.augment, cfg.limit_train, cfg.limit_eval)
        assert train_ds is not None
        device = info.device
        search = None
        eval_batch = cfg.eval_batch or 2 * cfg.train.batch_size
        history: list[dict[str, Any]] = []
        if resume is None or device.type != "cpu":  # the checkpoint restores every range on resume
            report, _ = calibrate_qmodel(qmodel, cfg.data, calib_images=cfg.calib_images,
                                               calib_batch=cfg.calib_batch, search=cfg.ptq_search,
                                               search_images=cfg.search_images, device=device,
                                               requested_device=cfg.device, seed=seed,
                                               progress=cfg.progress and info.is_main)
            search = None if report is None else report.summary()
        device = next(qmodel.parameters()).device
        model.to(device)
        fmodel: nn.Module | None = FloatWrapper(model).eval()
        if resume is None:
            base = evaluate_dataset(fmodel, eval_ds, eval_batch, cfg.workers, progress=cfg.progress)
            start = evaluate_dataset(qmodel, eval_ds, eval_batch, cfg.workers, progress=cfg.progress)
            history = [{"epoch": 0, "step": 0, **base, **start}]
        teacher = fmodel if cfg.train.distill_alpha > 0 else None
        fmodel = None
        seed_rank(seed, info.rank)
        identity = {"model": spec.name, "model_args": spec.program_meta()["model_args"],
                    "weights": weights,
                    "arch": qmodel.meta, "quant_config": json.loads(qmodel.config.to_json()),
                    "ptq_search": cfg.ptq_search}
        trainer = Trainer(qmodel, train_ds, cfg.train, eval_ds=eval_ds, teacher=teacher, out_dir=out_dir,
                          save_every=cfg.save_every, identity=identity, history=history, progress=cfg.progress,
                          num_workers=cfg.workers, eval_batch_size=eval_batch, desc="qat",
                          title=f"{spec.describe()} on {cfg.data}: QAT (integer-only)")
        history = trainer.fit(resume)
        res = QATResult(qmodel, history, out_dir, search=search)
        first = history[0] if history and history[0].get("epoch") == 0 else {}
        res.float_top1, res.ptq_top1 = first.get("float_top1"), first.get("int_top1")
        res.qat_top1 = history[-1].get("int_top1") if history else None
        if info.is_main:
            qmodel.eval()
            extra = {**spec.program_meta(float_params),
                     "qat": {"epochs": trainer.epoch, "steps": trainer.step, "calib_images": cfg.calib_images,
                             "ptq_search": cfg.ptq_search}}
            prog = freeze(qmodel, name=spec.name, extra_meta=extra)
            prog.save(output)
            x = first_images(eval_ds, cfg.bitexact_images)
            engine = Engine(prog)
            res.bitexact = all(torch.equal(engine(x[i:i + eval_batch]), qmodel.logits(x[i:i + eval_batch].to(device))
                                           .cpu()) for i in range(0, len(x), eval_batch))
            res.program, res.output = prog, output
            res.files = {"ivit": output}
            if out_dir is not None:
                res.files.update(checkpoint=out_dir / "checkpoint.safetensors", log=out_dir / "log.jsonl",
                                 plot=out_dir / "accuracy.png")
        return res
    finally:
        D.shutdown_distributed(info)
