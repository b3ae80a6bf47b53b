"""The issue's accuracy check, end to end on scikit-learn's digits (no downloads): the demo, which is the
workflows in a row (``run_train`` -> ``run_qat`` -> ``run_eval``).

A small ViT trained in float reaches at least 93% test accuracy; after calibration and a short QAT its
integer-only program (run by the engine from the saved ``.ivit`` file) is within 1 point of it, bit-exact
against the PyTorch integer model on every test image, and proven integer-only (``recipes.DEMO_FLOAT``: 40
float epochs, ``recipes.DEMO_QAT``: 2 QAT epochs).  Rerunning reuses the finished runs.

Runs on one thread: the numbers are then reproducible, and on shared cores it is much faster than two.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import ivit
from ivit.workflows.demo import DemoRun, run_demo


def test_digits_float_then_integer_within_one_point(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        res = run_demo(DemoRun("vit", tmp_path, progress=False))
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        again = run_demo(DemoRun("vit", tmp_path, progress=False))  # the finished runs are reused
        rerun = time.perf_counter() - t1
    finally:
        torch.set_num_threads(threads)
    report = res.report
    assert report["model"] == "vit_digits" and report["n_test"] == 360
    assert report["fp32_top1"] >= 0.93, report
    assert report["int_top1"] >= report["fp32_top1"] - 0.01, report
    assert report["bitexact"] is True and report["integer_only"] is True and res.ok
    assert (report["epochs"], report["qat_epochs"]) == (40, 2)
    # the report on disk is the one returned, and the .ivit file it names is a loadable integer program
    assert json.loads((tmp_path / "report.json").read_text()) == again.report
    assert {k: again.report[k] for k in ("fp32_top1", "ptq_top1", "int_top1")} == {
        k: report[k] for k in ("fp32_top1", "ptq_top1", "int_top1")}
    assert rerun < seconds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "qat", "report.json", "vit_digits.ivit"]
    engine = ivit.load(report["ivit_file"])
    assert engine.meta["model"] == "vit_digits" and engine.meta["input_shape"] == [3, 16, 16]
    assert engine.meta["model_args"] == {"num_classes": 10}
    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    assert engine(x).dtype == torch.int32
    print(f"digits demo: fp32 {report['fp32_top1']:.4f}, int {report['int_top1']:.4f}, {seconds:.0f} s "
          f"(rerun {rerun:.0f} s)")


def test_demo_ptq_only(tmp_path: Path) -> None:
    res = run_demo(DemoRun("vit", tmp_path, progress=False).with_options(epochs=1, qat_epochs=0))
    assert res.report["qat_epochs"] == 0 and res.report["bitexact"] and res.report["int_top1"] == res.report["ptq_top1"]
    assert not (tmp_path / "qat").exists()
