"""``ivit`` command line: parses arguments into the workflows' dataclasses and calls them.

Every error prints one line on stderr and exits with code 2 - no traceback, no partial output file:
``IvitError`` (bad input, bad files), bad arguments (``ivit: error: <message>``), unreadable paths, and any
other exception (``IVIT_DEBUG=1`` re-raises it to show the traceback).  Invalid programs read
``ivit: error: invalid program in FILE: <what>``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import IvitError

__all__ = ["main", "build_parser", "parse_run"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print usage + "prog: error:")
        cmd = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise IvitError(f"{cmd}: {message}" if cmd else message)


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {v}")
        return v
    return parse


_pos = _int_at_least(1)
_nonneg = _int_at_least(0)


def _float(s: str) -> float:
    import math

    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


# ---------------------------------------------------------------------------------------------
# arguments -> workflow configs

#: TrainConfig field -> its command-line option
_TRAIN_FLAGS = {"epochs": "--epochs", "lr": "--lr", "weight_decay": "--weight-decay", "batch_size": "--batch",
                "warmup_epochs": "--warmup-epochs", "label_smoothing": "--label-smoothing",
                "grad_clip": "--grad-clip", "seed": "--seed", "distill_alpha": "--distill-alpha",
                "distill_tau": "--distill-tau"}


def _spec(a: argparse.Namespace) -> Any:
    from .workflows.spec import ModelSpec, parse_model_args

    args = parse_model_args(a.model_args)
    if a.img_size is not None:
        if "img_size" in args and args["img_size"] != a.img_size:
            raise IvitError(f"--img-size {a.img_size} disagrees with --model-args img_size={args['img_size']}")
        args["img_size"] = a.img_size
    return ModelSpec(a.model, args, checkpoint=a.checkpoint, pretrained=a.pretrained, num_classes=a.num_classes)


def _train_config(a: argparse.Namespace, recipe: Any, distill: bool = False) -> Any:
    """The recipe (a ``TrainConfig``) with the options given on the command line (a bad value names its option)."""
    kw = {f: getattr(a, f) for f in _TRAIN_FLAGS if f != "batch_size" and getattr(a, f, None) is not None}
    if getattr(a, "batch", None) is not None:
        kw["batch_size"] = a.batch
    if not distill:
        kw.pop("distill_alpha", None)
    try:
        return replace(recipe, **kw)
    except IvitError as e:
        msg = str(e)
        for field_name, flag in _TRAIN_FLAGS.items():
            msg = msg.replace(f"TrainConfig.{field_name} ", f"{flag} ")
        raise IvitError(msg) from None


def _quant(a: argparse.Namespace) -> Any:
    from .config import QuantConfig

    return QuantConfig.from_json(a.quant_config) if a.quant_config else QuantConfig()


def _limits(a: argparse.Namespace) -> Any:
    from .ir.limits import Limits

    return Limits().with_overrides(a.limit)


def _train_run(a: argparse.Namespace) -> Any:
    from .workflows import TrainRun, recipes

    return TrainRun(_spec(a), a.data, a.out, train=_train_config(a, recipes.FLOAT_TRAINING), augment=a.aug,
                    limit_train=a.limit_train, limit_eval=a.limit_eval, resume=a.resume, save_every=a.save_every,
                    device=a.device, workers=a.workers, progress=not a.no_progress)


def _qat_run(a: argparse.Namespace) -> Any:
    from .workflows import QATRun, recipes

    cfg = _train_config(a, recipes.QAT_TRAINING, distill=a.distill)
    return QATRun(_spec(a), a.data, a.out, train=cfg, calib_images=a.calib_images, calib_batch=a.calib_batch,
                  ptq_search=a.ptq_search, search_images=a.search_images, quant=_quant(a), augment=a.aug,
                  limit_train=a.limit_train, limit_eval=a.limit_eval, resume=a.resume, save_every=a.save_every,
                  device=a.device, workers=a.workers, progress=not a.no_progress)


def _ptq_run(a: argparse.Namespace) -> Any:
    from .workflows import PTQRun

    return PTQRun(_spec(a), a.data, a.output, calib_images=a.calib_images, calib_batch=a.calib_batch,
                  search=a.search, balance=a.balance, search_images=a.search_images, quant=_quant(a),
                  evaluate=a.eval, limit_eval=a.limit_eval, report=a.report, device=a.device, seed=a.seed,
                  progress=not a.no_progress)


def _quantize_run(a: argparse.Namespace) -> Any:
    from .workflows import PTQRun, QATRun, recipes

    if a.qat_epochs == 0:
        return PTQRun(_spec(a), a.data, a.output, calib_images=a.calib_images, calib_batch=a.calib_batch,
                      search=False, quant=_quant(a), device=a.device, seed=a.seed, progress=not a.no_progress)
    if a.data == "random":  # before the (slow) model creation and calibration
        raise IvitError("QAT needs real data: pass --data digits, fashion-mnist or a folder")
    a.epochs = a.qat_epochs
    return QATRun(_spec(a), a.data, None, output=a.output, train=_train_config(a, recipes.QAT_TRAINING),
                  calib_images=a.calib_images, calib_batch=a.calib_batch, quant=_quant(a), device=a.device,
                  progress=not a.no_progress)


_RUN_BUILDERS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "train": _train_run, "qat": _qat_run, "ptq": _ptq_run, "quantize": _quantize_run}


def parse_run(argv: Sequence[str]) -> tuple[str, Any]:
    """``(command, workflow config)`` for a ``train`` / ``qat`` / ``ptq`` / ``quantize`` command line (what
    ``main`` runs; tests and launchers use it to run the same configuration themselves)."""
    a = build_parser().parse_args(list(argv))
    if a.cmd not in _RUN_BUILDERS:
        raise IvitError(f"{a.cmd} is not a workflow command")
    return a.cmd, _RUN_BUILDERS[a.cmd](a)


# ---------------------------------------------------------------------------------------------
# commands


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    t.add_column("", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _cmd_demo(a: argparse.Namespace) -> int:
    from .workflows.demo import DemoRun, print_report, run_demo

    cfg = DemoRun(a.model, a.out, progress=not a.no_progress).with_options(a.epochs, a.qat_epochs, a.batch, a.seed)
    res = run_demo(cfg)
    print_report(res.report)
    print(f"wrote {res.out_dir / 'report.json'}")
    return 0 if res.ok else 1


def _cmd_train(a: argparse.Namespace) -> int:
    from .workflows import run_train

    res = run_train(_train_run(a))
    if res.files:
        last = res.history[-1] if res.history else {}
        _table(f"ivit train: {res.spec.describe()} on {a.data}",
               [("epochs", str(last.get("epoch", 0))), ("float32 top-1", _pct(last.get("float_top1"))),
                ("weights (--checkpoint)", str(res.files["model"])), ("log", str(res.files["log"]))])
    return 0


def _cmd_qat(a: argparse.Namespace) -> int:
    from .workflows import run_qat

    res = run_qat(_qat_run(a))
    if res.output is None:  # not rank 0
        return 0
    rows = [("float32 top-1", _pct(res.float_top1)), ("PTQ top-1 (before QAT)", _pct(res.ptq_top1)),
            ("QAT top-1 (integer-only)", _pct(res.qat_top1)), ("engine bit-exact", "yes" if res.bitexact else "NO"),
            ("program", str(res.output))]
    if "log" in res.files:
        rows.append(("log", str(res.files["log"])))
    _table(f"ivit qat: {a.model} on {a.data}", rows)
    return 0 if res.bitexact else 1


def _cmd_ptq(a: argparse.Namespace) -> int:
    from .workflows import run_ptq

    res = run_ptq(_ptq_run(a))
    rows = [("calibration images", str(res.calib_images)),
            ("search", res.search.summary() if res.search is not None else "off (fixed parameters)")]
    if res.top1 is not None:
        rows += [(f"top-1 (engine, {res.eval_images} images)", _pct(res.top1)), ("top-5", _pct(res.top5)),
                 ("engine bit-exact", "yes" if res.bitexact else "NO")]
    rows.append(("program", str(res.output)))
    if res.report is not None:
        rows.append(("report", str(res.report)))
    _table(f"ivit ptq: {a.model}", rows)
    return 0 if res.bitexact in (None, True) else 1


def _cmd_quantize(a: argparse.Namespace) -> int:
    from .workflows import PTQRun, run_ptq, run_qat

    cfg = _quantize_run(a)
    res = run_ptq(cfg) if isinstance(cfg, PTQRun) else run_qat(cfg)
    if res.program is not None and res.output is not None:
        size = res.output.stat().st_size / 1e6
        print(f"wrote {res.output} ({size:.2f} MB, {len(res.program.nodes)} integer ops)")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from .workflows import EvalRun, run_eval

    res = run_eval(EvalRun(a.file, a.data, split=a.split, batch=a.batch, limit_eval=a.limit_eval,
                           backend=a.backend, limits=_limits(a), progress=not a.no_progress))
    from rich.console import Console
    from rich.table import Table

    print(f"model: {res.model}")
    t = Table(title=f"{Path(a.file).name} on {a.data} ({a.split}), backend {res.backend}")
    for col in ("images", "top-1", "top-5"):
        t.add_column(col, justify="right")
    t.add_row(str(res.n), f"{res.top1 * 100:.2f}%", f"{res.top5 * 100:.2f}%")
    Console().print(t)
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    from .ir.program import load_program
    from .ir.validate import validate
    from .verify import verify_integer_only
    from .workflows.evaluate import engine_for, program_errors
    from .workflows.spec import spec_from_program

    limits = _limits(a)
    with program_errors(a.file):
        prog = load_program(a.file, limits)
        types = validate(prog, limits).types
    engine = engine_for(prog, a.file, a.backend, limits)
    with program_errors(a.file):
        check = verify_integer_only(engine)
    if getattr(check, "run_error", None):  # the proof ran the program, and the program failed
        from .ir.types import ProgramError

        raise ProgramError(f"invalid program in {a.file}: {check.run_error}")
    c, h, w = prog.input_shape
    con = Console()
    meta = prog.meta
    try:
        model = spec_from_program(meta).describe()
    except (IvitError, KeyError, TypeError, ValueError):
        model = str(meta.get("model"))
    recorded = "model_args" in meta
    con.print(f"[bold]{a.file}[/bold]: {model} ({meta.get('family')}), format {prog.format_version}, "
              f"input uint8 (B, {c}, {h}, {w}) -> {types[prog.output].describe()}", highlight=False)
    con.print(f"float network: {model}" + ("" if recorded else " (no model_args recorded: rebuilt from the name "
                                                                "and the input size)")
              + (f", {meta['float_params']:,} parameters" if isinstance(meta.get("float_params"), int) else ""),
              highlight=False)
    if a.ops:
        t = Table(title="program (B = batch)")
        for col in ("#", "op", "inputs", "output", "attrs"):
            t.add_column(col)
        for i, node in enumerate(prog.nodes):
            t.add_row(str(i), node.op, ",".join(node.inputs), types[node.output].describe(),
                      " ".join(f"{k}={v}" for k, v in node.attrs.items()))
        con.print(t)
    counts = Counter(n.op for n in prog.nodes)
    t = Table(title="ops")
    t.add_column("op")
    t.add_column("count", justify="right")
    t.add_column("output dtypes")
    for op, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        dts = sorted({types[nd.output].describe().split("(")[0] for nd in prog.nodes if nd.op == op})
        t.add_row(op, str(n), ",".join(dts))
    con.print(t)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in prog.consts.values())
    con.print(f"nodes: {len(prog.nodes)}   constants: {len(prog.consts)} tensors, {prog.num_parameters():,} values, "
              f"{prog.nbytes() / 1e6:.2f} MB ({', '.join(f'{k}: {v}' for k, v in sorted(dtypes.items()))})")
    con.print(f"backend {engine.backend}: {len(engine.executed.nodes)} steps after its passes "
              f"({', '.join(engine.backend_def.passes) or 'none'})")
    con.print(check.summary(), highlight=False)
    return 0 if check.ok else 1


def _cmd_bench(a: argparse.Namespace) -> int:
    from .workflows import BenchRun, run_bench

    res = run_bench(BenchRun(a.file, batch=a.batch, iters=a.iters, threads=a.threads, backend=a.backend,
                             reference=a.reference, float_model=not a.no_float, limits=_limits(a)))
    if res.note:
        print(f"ivit: note: {res.note}", file=sys.stderr)
    from rich.console import Console
    from rich.table import Table

    base = res.rows[0][1]
    if res.model:
        print(f"float network: {res.model}, {res.float_params:,} parameters (rebuilt from the program's metadata)")
    t = Table(title=f"{Path(a.file).name}: batch {res.batch}, {res.threads} threads (median of {a.iters})")
    t.add_column("method")
    t.add_column("median ms", justify="right")
    t.add_column("speed-up vs first", justify="right")
    for m, ms in res.rows:
        t.add_row(m, f"{ms:.2f}", f"{base / ms:.2f}x")
    Console().print(t)
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from .models.support import FAMILIES, list_supported, refused, support

    if a.why:
        ok, family, reason = support(a.why)
        print(f"{a.why}: supported ({family})" if ok else f"{a.why}: not supported: {reason}")
        return 0 if ok else 1
    groups = list_supported(progress=sys.stderr.isatty(), refresh=a.refresh)
    for family, names in groups.items():
        shown = [n for n in names if a.filter in n]
        if shown:
            print(f"{family} ({len(shown)}): {FAMILIES.get(family, '')}")
            for n in shown:
                print(f"  {n}")
    if a.all:
        bad = {n: r for n, r in refused().items() if a.filter in n}
        if bad:
            print(f"refused ({len(bad)}):")
            for n, r in bad.items():
                print(f"  {n}: {r}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .export import run_cli_export

    opts = {k: v for k, v in (("max_ram", a.max_ram), ("max_flash", a.max_flash)) if v is not None}
    if a.batch is not None:
        if a.format == "onnx":
            raise IvitError("--batch: an ONNX export has a dynamic batch dimension")
        opts["batch"] = a.batch
    return run_cli_export(a.file, a.format, a.output, verify=a.verify, limits=_limits(a), **opts)


# ---------------------------------------------------------------------------------------------
# parser


def _model_options(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("model", help="timm model name (e.g. deit_small_patch16_224) or an ivit custom size (vit_digits)")
    p.add_argument("--model-args", default=None, metavar="JSON",
                   help="timm constructor arguments as a JSON object, or @FILE holding one, e.g. "
                        "'{\"img_size\": 28, \"patch_size\": 7, \"embed_dim\": 96, \"depth\": 5, \"num_heads\": 3}' "
                        "(recorded in the program, so bench/inspect rebuild the same network)")
    p.add_argument("--img-size", type=_pos, default=None, help="shortcut for --model-args '{\"img_size\": N}'")
    p.add_argument("--num-classes", type=_pos, default=None, help="classifier size (default: the dataset's)")
    p.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network access)")
    p.add_argument("--checkpoint", help="local timm state dict (.safetensors, or .pth read with weights_only); "
                                        "it must fit the geometry of the name and --model-args")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _calib_options(p: argparse.ArgumentParser) -> None:
    from .workflows import recipes

    p.add_argument("--calib-images", type=_pos, default=recipes.CALIBRATION_IMAGES,
                   help="training images that calibrate the activation ranges (default: %(default)s)")
    p.add_argument("--calib-batch", type=_pos, default=recipes.CALIBRATION_BATCH,
                   help="images per calibration batch (default: %(default)s)")
    p.add_argument("--quant-config", default=None, metavar="JSON", help="QuantConfig as JSON (default: I-ViT widths)")


def _search_images(p: argparse.ArgumentParser) -> None:
    from .workflows import recipes

    p.add_argument("--search-images", type=_pos, default=recipes.SEARCH_IMAGES,
                   help="calibration images the per-layer search evaluates candidates on (default: %(default)s)")


def _recipe_options(p: argparse.ArgumentParser, recipe: Any) -> None:
    p.add_argument("--epochs", type=_pos, default=recipe.epochs, help="(default: %(default)s)")
    p.add_argument("--lr", type=_float, default=recipe.lr, help="peak learning rate, AdamW + cosine (default: "
                                                                "%(default)s)")
    p.add_argument("--weight-decay", type=_float, default=recipe.weight_decay, help="(default: %(default)s)")
    p.add_argument("--warmup-epochs", type=_float, default=recipe.warmup_epochs, help="(default: %(default)s)")
    p.add_argument("--label-smoothing", type=_float, default=recipe.label_smoothing, help="(default: %(default)s)")
    p.add_argument("--grad-clip", type=_float, default=recipe.grad_clip, help="max gradient norm, 0: off "
                                                                             "(default: %(default)s)")
    p.add_argument("--batch", type=_pos, default=recipe.batch_size, help="images per step and process "
                                                                         "(default: %(default)s)")
    p.add_argument("--seed", type=_nonneg, default=recipe.seed)


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (checkpoint, logs, plot, result)")
    p.add_argument("--aug", default="auto", choices=["auto", "pad-crop", "pad-crop-flip", "timm", "none"],
                   help="training augmentation; auto: the dataset's recipe (digits: pad-crop, fashion-mnist: "
                        "pad-crop-flip, folders: timm's RandAugment + random erasing)")
    p.add_argument("--limit-train", type=_nonneg, default=0, help="train on the first N images only")
    p.add_argument("--limit-eval", type=_nonneg, default=0, help="evaluate on the first N held-out images only")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoint.safetensors (or the given file)")
    p.add_argument("--save-every", type=_nonneg, default=0, metavar="N", help="also checkpoint every N steps")
    p.add_argument("--workers", type=_nonneg, default=0, help="data loader workers (exact --resume needs 0)")


def _program_options(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("file", help=".ivit program")
    if backend:
        p.add_argument("--backend", default=None,
                       help="engine backend (default fast: compiled, or cpu without a C compiler; reference: the "
                            "specification)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="raise a resource limit (see ivit.Limits), e.g. max_const_bytes=8e9")


_DATA = "digits, fashion-mnist, or an ImageNet-layout folder (train/, val/)"


def build_parser() -> argparse.ArgumentParser:
    from .workflows import recipes

    p = _Parser(prog="ivit", description="Integer-only Vision Transformers (I-ViT).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="digits -> float -> integer-only, end to end (no downloads)")
    d.add_argument("--model", default="vit", choices=sorted(recipes.DEMO_MODELS))
    d.add_argument("--out", default="ivit-demo", help="output folder (runs, report.json and the .ivit file)")
    d.add_argument("--epochs", type=_pos, default=None,
                   help=f"float training epochs (default: {recipes.DEMO_FLOAT.epochs})")
    d.add_argument("--qat-epochs", type=_nonneg, default=None,
                   help=f"QAT epochs, 0: PTQ only (default: {recipes.DEMO_QAT.epochs})")
    d.add_argument("--batch", type=_pos, default=None, help=f"(default: {recipes.DEMO_FLOAT.batch_size})")
    d.add_argument("--seed", type=_nonneg, default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)

    q = sub.add_parser("quantize", help="calibrate (fixed parameters) [+ QAT epochs] -> .ivit file")
    _model_options(q, f"calibration data: {_DATA}, or 'random' (random pixels)")
    q.add_argument("-o", "--output", required=True, help="output .ivit file")
    _calib_options(q)
    q.add_argument("--qat-epochs", type=_nonneg, default=0, help="QAT epochs after calibration (the QAT recipe)")
    q.add_argument("--lr", type=_float, default=recipes.QAT_TRAINING.lr, help="QAT learning rate (default: "
                                                                              "%(default)s)")
    q.add_argument("--batch", type=_pos, default=recipes.QAT_TRAINING.batch_size, help="QAT batch (default: "
                                                                                       "%(default)s)")
    q.add_argument("--seed", type=_nonneg, default=0)
    q.set_defaults(fn=_cmd_quantize)

    t = sub.add_parser("train", help="float training of a timm model on uint8 data (resumable, torchrun-ready)")
    _model_options(t, _DATA)
    _run_options(t)
    _recipe_options(t, recipes.FLOAT_TRAINING)
    t.set_defaults(fn=_cmd_train)

    qa = sub.add_parser("qat", help="quantization-aware training -> OUT/model.ivit (paper recipe, torchrun-ready)")
    _model_options(qa, _DATA)
    _run_options(qa)
    _recipe_options(qa, recipes.QAT_TRAINING)
    qa.add_argument("--distill", action="store_true", help="distill from the float model (KL on soft labels)")
    qa.add_argument("--distill-alpha", type=_float, default=recipes.DISTILL_ALPHA,
                    help="weight of the distillation term (default: %(default)s)")
    qa.add_argument("--distill-tau", type=_float, default=recipes.QAT_TRAINING.distill_tau,
                    help="distillation temperature (default: %(default)s)")
    _calib_options(qa)
    qa.add_argument("--ptq-search", action="store_true",
                    help="start QAT from the searched PTQ (LayerNorm balancing, clipping ranges, ShiftExp shifts)")
    _search_images(qa)
    qa.set_defaults(fn=_cmd_qat)

    pt = sub.add_parser("ptq", help="post-training quantization with the per-layer search -> .ivit (no training)")
    _model_options(pt, f"calibration data: {_DATA}, or 'random'")
    pt.add_argument("-o", "--output", "--out", dest="output", required=True, help="output .ivit file")
    _calib_options(pt)
    pt.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                    help="choose clipping ranges and ShiftExp shifts per layer (default: on)")
    pt.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                    help="with --search: balance LayerNorm outlier channels into the next linear layer (default: on)")
    _search_images(pt)
    pt.add_argument("--eval", action="store_true", help="top-1 of the .ivit engine on the held-out split")
    pt.add_argument("--limit-eval", type=_nonneg, default=0, help="with --eval: the first N held-out images only")
    pt.add_argument("--report", default=None, help="write the per-layer choices as JSON to this file")
    pt.add_argument("--seed", type=_nonneg, default=0)
    pt.set_defaults(fn=_cmd_ptq)

    e = sub.add_parser("eval", help="top-1/top-5 of a .ivit file with the integer engine")
    _program_options(e)
    e.add_argument("--data", required=True, help=_DATA)
    e.add_argument("--split", default="test", choices=["train", "test", "val"])
    e.add_argument("--batch", type=_pos, default=64)
    e.add_argument("--limit-eval", type=_nonneg, default=0, help="evaluate the first N images only")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=_cmd_eval)

    i = sub.add_parser("inspect", help="ops, dtypes, shapes, size and the integer-only verdict of a .ivit file")
    _program_options(i)
    i.add_argument("--ops", action="store_true", help="list every op")
    i.set_defaults(fn=_cmd_inspect)

    b = sub.add_parser("bench", help="median latency: integer engine vs the same float network, side by side")
    _program_options(b)
    b.add_argument("--batch", type=_pos, default=1)
    b.add_argument("--iters", type=_pos, default=10)
    b.add_argument("--threads", type=_nonneg, default=0, help="torch threads (0: torch's choice)")
    b.add_argument("--reference", action="store_true", help="also time the reference backend")
    b.add_argument("--no-float", action="store_true", help="do not build and time the float network")
    b.set_defaults(fn=_cmd_bench)

    x = sub.add_parser("export", help="write a .ivit program for another runtime (onnx, tosa, c: a C99 library)")
    _program_options(x, backend=False)
    x.add_argument("--format", required=True, help="exporter: onnx (ONNX Runtime), tosa (TOSA 1.0 flatbuffer), "
                                                     "c (standalone C99, no floating point)")
    x.add_argument("--batch", type=_pos, default=None, help="tosa, c: images per call (static; default 1)")
    x.add_argument("-o", "--output", required=True, help="output file or folder")
    x.add_argument("--verify", action="store_true", help="run the export in its runtime and compare with the engine")
    x.add_argument("--max-ram", default=None, help="c: refuse if the arena needs more bytes (e.g. 256K)")
    x.add_argument("--max-flash", default=None, help="c: refuse if the constants take more bytes (e.g. 1M)")
    x.set_defaults(fn=_cmd_export)

    m = sub.add_parser("models", help="list the model names that quantize and freeze, by family")
    m.add_argument("filter", nargs="?", default="", help="only names containing this text")
    m.add_argument("--why", metavar="NAME", default=None, help="say whether NAME is supported, or why not")
    m.add_argument("--all", action="store_true", help="also list the refused names with their reasons")
    m.add_argument("--refresh", action="store_true", help="rebuild the cached support table")
    m.set_defaults(fn=_cmd_models)
    return p


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def main(argv: Sequence[str] | None = None) -> int:
    debug = os.environ.get("IVIT_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        return int(args.fn(args))
    except IvitError as e:
        if debug:
            raise
        print(f"ivit: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"ivit: error: {e.strerror or _first_line(e) or type(e).__name__}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ivit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - no traceback for any failure; IVIT_DEBUG=1 shows it
        if debug:
            raise
        msg = _first_line(e)
        print(f"ivit: error: {type(e).__name__}{': ' + msg if msg else ''} (IVIT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
