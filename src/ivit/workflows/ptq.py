"""Post-training quantization (``ivit ptq``, ``ivit quantize``): float model -> calibration (+ the per-layer
search) -> ``.ivit`` program, optionally evaluated with the engine.

    res = ivit.run_ptq(ivit.PTQRun(ivit.ModelSpec("vit_digits", checkpoint="w.safetensors"), data="digits",
                                   output="vit.ivit", evaluate=True))
    res.top1, res.bitexact, res.search.summary()
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data
from .._io import check_output_path, write_text_atomic
from ..backends import Engine
from ..config import QuantConfig
from ..errors import IvitError
from ..ir.program import Program
from ..models.base import QModel
from ..quant import freeze, quantize
from ..quant.ptq import SearchReport, ptq
from ..training import distributed as D
from . import recipes
from .common import (
    RANDOM_DATA,
    calibration_batches,
    check_nonneg,
    check_positive,
    checked_output,
    datasets,
    int_device,
    resolve_spec,
)
from .evaluate import engine_accuracy
from .spec import ModelSpec

__all__ = ["PTQRun", "PTQResult", "run_ptq", "build_qmodel", "calibrate_qmodel"]


@dataclass(frozen=True)
class PTQRun:
    """Post-training quantization of one model.

    Attributes:
        model: the float network (``ModelSpec``: name, model arguments, weights).
        data: calibration (and evaluation) data: ``digits``, ``fashion-mnist``, an ImageNet-layout folder, or
            ``random`` (random pixels: calibration only).
        output: the ``.ivit`` file to write.
        calib_images: training images that calibrate the ranges (``recipes.CALIBRATION_IMAGES``).
        calib_batch: images per calibration batch (``recipes.CALIBRATION_BATCH``).
        search: choose clipping ranges and ShiftExp shifts per layer (``ivit.ptq``); False: fixed parameters.
        balance: with ``search``, balance LayerNorm outlier channels into the next linear layer.
        search_images: calibration images the search evaluates candidates on (whole batches, rounded up).
        quant: bit widths (``QuantConfig``).
        evaluate: top-1/top-5 of the written program's engine on the held-out split, and its bit-exactness
            against the PyTorch integer model on the first ``bitexact_images``.
        limit_eval: evaluate on the first N held-out images only (0: all).
        eval_batch: images per engine call when evaluating.
        bitexact_images: held-out images compared with ``torch.equal`` (0: all evaluated).
        report: also write the search's per-layer choices as JSON to this file.
        device: ``auto`` (a GPU when the integer model runs there), ``cpu`` or ``cuda``.
        seed: model initialization (without weights) and calibration order.
        progress: progress bars.
    """

    model: ModelSpec
    data: str
    output: str | Path
    calib_images: int = recipes.CALIBRATION_IMAGES
    calib_batch: int = recipes.CALIBRATION_BATCH
    search: bool = True
    balance: bool = True
    search_images: int = recipes.SEARCH_IMAGES
    quant: QuantConfig = field(default_factory=QuantConfig)
    evaluate: bool = False
    limit_eval: int = 0
    eval_batch: int = 128
    bitexact_images: int = recipes.BITEXACT_IMAGES
    report: str | Path | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelSpec):
            raise IvitError("PTQRun.model must be a ModelSpec")
        check_positive(calib_images=self.calib_images, calib_batch=self.calib_batch,
                       search_images=self.search_images, eval_batch=self.eval_batch)
        if self.evaluate and self.data == RANDOM_DATA:
            raise IvitError("--eval needs labelled data, not --data random")
        check_nonneg(self, "limit_eval", "bitexact_images", "seed")


@dataclass
class PTQResult:
    """What a PTQ run produced."""

    program: Program
    qmodel: QModel
    output: Path
    calib_images: int
    search: SearchReport | None
    float_params: int
    top1: float | None = None
    top5: float | None = None
    eval_images: int = 0
    bitexact: bool | None = None
    report: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {"ivit": str(self.output), "calib_images": self.calib_images,
                "search": None if self.search is None else self.search.summary(), "int_top1": self.top1,
                "int_top5": self.top5, "eval_images": self.eval_images, "bitexact": self.bitexact}


def build_qmodel(spec: ModelSpec, quant: QuantConfig, seed: int = 0) -> tuple[nn.Module, QModel, int]:
    """The float model of ``spec`` (already resolved) and its integer I-ViT conversion (not yet calibrated).

    Returns ``(float model, qmodel, float parameters)``; ``seed`` fixes the initial weights of a model without
    a checkpoint (the same on every rank).
    """
    torch.manual_seed(seed)
    model = spec.create()
    return model, quantize(model, quant), sum(p.numel() for p in model.parameters())


def calibrate_qmodel(qmodel: QModel, data_name: str, *, calib_images: int, calib_batch: int, search: bool,
                     balance: bool = True, search_images: int = recipes.SEARCH_IMAGES,
                     device: torch.device | None = None, requested_device: str = "auto", seed: int = 0,
                     progress: bool = False) -> tuple[SearchReport | None, int]:
    """Calibrate ``qmodel`` on ``calib_images`` training images (with the per-layer search when ``search``),
    on ``device`` if the integer model runs there.  Returns ``(search report or None, calibration images)``."""
    calib = calibration_batches(data_name, qmodel.img_size[0], calib_images, calib_batch, seed, qmodel.in_chans)
    dev = int_device(qmodel, calib[0], device or torch.device("cpu"), requested_device)
    qmodel.to(dev)
    report = ptq(qmodel, [x.to(dev) for x in calib], search_params=search,
                 search_batches=math.ceil(search_images / calib_batch), balance=balance, progress=progress)
    return report, sum(len(x) for x in calib)


def run_ptq(cfg: PTQRun) -> PTQResult:
    """Calibrate (and search) ``cfg.model`` on ``cfg.data``, freeze it, write ``cfg.output``."""
    out = check_output_path(cfg.output, ".ivit output")  # every output checked before any work
    report_path = checked_output(cfg.report, "--report file")
    if report_path is not None and report_path.resolve() == out.resolve():
        raise IvitError("--report and the .ivit output are the same file")
    device = D.resolve_device(cfg.device)
    if cfg.evaluate:  # the held-out split must exist before the program is written
        data.build_dataset(cfg.data, "test", 8)
    spec = resolve_spec(cfg.model, cfg.data)
    _, qmodel, float_params = build_qmodel(spec, cfg.quant, cfg.seed)
    report, n_calib = calibrate_qmodel(qmodel, cfg.data, calib_images=cfg.calib_images, calib_batch=cfg.calib_batch,
                                       search=cfg.search, balance=cfg.balance, search_images=cfg.search_images,
                                       device=device, requested_device=cfg.device, seed=cfg.seed,
                                       progress=cfg.progress)
    extra = {**spec.program_meta(float_params), "ptq": {"calib_images": n_calib, "search": bool(cfg.search)}}
    prog = freeze(qmodel, name=spec.name, extra_meta=extra)
    prog.save(out)
    res = PTQResult(prog, qmodel, out, n_calib, report, float_params)
    if cfg.evaluate:
        _, eval_ds = datasets(cfg.data, qmodel.img_size[0], (), (), limit_eval=cfg.limit_eval, train=False)
        acc = engine_accuracy(Engine(prog), eval_ds, cfg.eval_batch, cfg.progress, qmodel=qmodel,
                              bitexact_images=cfg.bitexact_images, path=out)
        res.top1, res.top5, res.eval_images, res.bitexact = acc["top1"], acc["top5"], acc["n"], acc["bitexact"]
    if report_path is not None:
        choices = [] if report is None else report.to_json()
        write_text_atomic(report_path, json.dumps({"summary": res.summary(), "choices": choices}, indent=1) + "\n")
        res.report = report_path
    return res
