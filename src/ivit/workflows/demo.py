"""``ivit demo``: the embedded default, end to end, with no downloads - the workflows in a row.

digits (scikit-learn) -> ``run_train`` (a tiny float model, ``OUT/float``) -> ``run_qat`` (calibration +
QAT, ``OUT/qat``) -> ``OUT/<model>.ivit`` -> ``run_eval`` (accuracy of the engine on the whole test set) ->
bit-exactness of the engine against the PyTorch integer model -> integer-only proof -> latency float vs
integer engine -> a table and ``OUT/report.json``.  Rerunning the same command reuses the finished runs
(``resume="auto"``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .._io import check_output_path, write_text_atomic
from ..bench import median_ms
from ..errors import IvitError
from ..training.trainer import CHECKPOINT_NAME, TrainConfig
from ..verify import verify_integer_only
from . import recipes
from .evaluate import EvalRun, open_program, run_eval
from .ptq import PTQRun, run_ptq
from .qat import QATRun, run_qat
from .spec import ModelSpec
from .train import TrainRun, run_train

__all__ = ["DemoRun", "DemoResult", "run_demo", "print_report"]

_DATA = "digits"
_IMG = 16


@dataclass(frozen=True)
class DemoRun:
    """The demo: ``model`` is ``vit`` or ``swin`` (``recipes.DEMO_MODELS``); ``float_training`` and ``qat``
    are its schedules (``recipes.DEMO_FLOAT`` / ``recipes.DEMO_QAT``; ``qat=None``: PTQ only);
    ``bench_batch`` images per latency call."""

    model: str = "vit"
    out_dir: str | os.PathLike[str] = "ivit-demo"
    float_training: TrainConfig = recipes.DEMO_FLOAT
    qat: TrainConfig | None = recipes.DEMO_QAT
    bench_batch: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model not in recipes.DEMO_MODELS:
            raise IvitError(f"unknown demo model {self.model!r}; choose from {', '.join(recipes.DEMO_MODELS)}")
        if not isinstance(self.bench_batch, int) or self.bench_batch < 1:
            raise IvitError("bench-batch must be >= 1")

    def with_options(self, epochs: int | None = None, qat_epochs: int | None = None, batch: int | None = None,
                     seed: int | None = None) -> DemoRun:
        """A copy with the float/QAT epochs, the batch size and the seed replaced where given."""
        common = {k: v for k, v in (("batch_size", batch), ("seed", seed)) if v is not None}
        f = replace(self.float_training, **common, **({"epochs": epochs} if epochs is not None else {}))
        q = self.qat if self.qat is not None else recipes.DEMO_QAT
        q = None if qat_epochs == 0 else replace(q, **common, **({"epochs": qat_epochs} if qat_epochs else {}))
        return replace(self, float_training=f, qat=q)


@dataclass
class DemoResult:
    """The demo's numbers (``report``, also in ``OUT/report.json``) and where its files are."""

    report: dict[str, Any]
    out_dir: Path
    program: Path

    @property
    def ok(self) -> bool:
        return bool(self.report["bitexact"] and self.report["integer_only"])


def run_demo(cfg: DemoRun = DemoRun()) -> DemoResult:
    """Run the demo and return its report (also written to ``OUT/report.json``)."""
    name = recipes.DEMO_MODELS[cfg.model]
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise IvitError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ivit_path = check_output_path(out / f"{name}.ivit", ".ivit output")
    t_start = time.time()

    spec = ModelSpec(name)
    ft = run_train(TrainRun(spec, _DATA, out / "float", train=cfg.float_training, resume="auto", device="cpu",
                            progress=cfg.progress))
    if ft.steps_run:  # the float model changed: an older QAT checkpoint no longer applies
        (out / "qat" / CHECKPOINT_NAME).unlink(missing_ok=True)
    trained = replace(spec, checkpoint=str(ft.files["model"]))
    if cfg.qat is not None:
        q = run_qat(QATRun(trained, _DATA, out / "qat", output=ivit_path, train=cfg.qat, resume="auto",
                           bitexact_images=0, device="cpu", progress=cfg.progress))
        ptq_top1, bitexact = q.ptq_top1, q.bitexact
    else:
        p = run_ptq(PTQRun(trained, _DATA, ivit_path, search=False, evaluate=True, bitexact_images=0, device="cpu",
                           progress=cfg.progress))
        ptq_top1, bitexact = p.top1, p.bitexact
    ev = run_eval(EvalRun(ivit_path, _DATA, batch=256, progress=cfg.progress))
    engine = open_program(ivit_path)
    check = verify_integer_only(engine)

    from .. import data

    x_bench = data.digits("test", _IMG).images[: cfg.bench_batch]
    report = {
        "model": name,
        "dataset": "sklearn-digits",
        "img_size": _IMG,
        "n_test": ev.n,
        "fp32_top1": ft.float_top1,
        "ptq_top1": ptq_top1,
        "int_top1": ev.top1,
        "bitexact": bool(bitexact),
        "integer_only": check.ok,
        "fp32_ms": median_ms(ft.model.eval(), x_bench),
        "int_ms": median_ms(engine, x_bench),
        "batch": int(x_bench.shape[0]),
        "threads": torch.get_num_threads(),
        "epochs": cfg.float_training.epochs,
        "qat_epochs": 0 if cfg.qat is None else cfg.qat.epochs,
        "ivit_file": str(ivit_path),
        "ivit_bytes": ivit_path.stat().st_size,
        "seconds": time.time() - t_start,
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return DemoResult(report, out, ivit_path)


def print_report(report: dict[str, Any]) -> None:
    """The demo's summary table."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ivit demo: {report['model']} on {report['dataset']} ({report['n_test']} test images)")
    t.add_column("")
    t.add_column("float32", justify="right")
    t.add_column("integer-only (.ivit engine)", justify="right")
    t.add_row("top-1", f"{report['fp32_top1'] * 100:.2f}%", f"{report['int_top1'] * 100:.2f}%")
    t.add_row(f"latency, batch {report['batch']}", f"{report['fp32_ms']:.2f} ms", f"{report['int_ms']:.2f} ms")
    t.add_row("bit-exact vs PyTorch int model", "", "yes" if report["bitexact"] else "NO")
    t.add_row("integer-only program", "", "yes" if report["integer_only"] else "NO")
    Console().print(t)
    print(f"PTQ only (before QAT): {report['ptq_top1'] * 100:.2f}%   file: {report['ivit_file']} "
          f"({report['ivit_bytes'] / 1024:.0f} KiB)   total {report['seconds']:.0f} s")
