"""``ivit train`` / ``ivit qat`` / ``ivit ptq``: float training, quantization-aware training and
post-training quantization from the command line (thin layers over ``Trainer`` and ``ivit.ptq``).

Every command runs on CPU or GPU and, for ``train``/``qat``, on several processes or nodes through
``torchrun`` (the same command line: ``torchrun --nproc_per_node N $(which ivit) qat ...``).  A run's
output folder holds ``checkpoint.safetensors`` (rolling, atomic), ``log.jsonl``, ``log.csv`` and
``accuracy.png``, plus the result: ``model.safetensors`` (train: a timm state dict, usable as
``--checkpoint``) or ``model.ivit`` (qat: the frozen integer program).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..errors import IvitError
from ..training import distributed as D

__all__ = ["add_train_commands", "run_train", "run_qat", "run_ptq", "RunResult", "timm_train_transform",
           "QAT_RECIPE"]

#: The I-ViT authors' QAT recipe (DeiT fine-tuning setup): AdamW, cosine decay, label smoothing 0.1,
#: learning rate 1e-6 (their recommended range 2e-7 .. 2e-6; 1e-6 .. 5e-6 for larger batches), batch 64
#: per process, 90 epochs, timm's RandAugment + random-erasing augmentation for ImageNet folders.
QAT_RECIPE: dict[str, Any] = dict(epochs=90, lr=1e-6, weight_decay=0.05, batch=64, warmup_epochs=0.0,
                                  label_smoothing=0.1)
#: Float training from scratch (small models on small data: the benchmark and the demo).
FLOAT_RECIPE: dict[str, Any] = dict(epochs=30, lr=1e-3, weight_decay=0.05, batch=64, warmup_epochs=1.0,
                                    label_smoothing=0.1)
_BUILTIN_DATA = ("digits", "fashion-mnist")


@dataclass
class RunResult:
    """What a run produced (rank 0 fills the paths)."""

    model: nn.Module
    history: list[dict[str, Any]]
    out_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# data


class _Uint8RandomErasing:
    """timm's ``RandomErasing`` applied to a uint8 image: done in normalized space (so ``pixel`` mode
    draws normal noise there, as timm does), then mapped back to rounded uint8 pixels."""

    def __init__(self, prob: float, mean: tuple[float, ...], std: tuple[float, ...], mode: str = "pixel",
                 count: int = 1) -> None:
        from timm.data.random_erasing import RandomErasing

        self.erase = RandomErasing(prob, mode=mode, max_count=count, device="cpu")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        x = (img.to(torch.float32) / 255.0 - self.mean) / self.std
        x = self.erase(x)
        return ((x * self.std + self.mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def timm_train_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                         from_tensor: bool = False) -> Any:
    """The authors' (DeiT) training augmentation through timm, ending in uint8 ``(3, S, S)`` pixels:
    RandomResizedCrop(scale 0.08-1, bicubic), h-flip, RandAugment ``rand-m9-mstd0.5-inc1``, color
    jitter 0.4, then random erasing (p 0.25, pixel mode).  Input: a PIL image (or a uint8 tensor with
    ``from_tensor``)."""
    from timm.data.transforms_factory import transforms_imagenet_train
    from torchvision.transforms import v2

    tf = transforms_imagenet_train(img_size, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                                   interpolation="bicubic", mean=mean, std=std, normalize=False)
    steps: list[Any] = [v2.ToPILImage()] if from_tensor else []
    steps += [tf, _Uint8RandomErasing(0.25, mean, std)]
    return v2.Compose(steps)


def _model_geometry(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if size is None:
        size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise IvitError(f"only square inputs are supported, model takes {size}")
    return int(size[0]), tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def _datasets(a: argparse.Namespace, img: int, mean: tuple[float, ...], std: tuple[float, ...],
              train: bool = True) -> tuple[Dataset | None, Dataset]:
    """(augmented training set or None, held-out set), both limited by --limit-train / --limit-eval."""
    from .. import data

    eval_ds: Dataset = data.build_dataset(a.data, "test", img)
    if getattr(a, "limit_eval", 0):
        eval_ds = Subset(eval_ds, range(min(a.limit_eval, len(eval_ds))))
    if not train:
        return None, eval_ds
    train_ds = data.build_dataset(a.data, "train", img)
    aug = a.aug if a.aug != "auto" else ("light" if a.data in _BUILTIN_DATA else "timm")
    if aug == "timm":
        if isinstance(train_ds, data.ImageFolderDataset):
            train_ds.preprocess = timm_train_transform(img, mean, std)  # replaces the eval resize/crop
        else:
            train_ds.transform = timm_train_transform(img, mean, std, from_tensor=True)
    elif aug == "light":
        train_ds.transform = data.train_augment(img, flip=a.data not in _BUILTIN_DATA)
    if getattr(a, "limit_train", 0):
        train_ds = Subset(train_ds, range(min(a.limit_train, len(train_ds))))
    return train_ds, eval_ds


def _calib_batches(a: argparse.Namespace, img: int) -> list[Tensor]:
    """The first --calib-batches batches of a seeded shuffle of the (un-augmented) training set:
    identical on every rank."""
    from .. import data

    ds = data.build_dataset(a.data, "train", img)
    out: list[Tensor] = []
    for x, _ in data.make_loader(ds, a.calib_batch or a.batch, shuffle=True, seed=a.seed):
        out.append(x)
        if len(out) >= a.calib_batches:
            break
    return out


# ---------------------------------------------------------------------------------------------
# shared setup


def _create(a: argparse.Namespace, num_classes: int | None) -> nn.Module:
    from .. import models as api

    kwargs: dict[str, Any] = {}
    if getattr(a, "img_size", None):
        kwargs["img_size"] = a.img_size
    return api.create_model(a.model, pretrained=a.pretrained, checkpoint=a.checkpoint, num_classes=num_classes,
                            **kwargs)


def _num_classes(a: argparse.Namespace) -> int:
    from .. import data

    if a.num_classes:
        return a.num_classes
    if a.data in _BUILTIN_DATA:
        return 10
    return data.num_classes(data.build_dataset(a.data, "test", 8))


def _prepare_out(out: str, info: D.DistInfo) -> Path:
    p = Path(out)
    if info.is_main:
        if p.exists() and not p.is_dir():
            raise IvitError(f"--out {p} exists and is not a folder")
        if not p.parent.is_dir():
            raise IvitError(f"output folder's parent does not exist: {p.parent}")
        p.mkdir(exist_ok=True)
    D.barrier()
    return p


def _resume_path(a: argparse.Namespace, out: Path) -> Path | None:
    from ..training.trainer import CHECKPOINT_NAME

    ck = out / CHECKPOINT_NAME
    if a.resume is None:
        if ck.exists():
            raise IvitError(f"{out} already holds a training checkpoint: pass --resume to continue it, "
                            "or choose a new --out")
        return None
    if a.resume == "auto":
        if ck.exists():
            return ck
        if D.rank() == 0:
            print(f"ivit: no checkpoint in {out} yet: starting a new run", file=sys.stderr)
        return None
    p = Path(a.resume)
    if not p.is_file():
        raise IvitError(f"--resume checkpoint not found: {p}")
    return p


def _seed_rank(seed: int, rank: int) -> None:
    """Per-rank random streams (augmentation) after the shared model initialization."""
    s = seed + 1 + 1000 * rank
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def _train_config(a: argparse.Namespace) -> Any:
    from ..training.trainer import TrainConfig

    alpha = a.distill_alpha if getattr(a, "distill", False) else 0.0
    return TrainConfig(epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, batch_size=a.batch,
                       warmup_epochs=a.warmup_epochs, label_smoothing=a.label_smoothing, distill_alpha=alpha,
                       distill_tau=getattr(a, "distill_tau", 1.0), grad_clip=a.grad_clip, seed=a.seed)


def _save_state_dict(model: nn.Module, path: Path, meta: dict[str, str]) -> None:
    """A timm state dict as safetensors, written atomically."""
    from safetensors.torch import save_file

    from .._io import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)


def _int_device_ok(qmodel: nn.Module, x: Tensor, device: torch.device) -> bool:
    """Whether the integer forward runs on ``device`` (integer GEMMs need backend support)."""
    if device.type == "cpu":
        return True
    import copy

    probe = copy.deepcopy(qmodel).to(device).train()  # a copy: the probe must not touch the observers
    try:
        with torch.no_grad():
            probe(x[:1].to(device))
        return True
    except (RuntimeError, NotImplementedError):
        return False
    finally:
        del probe


# ---------------------------------------------------------------------------------------------
# commands


def run_train(a: argparse.Namespace) -> RunResult:
    """Float training of a timm model on uint8 data; writes ``model.safetensors`` (timm state dict)."""
    from ..training.trainer import FloatWrapper, Trainer

    info = D.init_distributed(a.device)
    try:
        out = _prepare_out(a.out, info)
        resume = _resume_path(a, out)
        torch.manual_seed(a.seed)  # the same initial weights on every rank
        model = _create(a, _num_classes(a)).to(info.device)
        img, mean, std = _model_geometry(model)
        train_ds, eval_ds = _datasets(a, img, mean, std)
        _seed_rank(a.seed, info.rank)
        fmodel = FloatWrapper(model)
        identity = {"model": a.model, "img_size": img, "num_classes": int(getattr(model, "num_classes", 0))}
        trainer = Trainer(fmodel, train_ds, _train_config(a), eval_ds=eval_ds, out_dir=out, save_every=a.save_every,
                          identity=identity, progress=not a.no_progress, num_workers=a.workers, desc="train",
                          title=f"{a.model} on {a.data}: float training")
        history = trainer.fit(resume)
        res = RunResult(fmodel, history, out)
        if info.is_main:
            path = out / "model.safetensors"
            _save_state_dict(model, path, {"model": a.model, "format": "timm-state-dict"})
            res.files = {"model": path, "checkpoint": out / "checkpoint.safetensors", "log": out / "log.jsonl",
                         "plot": out / "accuracy.png"}
            res.summary = {"float_top1": history[-1].get("float_top1") if history else None}
        return res
    finally:
        D.shutdown_distributed(info)


def run_qat(a: argparse.Namespace) -> RunResult:
    """Quantization-aware training: float model -> ``quantize`` -> calibrate -> QAT -> ``model.ivit``."""
    from .. import quant as api
    from ..backends import Engine
    from ..config import QuantConfig
    from ..quant import freeze
    from ..training.trainer import FloatWrapper, Trainer, evaluate_dataset

    info = D.init_distributed(a.device)
    try:
        out = _prepare_out(a.out, info)
        resume = _resume_path(a, out)
        torch.manual_seed(a.seed)
        model = _create(a, _num_classes(a))
        img, mean, std = _model_geometry(model)
        config = QuantConfig.from_json(a.quant_config) if a.quant_config else QuantConfig()
        qmodel = api.quantize(model, config)
        device = info.device
        calib = _calib_batches(a, img) if resume is None or device.type != "cpu" else []
        if device.type != "cpu" and not _int_device_ok(qmodel, calib[0], device):
            if a.device != "auto":
                raise IvitError(f"the integer model cannot run on {device} with this torch build; use --device cpu")
            warnings.warn(f"integer ops unsupported on {device}: training on CPU", RuntimeWarning, stacklevel=1)
            device = torch.device("cpu")
        model.to(device)
        qmodel.to(device)
        train_ds, eval_ds = _datasets(a, img, mean, std)
        fmodel = FloatWrapper(model).eval()
        history: list[dict[str, Any]] = []
        search_report = None
        if resume is None:
            base = evaluate_dataset(fmodel, eval_ds, 2 * a.batch, a.workers, progress=not a.no_progress)
            if a.ptq_search:
                from ..quant.ptq import ptq

                search_report = ptq(qmodel, [x.to(device) for x in calib], search_batches=a.search_batches,
                                    progress=not a.no_progress and info.is_main)
            else:
                api.calibrate(qmodel, [x.to(device) for x in calib], progress=not a.no_progress and info.is_main)
            ptq_res = evaluate_dataset(qmodel, eval_ds, 2 * a.batch, a.workers, progress=not a.no_progress)
            history = [{"epoch": 0, "step": 0, **base, **ptq_res}]
        teacher = fmodel if a.distill else None
        if teacher is None:
            del fmodel
        _seed_rank(a.seed, info.rank)
        identity = {"model": a.model, "arch": qmodel.meta, "quant_config": json.loads(qmodel.config.to_json())}
        trainer = Trainer(qmodel, train_ds, _train_config(a), eval_ds=eval_ds, teacher=teacher, out_dir=out,
                          save_every=a.save_every, identity=identity, history=history,
                          progress=not a.no_progress, num_workers=a.workers, desc="qat",
                          title=f"{a.model} on {a.data}: QAT (integer-only)")
        history = trainer.fit(resume)
        res = RunResult(qmodel, history, out)
        if info.is_main:
            qmodel.eval()
            prog = freeze(qmodel, name=a.model)
            path = out / "model.ivit"
            prog.save(path)
            engine = Engine(prog)
            x = torch.stack([eval_ds[i][0] for i in range(min(len(eval_ds), 2 * a.batch))])
            bitexact = torch.equal(engine(x), qmodel.logits(x.to(device)).cpu())
            first = history[0] if history and history[0].get("epoch") == 0 else {}
            res.files = {"ivit": path, "checkpoint": out / "checkpoint.safetensors", "log": out / "log.jsonl",
                         "plot": out / "accuracy.png"}
            res.summary = {"float_top1": first.get("float_top1"), "ptq_top1": first.get("int_top1"),
                           "qat_top1": history[-1].get("int_top1") if history else None, "bitexact": bitexact,
                           "search": None if search_report is None else search_report.summary()}
        return res
    finally:
        D.shutdown_distributed(info)


def run_ptq(a: argparse.Namespace) -> dict[str, Any]:
    """Calibration-only PTQ with the per-layer search; writes the ``.ivit`` file."""
    from .. import quant as api
    from ..backends import Engine
    from ..config import QuantConfig
    from ..quant import freeze
    from ..quant.ptq import ptq
    from ..training.trainer import evaluate

    out = Path(a.out)
    if not out.parent.is_dir():
        raise IvitError(f"output folder does not exist: {out.parent}")
    device = D.resolve_device(a.device)
    torch.manual_seed(a.seed)
    model = _create(a, _num_classes(a))
    img, _, _ = _model_geometry(model)
    config = QuantConfig.from_json(a.quant_config) if a.quant_config else QuantConfig()
    qmodel = api.quantize(model, config)
    calib = _calib_batches(a, img)
    if not _int_device_ok(qmodel, calib[0], device):
        if a.device != "auto":
            raise IvitError(f"the integer model cannot run on {device} with this torch build; use --device cpu")
        device = torch.device("cpu")
    qmodel.to(device)
    report = ptq(qmodel, [x.to(device) for x in calib], search_params=a.search, search_batches=a.search_batches,
                 balance=a.balance, progress=not a.no_progress)
    prog = freeze(qmodel, name=a.model, extra_meta={"ptq": {"calib_images": sum(len(x) for x in calib),
                                                            "search": bool(a.search)}})
    prog.save(out)
    summary: dict[str, Any] = {"ivit": str(out), "calib_images": sum(len(x) for x in calib),
                               "search": None if report is None else report.summary()}
    if a.report:
        from .._io import write_text_atomic

        write_text_atomic(Path(a.report), json.dumps({"summary": summary, "choices": [] if report is None
                                                      else report.to_json()}, indent=1) + "\n")
    if a.eval:
        from .. import data

        _, eval_ds = _datasets(a, img, (), (), train=False)
        res = evaluate(Engine(prog), data.make_loader(eval_ds, 2 * a.batch, shuffle=False),
                       progress=not a.no_progress, desc="eval (engine)")
        summary["int_top1"] = res["top1"]
        summary["int_top5"] = res["top5"]
        summary["eval_images"] = res["n"]
    return summary


# ---------------------------------------------------------------------------------------------
# argparse


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="timm model name (e.g. deit_small_patch16_224) or a custom size (vit_fmnist)")
    p.add_argument("--data", required=True, help="digits, fashion-mnist, or an ImageNet-layout folder (train/, val/)")
    p.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network access)")
    p.add_argument("--checkpoint", help="local timm state dict (.safetensors, or .pth read with weights_only)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the dataset's)")
    p.add_argument("--img-size", type=int, default=None, help="input size for timm models (default: the model's)")
    p.add_argument("--batch", type=int, default=None, help="images per step and process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="data loader workers (exact --resume needs 0)")
    p.add_argument("--limit-eval", type=int, default=0, help="evaluate on the first N held-out images only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_args(p: argparse.ArgumentParser, recipe: dict[str, Any]) -> None:
    p.add_argument("--out", required=True, help="output folder (checkpoint, logs, plot, result)")
    p.add_argument("--epochs", type=int, default=recipe["epochs"])
    p.add_argument("--lr", type=float, default=recipe["lr"], help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=recipe["weight_decay"])
    p.add_argument("--warmup-epochs", type=float, default=recipe["warmup_epochs"])
    p.add_argument("--label-smoothing", type=float, default=recipe["label_smoothing"])
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--aug", default="auto", choices=["auto", "timm", "light", "none"],
                   help="auto: timm's RandAugment/erasing recipe for folders, pad-crop for digits/fashion-mnist")
    p.add_argument("--limit-train", type=int, default=0, help="train on the first N images only")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoint.safetensors (or the given file)")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="also checkpoint every N steps")
    p.set_defaults(batch_default=recipe["batch"])


def _check(a: argparse.Namespace) -> None:
    if a.batch is None:
        a.batch = getattr(a, "batch_default", 64)
    for name in ("batch", "epochs", "calib_batches", "search_batches"):
        v = getattr(a, name, None)
        if v is not None and v < 1:
            raise IvitError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("save_every", "workers", "limit_train", "limit_eval"):
        if getattr(a, name, 0) and getattr(a, name) < 0:
            raise IvitError(f"--{name.replace('_', '-')} must be >= 0")
    if getattr(a, "lr", 1.0) <= 0:
        raise IvitError("--lr must be > 0")


def _print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    t.add_column("", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    Console(stderr=False).print(t)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _cmd_train(a: argparse.Namespace) -> int:
    _check(a)
    res = run_train(a)
    if res.files:
        last = res.history[-1] if res.history else {}
        _print_summary(f"ivit train: {a.model} on {a.data}",
                       [("epochs", str(last.get("epoch", 0))), ("float32 top-1", _pct(last.get("float_top1"))),
                        ("weights", str(res.files["model"])), ("log", str(res.files["log"]))])
    return 0


def _cmd_qat(a: argparse.Namespace) -> int:
    _check(a)
    res = run_qat(a)
    if res.files:
        s = res.summary
        _print_summary(f"ivit qat: {a.model} on {a.data}",
                       [("float32 top-1", _pct(s["float_top1"])), ("PTQ top-1 (before QAT)", _pct(s["ptq_top1"])),
                        ("QAT top-1 (integer-only)", _pct(s["qat_top1"])),
                        ("engine bit-exact", "yes" if s["bitexact"] else "NO"),
                        ("program", str(res.files["ivit"])), ("log", str(res.files["log"]))])
        return 0 if s["bitexact"] else 1
    return 0


def _cmd_ptq(a: argparse.Namespace) -> int:
    _check(a)
    s = run_ptq(a)
    rows = [("calibration images", str(s["calib_images"])), ("search", s["search"] or "off (fixed parameters)")]
    if "int_top1" in s:
        rows += [(f"top-1 (engine, {s['eval_images']} images)", _pct(s["int_top1"])),
                 ("top-5", _pct(s["int_top5"]))]
    rows.append(("program", s["ivit"]))
    _print_summary(f"ivit ptq: {a.model}", rows)
    return 0


def add_train_commands(sub: Any) -> None:
    """Register ``train``, ``qat`` and ``ptq`` on the ``ivit`` sub-parser."""
    t = sub.add_parser("train", help="float training of a timm model on uint8 data (resumable, torchrun-ready)")
    _model_args(t)
    _run_args(t, FLOAT_RECIPE)
    t.set_defaults(fn=_cmd_train)

    q = sub.add_parser("qat", help="quantization-aware training -> OUT/model.ivit (paper recipe, torchrun-ready)")
    _model_args(q)
    _run_args(q, QAT_RECIPE)
    q.add_argument("--distill", action="store_true", help="distill from the float model (KL on soft labels)")
    q.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    q.add_argument("--distill-tau", type=float, default=1.0, help="distillation temperature")
    q.add_argument("--calib-batches", type=int, default=8, help="calibration batches before QAT")
    q.add_argument("--calib-batch", type=int, default=None, help="calibration batch size (default: --batch)")
    q.add_argument("--ptq-search", action="store_true",
                   help="start QAT from the searched PTQ (LayerNorm balancing, clipping ranges, ShiftExp shifts)")
    q.add_argument("--search-batches", type=int, default=2, help="calibration batches used by the search")
    q.add_argument("--quant-config", default=None, help="QuantConfig as JSON (default: the standard I-ViT widths)")
    q.set_defaults(fn=_cmd_qat)

    p = sub.add_parser("ptq", help="post-training quantization with per-layer search -> .ivit (no training)")
    _model_args(p)
    p.add_argument("-o", "--out", required=True, help="output .ivit file")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-batch", type=int, default=None, help="calibration batch size (default: --batch)")
    p.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                   help="choose clipping ranges and ShiftExp shifts per layer (default: on)")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                   help="with --search: balance LayerNorm outlier channels into the next linear layer (default: on)")
    p.add_argument("--search-batches", type=int, default=2, help="calibration batches used by the search")
    p.add_argument("--eval", action="store_true", help="report top-1 of the .ivit engine on the held-out split")
    p.add_argument("--report", default=None, help="write the per-layer choices as JSON to this file")
    p.add_argument("--quant-config", default=None, help="QuantConfig as JSON")
    p.set_defaults(fn=_cmd_ptq, batch_default=32)
