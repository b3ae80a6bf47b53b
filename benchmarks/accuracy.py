"""Accuracy of integer-only models on Fashion-MNIST: FP32 vs PTQ vs QAT, with the engine's bit-exact check.

For each model (a small ViT and a small Swin, sized for a 2-core CPU):

1. train the float timm model from scratch with ``ivit.run_train`` (the float-training recipe, here 4
   epochs; Fashion-MNIST's augmentation recipe: pad-crop + flip), resumable: rerunning the command
   continues an interrupted benchmark from its last checkpoint;
2. FP32 top-1 on the 10,000 test images;
3. PTQ with fixed parameters: ``ivit.run_ptq(search=False)`` (running min/max, ShiftExp n from
   ``QuantConfig``), frozen to a ``.ivit`` program, accuracy from the integer engine;
4. PTQ with the per-layer search (``ivit.run_ptq``: LayerNorm balancing, clipping ranges, ShiftExp shifts);
5. QAT from the fixed-parameter calibration with ``ivit.run_qat`` (the QAT recipe with a short schedule:
   1 epoch over 30,000 images, lr 5e-5, no weight decay), frozen likewise;
6. (demonstration) PTQ of the same float model after a function-preserving injection of LayerNorm
   outlier channels, with fixed parameters vs with the search.

Every step is a workflow of ``ivit.workflows`` (the same code as ``ivit train`` / ``ptq`` / ``qat`` / ``eval``).

Every integer top-1 comes from the ``.ivit`` engine's int32 logits, and each program's engine logits
are compared with ``torch.equal`` against the PyTorch integer model (``bitexact``).  Results go to
``benchmarks/results/accuracy.{json,md}`` (``accuracy_quick.*`` with ``--quick``) and per-model
plots ``benchmarks/results/accuracy_<model>.png``.

Full run (about an hour on 2 idle cores; the README quotes this command)::

    OMP_NUM_THREADS=2 python benchmarks/accuracy.py

Smoke test (a few minutes)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import Subset

import ivit
from ivit import data, recipes
from ivit._io import write_text_atomic
from ivit.training.runlog import plot_accuracy
from ivit.training.trainer import CHECKPOINT_NAME, FloatWrapper, evaluate_dataset
from ivit.workflows.common import save_state_dict

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class BenchModel:
    """A benchmark model: its label, the float network (``ivit.ModelSpec``), a description, and the attention
    probability modes (``QuantConfig.probs``) its integer versions are measured with (the first is the
    default; the others share the float model and get their own rows)."""

    label: str
    spec: ivit.ModelSpec
    description: str
    probs: tuple[str, ...] = ("rel8",)


MODELS: dict[str, BenchModel] = {
    "vit": BenchModel("ViT", ivit.ModelSpec("vit_fmnist"),
                      "ViT: 28x28, patch 4 (49+1 tokens), depth 6, width 128, 4 heads, MLP 2x"),
    "swin": BenchModel("Swin", ivit.ModelSpec("swin_digits", dict(img_size=28, patch_size=2, window_size=7,
                                                                  embed_dim=64, depths=[2, 2], num_heads=[2, 4],
                                                                  mlp_ratio=2.0, num_classes=10)),
                       "Swin: 28x28, patch 2 (14x14 tokens), window 7, depths 2+2, widths 64/128, MLP 2x"),
    # 197 tokens, as every DeiT/ViT at 224x224: where the I-ViT Shiftmax's 8-bit absolute probabilities collapse
    "vit197": BenchModel("ViT-197", ivit.ModelSpec("vit_fmnist", dict(img_size=28, patch_size=2, embed_dim=64, depth=4,
                                                                      num_heads=4, mlp_ratio=2.0, num_classes=10)),
                         "ViT-197: 28x28, patch 2 (196+1 tokens), depth 4, width 64, 4 heads, MLP 2x",
                         probs=("rel8", "shiftmax8")),
}
DATA = "fashion-mnist"


@dataclass
class Settings:
    """The benchmark's schedules: the recipes of ``ivit.recipes`` with shorter training (and smaller data with
    ``--quick``).  Calibration is the PTQ recipe's (512 images, the search on 128) in the full run."""

    float_epochs: int
    float_lr: float
    qat_epochs: int
    qat_lr: float
    batch: int
    calib_images: int
    search_images: int
    limit_train: int
    limit_test: int
    qat_limit_train: int
    bitexact_images: int
    distill: bool
    outlier_scale: float = 64.0


#: About an hour on 2 idle cores (~1.8 h on one busy core): 4 float epochs over the 60,000 training images,
#: QAT over 30,000 of them, every integer program evaluated on the 10,000 test images.
FULL = Settings(float_epochs=4, float_lr=recipes.FLOAT_TRAINING.lr, qat_epochs=1, qat_lr=5e-5,
                batch=recipes.FLOAT_TRAINING.batch_size, calib_images=recipes.CALIBRATION_IMAGES,
                search_images=recipes.SEARCH_IMAGES, limit_train=0, limit_test=0, qat_limit_train=30000,
                bitexact_images=2000, distill=False)
QUICK = Settings(float_epochs=2, float_lr=2e-3, qat_epochs=1, qat_lr=5e-5, batch=64, calib_images=256,
                 search_images=64, limit_train=2048, limit_test=512, qat_limit_train=1024, bitexact_images=256,
                 distill=False)


def inject_layernorm_outliers(model: torch.nn.Module, scale: float, channels: int = 2, seed: int = 0) -> None:
    """Give every ``norm1``/``norm2`` LayerNorm ``channels`` outlier channels, float function unchanged:
    ``gamma_c, beta_c *= scale`` and the next linear layer's ``W[:, c] /= scale``.  This mimics the
    systematic post-LayerNorm outlier channels of pretrained DeiT-B / ViT-B that make PTQ with fixed
    per-tensor ranges collapse."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for norm_name, lin in (("norm1", getattr(getattr(m, "attn", None), "qkv", None)),
                                   ("norm2", getattr(getattr(m, "mlp", None), "fc1", None))):
                norm = getattr(m, norm_name, None)
                if isinstance(norm, torch.nn.LayerNorm) and isinstance(lin, torch.nn.Linear):
                    ch = torch.randperm(norm.weight.shape[0], generator=g)[:channels]
                    norm.weight[ch] *= scale
                    norm.bias[ch] *= scale
                    lin.weight[:, ch] /= scale


def run_model(key: str, s: Settings, out: Path, progress: bool, log: Console) -> list[dict[str, Any]]:
    """One row per attention mode of the model (the float model is trained once)."""
    bm = MODELS[key]
    rows = []
    for i, probs in enumerate(bm.probs):
        rows.append(run_variant(key, probs, s, out, progress, log, outliers=i == 0, plot=i == 0))
    return rows


def run_variant(key: str, probs: str, s: Settings, out: Path, progress: bool, log: Console, outliers: bool,
                plot: bool) -> dict[str, Any]:
    bm = MODELS[key]
    base_dir = out / "runs" / key
    run_dir = base_dir if probs == bm.probs[0] else base_dir / probs
    run_dir.mkdir(parents=True, exist_ok=True)
    quant = ivit.QuantConfig(probs=probs)
    label = bm.label if len(bm.probs) == 1 else f"{bm.label} ({probs})"
    row: dict[str, Any] = {"model": label, "description": bm.description, "probs": probs}
    times: dict[str, float] = {}
    common = dict(device="cpu", progress=progress)
    evals = dict(evaluate=True, limit_eval=s.limit_test, eval_batch=4 * s.batch, bitexact_images=s.bitexact_images)
    calib = dict(calib_images=s.calib_images, calib_batch=recipes.CALIBRATION_BATCH)

    # 1-2. float training (resumes an interrupted benchmark)
    t0 = time.time()
    fcfg = replace(recipes.FLOAT_TRAINING, epochs=s.float_epochs, lr=s.float_lr, batch_size=s.batch,
                   warmup_epochs=min(1.0, s.float_epochs / 4))
    ft = ivit.run_train(ivit.TrainRun(bm.spec, DATA, base_dir / "float", train=fcfg, limit_train=s.limit_train,
                                      limit_eval=s.limit_test, resume="auto", **common))
    if ft.steps_run:  # the float model changed: an older QAT checkpoint no longer applies
        (run_dir / "qat" / CHECKPOINT_NAME).unlink(missing_ok=True)
    row["params"] = sum(p.numel() for p in ft.model.parameters())
    row["fp32"] = ft.float_top1
    weights = replace(ft.spec, checkpoint=str(ft.files["model"]))
    times["float_train_s"] = round(time.time() - t0, 1)
    log.print(f"{label}: FP32 top-1 {row['fp32'] * 100:.2f}% ({times['float_train_s']:.0f} s)")

    # 3. PTQ with fixed parameters
    t0 = time.time()
    res = ivit.run_ptq(ivit.PTQRun(weights, DATA, run_dir / "ptq_fixed.ivit", search=False, quant=quant, **calib,
                                   **evals, **common))
    row["ptq_fixed"], row["bitexact_ptq_fixed"] = res.top1, res.bitexact
    times["ptq_fixed_s"] = round(time.time() - t0, 1)
    log.print(f"{label}: PTQ (fixed parameters) top-1 {res.top1 * 100:.2f}% bit-exact {res.bitexact}")

    # 4. PTQ with the per-layer search (LayerNorm balancing, clipping ranges, ShiftExp shifts)
    t0 = time.time()
    res = ivit.run_ptq(ivit.PTQRun(weights, DATA, run_dir / "ptq.ivit", search_images=s.search_images, quant=quant,
                                   report=run_dir / "ptq_search.json", **calib, **evals, **common))
    row["ptq"], row["bitexact_ptq"] = res.top1, res.bitexact
    row["search"] = res.search.summary() if res.search is not None else None
    times["ptq_search_total_s"] = round(time.time() - t0, 1)
    log.print(f"{label}: PTQ (searched) top-1 {res.top1 * 100:.2f}% bit-exact {res.bitexact}; {row['search']}")

    # 4b. the same float model with LayerNorm outlier channels (float function unchanged): fixed vs searched
    if s.outlier_scale > 1 and outliers:
        t0 = time.time()
        omodel = copy.deepcopy(ft.model.model)
        inject_layernorm_outliers(omodel, s.outlier_scale)
        opath = run_dir / "float_outliers.safetensors"
        save_state_dict(omodel, opath, ft.spec)
        img = omodel.patch_embed.img_size[0]
        test = data.build_dataset(DATA, "test", img)
        test = Subset(test, range(min(s.limit_test, len(test)))) if s.limit_test else test
        row["fp32_outliers"] = evaluate_dataset(FloatWrapper(omodel), test, 4 * s.batch)["float_top1"]
        for key_, search_on in (("ptq_fixed_outliers", False), ("ptq_outliers", True)):
            res = ivit.run_ptq(ivit.PTQRun(replace(weights, checkpoint=str(opath)), DATA, run_dir / f"{key_}.ivit",
                                           search=search_on, search_images=s.search_images, quant=quant, **calib,
                                           **evals, **common))
            row[key_], row[f"bitexact_{key_}"] = res.top1, res.bitexact
        times["outliers_s"] = round(time.time() - t0, 1)
        log.print(f"{label} + LayerNorm outliers x{s.outlier_scale:g}: FP32 {row['fp32_outliers'] * 100:.2f}%, "
                  f"PTQ fixed {row['ptq_fixed_outliers'] * 100:.2f}%, PTQ searched {row['ptq_outliers'] * 100:.2f}%")

    # 5. QAT from the fixed-parameter calibration (the I-ViT flow), a short schedule of the QAT recipe
    t0 = time.time()
    qcfg = replace(recipes.QAT_TRAINING, epochs=s.qat_epochs, lr=s.qat_lr, weight_decay=0.0, batch_size=s.batch,
                   distill_alpha=recipes.DISTILL_ALPHA if s.distill else 0.0)
    q = ivit.run_qat(ivit.QATRun(weights, DATA, run_dir / "qat", train=qcfg, quant=quant, **calib,
                                 limit_train=s.qat_limit_train or s.limit_train, limit_eval=s.limit_test,
                                 resume="auto", bitexact_images=s.bitexact_images, **common))
    times["qat_train_s"] = round(time.time() - t0, 1)
    ev = ivit.run_eval(ivit.EvalRun(q.output, DATA, batch=4 * s.batch, limit_eval=s.limit_test, progress=progress))
    row["qat"], row["bitexact_qat"] = ev.top1, q.bitexact
    row["bitexact_images"] = s.bitexact_images or ev.n
    row["test_images"] = ev.n
    row["integer_ops"] = len(q.program.nodes) if q.program is not None else None
    times["qat_total_s"] = round(time.time() - t0, 1)
    log.print(f"{label}: QAT top-1 {ev.top1 * 100:.2f}% bit-exact {q.bitexact}")
    row["times"] = times

    if not plot:
        return row
    # float training curve, then the integer model (PTQ at the last float epoch, QAT after it)
    e = len(ft.history)
    curve = [{"epoch": r["epoch"], "float_top1": r["float_top1"]} for r in ft.history]
    curve.append({"epoch": e, "int_top1": row["ptq_fixed"]})
    curve.append({"epoch": e + s.qat_epochs, "int_top1": row["qat"]})
    plot_accuracy(curve, out / f"accuracy_{key}{'_quick' if s is QUICK else ''}.png",
                  f"{bm.label} on Fashion-MNIST: float training, then PTQ and QAT")
    return row


def _all_exact(row: dict[str, Any]) -> bool:
    """Every integer program of the row gave engine logits equal to the PyTorch integer model's."""
    return all(v for k, v in row.items() if k.startswith("bitexact_") and k != "bitexact_images")


def _markdown(rows: list[dict[str, Any]], cmd: str, meta: dict[str, Any]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.2f}"

    lines = [
        f"Fashion-MNIST test set ({rows[0]['test_images']} images), top-1 %. Integer columns: the `.ivit` engine's "
        "int32 logits. Bit-exact: engine logits `torch.equal` to the PyTorch integer model on the first "
        f"{rows[0]['bitexact_images']} test images, for every integer program below.",
        "",
        "| model | params | FP32 | PTQ (fixed n, no clipping) | PTQ (per-layer search) | QAT | "
        "PTQ - FP32 | QAT - FP32 | bit-exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        ok = _all_exact(r)
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {pct(r['fp32'])} | {pct(r['ptq_fixed'])} | "
                     f"{pct(r['ptq'])} | {pct(r['qat'])} | {100 * (r['ptq'] - r['fp32']):+.2f} | "
                     f"{100 * (r['qat'] - r['fp32']):+.2f} | {'yes' if ok else 'NO'} |")
    with_outliers = [r for r in rows if "ptq_outliers" in r]
    if with_outliers:
        lines += ["", "PTQ on the same float models with LayerNorm outlier channels (2 channels per LayerNorm "
                  f"scaled x{meta['settings']['outlier_scale']:g}, the next layer's weights divided by the same: "
                  "the float function is unchanged; this mimics the post-LayerNorm outliers of pretrained "
                  "DeiT-B/ViT-B):", "",
                  "| model | FP32 | PTQ (fixed parameters) | PTQ (per-layer search) | bit-exact |",
                  "|---|---:|---:|---:|:---:|"]
        for r in with_outliers:
            ok = r["bitexact_ptq_fixed_outliers"] and r["bitexact_ptq_outliers"]
            lines.append(f"| {r['model']} | {pct(r['fp32_outliers'])} | {pct(r['ptq_fixed_outliers'])} | "
                         f"{pct(r['ptq_outliers'])} | {'yes' if ok else 'NO'} |")
    lines += ["", "PTQ search: " + "; ".join(f"{r['model']}: {r['search']}" for r in rows)]
    lines += ["", "Models:"] + [f"- {d}" for d in dict.fromkeys(r['description'] for r in rows)]
    lines += ["", f"Command: `{cmd}`", "",
              f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads; "
              f"total {meta['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (subsets, few epochs)")
    p.add_argument("--models", default="vit,swin,vit197", help="comma list of: " + ",".join(MODELS))
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--float-epochs", type=int, default=None)
    p.add_argument("--qat-epochs", type=int, default=None)
    p.add_argument("--qat-lr", type=float, default=None)
    p.add_argument("--distill", action="store_true", help="QAT with distillation from the float model")
    p.add_argument("--bitexact-images", type=int, default=None, help="0: the whole test set")
    p.add_argument("--outlier-scale", type=float, default=None, help="LayerNorm outlier demo scale (<= 1: skip)")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N images (0: all)")
    p.add_argument("--limit-test", type=int, default=None, help="test on the first N images (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    s = copy.deepcopy(QUICK if a.quick else FULL)
    for k in ("float_epochs", "qat_epochs", "qat_lr", "bitexact_images", "outlier_scale", "limit_train", "limit_test"):
        if getattr(a, k) is not None:
            setattr(s, k, getattr(a, k))
    s.distill = s.distill or a.distill
    if a.threads:
        torch.set_num_threads(a.threads)
    keys = [k.strip() for k in a.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        out = out / "quick"
        out.mkdir(exist_ok=True)
    con = Console(stderr=True)
    t0 = time.time()
    rows = [r for k in keys for r in run_model(k, s, out, not a.no_progress, con)]
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "total_s": round(time.time() - t0, 1), "settings": s.__dict__,
            "python": sys.version.split()[0]}
    cmd = "python benchmarks/accuracy.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    suffix = "_quick" if a.quick else ""
    res_dir = Path(a.out)
    write_text_atomic(res_dir / f"accuracy{suffix}.json", json.dumps({"rows": rows, "meta": meta, "command": cmd},
                                                                     indent=1) + "\n")
    md = _markdown(rows, cmd, meta)
    write_text_atomic(res_dir / f"accuracy{suffix}.md", md)

    t = Table(title=f"Fashion-MNIST top-1 (%), {rows[0]['test_images']} test images")
    for c in ("model", "FP32", "PTQ fixed", "PTQ search", "QAT", "bit-exact"):
        t.add_column(c, justify="right")
    for r in rows:
        ok = _all_exact(r)
        cells = (f"{100 * r[k]:.2f}" for k in ("fp32", "ptq_fixed", "ptq", "qat"))
        t.add_row(r["model"], *cells, "yes" if ok else "NO")
    Console().print(t)
    print(f"wrote {res_dir / f'accuracy{suffix}.md'} and .json ({meta['total_s'] / 60:.1f} min)")
    return 0 if all(_all_exact(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
