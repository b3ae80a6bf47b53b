"""Pieces the workflows share: the model a run builds, its data, calibration batches, output folders,
resume, seeds, devices and the frozen program's metadata."""

from __future__ import annotations

import copy
import itertools
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from .. import data
from .._io import atomic_path, check_output_path, sha256_tensors
from ..errors import IvitError
from ..models.base import QModel
from ..models.factory import normalization
from ..training import distributed as D
from ..training.trainer import CHECKPOINT_NAME
from . import recipes
from .spec import SPEC_METADATA_KEY, ModelSpec

__all__ = ["RANDOM_DATA", "RunOptions", "check_positive", "check_nonneg", "resolve_spec", "model_geometry", "datasets",
           "calibration_batches", "prepare_out_dir", "resume_path", "seed_rank", "int_device", "save_state_dict",
           "state_dict_sha256", "first_images", "checked_output", "limit_dataset"]

#: ``--data random``: calibration on random pixels (PTQ only: no labels, no evaluation).
RANDOM_DATA = "random"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What float training and QAT runs share (keyword-only fields of ``TrainRun`` and ``QATRun``).

    Attributes:
        augment: ``auto`` (the dataset's recipe, ``recipes.DATASETS``), ``pad-crop``, ``pad-crop-flip``,
            ``timm`` or ``none``.
        limit_train, limit_eval: use the first N training / held-out images only (0: all).
        resume: None (a new run: an existing checkpoint in the output folder is protected), ``"auto"``
            (continue it if there is one) or a checkpoint file.
        save_every: also checkpoint every N steps (0: at epoch ends only).
        device: ``auto`` (a GPU if there is one), ``cpu`` or ``cuda``.
        workers: data loader workers (exact resume needs 0).
        progress: progress bars (rank 0).
    """

    augment: str = "auto"
    limit_train: int = 0
    limit_eval: int = 0
    resume: str | Path | None = None
    save_every: int = 0
    device: str = "auto"
    workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        recipes.resolve_augment("digits", self.augment)  # a known name
        check_nonneg(self, "limit_train", "limit_eval", "save_every", "workers")


def check_positive(**values: int) -> None:
    """Each value must be an integer >= 1 (one line naming the option otherwise)."""
    _check_ints(1, values)


def check_nonneg(obj: object, *names: str) -> None:
    """Each attribute ``names`` of ``obj`` must be an integer >= 0 (one line naming the option otherwise)."""
    _check_ints(0, {n: getattr(obj, n) for n in names})


def _check_ints(lo: int, values: dict[str, int]) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise IvitError(f"{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")


def _check_data_name(name: str, allow_random: bool = False) -> None:
    if name == RANDOM_DATA and not allow_random:
        raise IvitError("--data random only calibrates (ivit ptq / quantize): training and evaluation need "
                        f"labelled data ({', '.join(data.BUILTIN_DATASETS)} or an ImageNet-layout folder)")


def resolve_spec(spec: ModelSpec, data_name: str) -> ModelSpec:
    """The spec a run builds: the classifier sized for the dataset (unless given), and the dataset's
    normalization (``recipes.DATASETS``) for a model trained from scratch on a built-in dataset."""
    if spec.num_classes is None and "num_classes" not in spec.model_args and data_name != RANDOM_DATA:
        spec = replace(spec, num_classes=data.num_classes(data.build_dataset(data_name, "test", 8)))
    rec = recipes.data_recipe(data_name)
    if rec is not None and not spec.pretrained and spec.checkpoint is None and spec.mean is None:
        spec = replace(spec, mean=rec.mean, std=rec.std)
    return spec


def model_geometry(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(square input size, mean, std) of a float timm model."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise IvitError(f"only square inputs are supported, the model takes {size}")
    mean, std = normalization(model)
    return int(size[0]), mean, std


def limit_dataset(ds: Dataset, n: int) -> Dataset:
    """The first ``n`` items of ``ds`` (0: all)."""
    return Subset(ds, range(min(n, len(ds)))) if n else ds


def datasets(data_name: str, img: int, mean: tuple[float, ...], std: tuple[float, ...], augment: str = "auto",
             limit_train: int = 0, limit_eval: int = 0, train: bool = True) -> tuple[Dataset | None, Dataset]:
    """(augmented training set or None, held-out set), cut to the first ``limit_*`` images (0: all)."""
    _check_data_name(data_name)
    eval_ds = limit_dataset(data.build_dataset(data_name, "test", img), limit_eval)
    if not train:
        return None, eval_ds
    train_ds = data.build_dataset(data_name, "train", img)
    decoded = isinstance(train_ds, data.ImageFolderDataset) and recipes.resolve_augment(
        data_name, augment) is recipes.Augment.TIMM
    tf = recipes.augmentation(data_name, augment, img, mean, std, from_tensor=not decoded)
    if decoded:
        train_ds.preprocess = tf  # the timm recipe crops the decoded image itself (replaces the eval resize/crop)
    else:
        train_ds.transform = tf
    return limit_dataset(train_ds, limit_train), eval_ds


def calibration_batches(data_name: str, img: int, images: int, batch: int, seed: int,
                        in_chans: int = 3) -> list[Tensor]:
    """``images`` calibration images in batches of ``batch`` (the last one may be smaller): the first ones of a
    seeded shuffle of the training set without augmentation (the same on every rank), or random pixels for
    ``--data random``."""
    check_positive(calib_images=images, calib_batch=batch)
    sizes = [batch] * (images // batch) + ([images % batch] if images % batch else [])
    if data_name == RANDOM_DATA:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 256, (n, in_chans, img, img), dtype=torch.uint8, generator=g) for n in sizes]
    ds = data.build_dataset(data_name, "train", img)
    if len(ds) < images:
        raise IvitError(f"{data_name} has {len(ds)} training images, fewer than the {images} calibration images "
                        "asked for (--calib-images)")
    out = [x for x, _ in itertools.islice(data.make_loader(ds, batch, shuffle=True, seed=seed), len(sizes))]
    if images % batch:
        out[-1] = out[-1][: images % batch]
    return out


def first_images(ds: Dataset, n: int) -> Tensor:
    """The first ``n`` images of ``ds`` (all when ``n`` is 0) as one uint8 batch."""
    n = len(ds) if n == 0 else min(n, len(ds))
    return torch.stack([ds[i][0] for i in range(n)])


def prepare_out_dir(out: str | Path, info: D.DistInfo) -> Path:
    """A run's output folder: created by rank 0 (its parent must exist), before any work."""
    p = Path(out)
    if info.is_main:
        if p.exists() and not p.is_dir():
            raise IvitError(f"output folder {p} exists and is not a folder")
        if not (p.parent if str(p.parent) else Path(".")).is_dir():
            raise IvitError(f"output folder's parent does not exist: {p.parent}")
        p.mkdir(exist_ok=True)
    D.barrier()
    return p


def resume_path(resume: str | Path | None, out: Path | None, verbose: bool = True) -> Path | None:
    """``None``: a new run (an existing checkpoint in ``out`` is protected); ``"auto"``: continue ``out``'s
    checkpoint if there is one (``verbose``: say so when there is none); a path: continue that checkpoint."""
    ck = None if out is None else out / CHECKPOINT_NAME
    if resume is None:
        if ck is not None and ck.exists():
            raise IvitError(f"{out} already holds a training checkpoint: pass --resume to continue it, "
                            "or choose a new output folder")
        return None
    if resume == "auto":
        if ck is not None and ck.exists():
            return ck
        if verbose and D.rank() == 0 and ck is not None:
            print(f"ivit: no checkpoint in {out} yet: starting a new run", file=sys.stderr)
        return None
    p = Path(resume)
    if not p.is_file():
        raise IvitError(f"--resume checkpoint not found: {p}")
    return p


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank random streams (augmentation) after the shared model initialization."""
    s = seed + 1 + 1000 * rank
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def int_device(qmodel: QModel, x: Tensor, device: torch.device, requested: str) -> torch.device:
    """``device`` if the integer forward runs there (integer GEMMs need backend support), else CPU when the
    device was chosen automatically; an explicit device that cannot run it is one line."""
    if device.type == "cpu":
        return device
    probe = copy.deepcopy(qmodel).to(device).train()  # a copy: the probe must not touch the observers
    try:
        with torch.no_grad():
            probe(x[:1].to(device))
        return device
    except (RuntimeError, NotImplementedError):
        if requested != "auto":
            raise IvitError(f"the integer model cannot run on {device} with this torch build; use --device cpu") \
                from None
        import warnings

        warnings.warn(f"integer ops unsupported on {device}: running on CPU", RuntimeWarning, stacklevel=2)
        return torch.device("cpu")
    finally:
        del probe


def save_state_dict(model: nn.Module, path: Path, spec: ModelSpec) -> None:
    """A timm state dict as safetensors (atomically), with the spec that rebuilds the network recorded in the
    metadata (``--checkpoint`` then names the geometry it expects, and reuses the normalization)."""
    from safetensors.torch import save_file

    record = replace(spec, checkpoint=None, pretrained=False)
    meta = {"model": spec.name, "format": "timm-state-dict", SPEC_METADATA_KEY: record.to_json()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): identifies its weights whatever file
    format they came from."""
    return sha256_tensors(model.state_dict(), sort=False)


def checked_output(path: str | Path | None, what: str) -> Path | None:
    """``check_output_path`` for an optional output file."""
    return None if path is None else check_output_path(path, what)

