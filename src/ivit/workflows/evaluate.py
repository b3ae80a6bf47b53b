"""Evaluate a frozen program: top-1 / top-5 of the integer engine on a dataset (``ivit eval``).

Also the pieces every workflow uses to open and run a ``.ivit`` file: any failure while loading, planning
or running a loaded program is one ``ProgramError`` line naming the file (``invalid program in FILE: ...``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import data
from ..backends import Engine
from ..errors import IvitError
from ..ir.limits import Limits
from ..ir.program import Program, load_program
from ..ir.types import ProgramError
from ..models.base import QModel
from ..training.trainer import evaluate
from .common import check_nonneg, check_positive, datasets, limit_dataset

__all__ = ["EvalRun", "EvalResult", "run_eval", "open_program", "program_errors", "engine_accuracy"]


@contextmanager
def program_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn any failure of a loaded program into one ``ProgramError`` line naming ``path`` (user errors such
    as a bad batch size stay what they are)."""
    try:
        yield
    except ProgramError as e:
        msg = str(e)
        if str(path) in msg:
            raise
        raise ProgramError(f"invalid program in {path}: {msg}") from None
    except IvitError:
        raise
    except (MemoryError, RecursionError) as e:
        raise ProgramError(f"invalid program in {path}: {type(e).__name__} while running it") from None
    except Exception as e:  # noqa: BLE001 - whatever a program makes a kernel raise is a defect of the program
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ProgramError(f"invalid program in {path}: {type(e).__name__}: {msg[:300]}") from None


def open_program(path: str | os.PathLike[str], backend: str | None = None, limits: Limits | None = None,
                 device: str | torch.device = "cpu") -> Engine:
    """``ivit.load`` with every failure (reading, validating, planning) as one line naming ``path``."""
    with program_errors(path):
        prog = load_program(path, limits)
    return engine_for(prog, path, backend, limits, device)


def engine_for(prog: Program, path: str | os.PathLike[str], backend: str | None = None,
               limits: Limits | None = None, device: str | torch.device = "cpu") -> Engine:
    """An ``Engine`` for a program read from ``path`` (planning failures name the file)."""
    with program_errors(path):
        return Engine(prog, backend=backend, device=device, limits=limits)


def engine_accuracy(engine: Engine, ds: Dataset, batch: int = 128, progress: bool = False,
                    qmodel: QModel | None = None, bitexact_images: int = 0,
                    path: str | os.PathLike[str] = "the program", desc: str = "eval (engine)") -> dict[str, Any]:
    """Top-1/top-5 of the engine's int32 logits over ``ds``; with ``qmodel``, also whether the engine's
    logits equal the PyTorch integer model's (``torch.equal``) on the first ``bitexact_images`` images (0: all).

    Returns ``{"top1", "top5", "n"}`` plus ``"bitexact"`` and ``"bitexact_images"`` with ``qmodel``.
    """
    state = {"checked": 0, "exact": True}
    if qmodel is not None:
        qmodel.eval()
        qdev = next(qmodel.parameters()).device

    def predict(x: Tensor) -> Tensor:
        with program_errors(path):
            logits = engine(x)
        if qmodel is not None and (bitexact_images == 0 or state["checked"] < bitexact_images):
            k = x.shape[0] if bitexact_images == 0 else min(x.shape[0], bitexact_images - state["checked"])
            state["exact"] &= torch.equal(logits[:k], qmodel.logits(x[:k].to(qdev)).cpu())
            state["checked"] += k
        return logits

    res = evaluate(predict, data.make_loader(ds, batch, shuffle=False), progress=progress, desc=desc)
    if qmodel is not None:
        res.update(bitexact=bool(state["exact"]), bitexact_images=int(state["checked"]))
    return res


@dataclass(frozen=True)
class EvalRun:
    """``ivit eval``: accuracy of a ``.ivit`` program's integer engine.

    Attributes:
        program: the ``.ivit`` file.
        data: ``digits``, ``fashion-mnist`` or an ImageNet-layout folder (its ``val/``).
        split: ``test`` (= ``val``) or ``train``.
        batch: images per engine call.
        limit_eval: evaluate the first N images only (0: all).
        backend: engine backend (default: the engine's).
        limits: resource limits for loading the program.
        progress: a progress bar.
    """

    program: str | Path
    data: str
    split: str = "test"
    batch: int = 64
    limit_eval: int = 0
    backend: str | None = None
    limits: Limits = field(default_factory=Limits)
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive(batch=self.batch)
        if self.split not in ("train", "test", "val"):
            raise IvitError(f"unknown split {self.split!r}: expected train, test or val")
        check_nonneg(self, "limit_eval")


@dataclass
class EvalResult:
    """Top-1 / top-5 (fractions) over ``n`` images, and what was evaluated."""

    top1: float
    top5: float
    n: int
    program: Path
    model: str
    backend: str


def run_eval(cfg: EvalRun) -> EvalResult:
    """Load the program (validated completely), build the dataset at its input size, evaluate the engine."""
    from .spec import spec_from_program

    engine = open_program(cfg.program, cfg.backend, cfg.limits)
    c, h, w = engine.program.input_shape
    if h != w:
        raise IvitError("eval supports square inputs only")
    if c != 3:
        raise IvitError(f"the program takes {c}-channel images; the datasets are RGB")
    if cfg.split == "train":
        ds: Dataset = limit_dataset(data.build_dataset(cfg.data, "train", h), cfg.limit_eval)
    else:
        _, ds = datasets(cfg.data, h, (), (), limit_eval=cfg.limit_eval, train=False)
    n_cls = data.num_classes(ds)
    if n_cls > engine.num_classes:
        raise IvitError(f"dataset has {n_cls} classes but the model predicts {engine.num_classes}")
    res = engine_accuracy(engine, ds, cfg.batch, cfg.progress, path=cfg.program)
    try:
        model = spec_from_program(engine.meta).describe()
    except (IvitError, KeyError, TypeError, ValueError):
        model = str(engine.meta.get("model"))
    return EvalResult(res["top1"], res["top5"], res["n"], Path(cfg.program), model, engine.backend)
