"""``ivit demo``: the embedded default, end to end, with no downloads.

digits (scikit-learn) -> train a small float model -> calibrate + QAT -> freeze to ``.ivit`` ->
accuracy float vs integer-only over the whole test set -> bit-exactness of the engine against the
PyTorch integer model -> latency float vs integer engine -> a table and ``report.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .. import data
from .._io import write_text_atomic
from ..backends import Engine
from ..bench import median_ms
from ..errors import IvitError
from ..ir.program import load_program
from ..models import create_model
from ..quant import calibrate, freeze, quantize
from ..training.trainer import FloatWrapper, TrainConfig, evaluate, predict_int, train
from ..verify import verify_integer_only

__all__ = ["DEMO_MODELS", "run_demo", "write_json_atomic"]

#: demo kind -> (model name, image size, float epochs, float lr, QAT epochs, QAT lr)
DEMO_MODELS: dict[str, tuple[str, int, int, float, int, float]] = {
    "vit": ("vit_digits", 16, 40, 2e-3, 2, 5e-5),
    "swin": ("swin_digits", 16, 40, 2e-3, 2, 5e-5),
}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename (never a half-written file)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def run_demo(kind: str = "vit", out_dir: str | os.PathLike[str] = "ivit-demo", epochs: int | None = None,
             qat_epochs: int | None = None, batch: int = 64, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run the demo and return the report (also written to ``out_dir/report.json``)."""
    if kind not in DEMO_MODELS:
        raise IvitError(f"unknown demo model {kind!r}; choose from {', '.join(DEMO_MODELS)}")
    name, img, f_epochs, f_lr, q_epochs, q_lr = DEMO_MODELS[kind]
    epochs = f_epochs if epochs is None else epochs
    qat_epochs = q_epochs if qat_epochs is None else qat_epochs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t_start = time.time()

    train_ds = data.digits("train", img)
    test_ds = data.digits("test", img)
    test_loader = data.make_loader(test_ds, 256, shuffle=False)

    model = create_model(name)
    fmodel = FloatWrapper(model)
    train_ds.transform = data.train_augment(img, flip=False)
    train(fmodel, data.make_loader(train_ds, batch, shuffle=True, seed=seed),
          TrainConfig(epochs=epochs, lr=f_lr, warmup_epochs=1, seed=seed), progress=progress, desc="float")
    fp32 = evaluate(fmodel, test_loader, progress=progress, desc="eval fp32")

    qmodel = quantize(model)
    train_ds.transform = None
    calibrate(qmodel, data.make_loader(train_ds, batch, shuffle=True, seed=seed), max_batches=8, progress=progress)
    ptq = evaluate(predict_int(qmodel), test_loader, progress=progress, desc="eval ptq")
    if qat_epochs > 0:
        train_ds.transform = data.train_augment(img, flip=False)
        train(qmodel, data.make_loader(train_ds, batch, shuffle=True, seed=seed + 1),
              TrainConfig(epochs=qat_epochs, lr=q_lr, weight_decay=0.0, seed=seed), progress=progress, desc="qat")
    qmodel.eval()

    program = freeze(qmodel, name=name)
    ivit_path = out / f"{name}.ivit"
    program.save(ivit_path)
    engine = Engine(load_program(ivit_path))

    # integer accuracy from the engine, and its bit-exactness against the PyTorch integer model
    bitexact = True
    int_correct = 0
    n = 0
    for x, y in test_loader:
        e_logits = engine(x)
        m_logits = qmodel.logits(x)
        bitexact &= torch.equal(e_logits, m_logits)
        int_correct += int((e_logits.argmax(-1) == y).sum())
        n += y.shape[0]
    int_top1 = int_correct / n
    check = verify_integer_only(engine)

    x_bench = test_ds.images[:batch]
    fp32_ms = median_ms(fmodel, x_bench)
    int_ms = median_ms(engine, x_bench)

    report = {
        "model": name,
        "dataset": "sklearn-digits",
        "img_size": img,
        "n_test": n,
        "fp32_top1": fp32["top1"],
        "ptq_top1": ptq["top1"],
        "int_top1": int_top1,
        "bitexact": bool(bitexact),
        "integer_only": check.ok,
        "fp32_ms": fp32_ms,
        "int_ms": int_ms,
        "batch": int(x_bench.shape[0]),
        "threads": torch.get_num_threads(),
        "epochs": epochs,
        "qat_epochs": qat_epochs,
        "ivit_file": str(ivit_path),
        "ivit_bytes": ivit_path.stat().st_size,
        "seconds": time.time() - t_start,
    }
    write_json_atomic(out / "report.json", report)
    return report


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
