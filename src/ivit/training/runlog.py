"""Run logs: per-epoch metrics as ``log.jsonl`` and ``log.csv``, and a PNG plot of accuracy per epoch.

The history (a list of per-epoch dicts) lives in the training checkpoint; the files are rewritten
from it atomically after every epoch, so after a crash and ``--resume`` they hold exactly one line
per finished epoch (no duplicates, nothing lost).
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_path, write_text_atomic

__all__ = ["write_logs", "plot_accuracy", "ACCURACY_KEYS"]

#: metric key -> legend label, in plot order
ACCURACY_KEYS: dict[str, str] = {
    "float_top1": "float32",
    "int_top1": "integer-only",
}


def _csv(history: Sequence[dict[str, Any]]) -> str:
    cols: list[str] = []
    for rec in history:
        cols += [k for k in rec if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for rec in history:
        w.writerow({k: rec.get(k, "") for k in cols})
    return buf.getvalue()


def write_logs(out_dir: str | os.PathLike[str], history: Sequence[dict[str, Any]], title: str = "",
               plot: bool = True) -> None:
    """``log.jsonl`` (one JSON object per epoch), ``log.csv`` and ``accuracy.png`` in ``out_dir``."""
    out = Path(out_dir)
    write_text_atomic(out / "log.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
    write_text_atomic(out / "log.csv", _csv(history))
    if plot:
        plot_accuracy(history, out / "accuracy.png", title)


def plot_accuracy(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> bool:
    """Top-1 per epoch, one line per metric of :data:`ACCURACY_KEYS` (a metric with a single point,
    e.g. the float baseline of a QAT run, becomes a dashed horizontal line).  Returns False (with a
    warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping accuracy.png (pip install matplotlib)",
                      stacklevel=2)
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = [r["epoch"] for r in history if "epoch" in r]
    for key, label in ACCURACY_KEYS.items():
        pts = [(r["epoch"], 100 * r[key]) for r in history if r.get(key) is not None]
        if not pts:
            continue
        if len(pts) == 1 and len(epochs) > 1:
            ax.axhline(pts[0][1], linestyle="--", color="gray" if key == "float_top1" else None,
                       label=f"{label} ({pts[0][1]:.2f}%)")
        else:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=f"{label} (last {ys[-1]:.2f}%)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return True
