"""``ivit`` command line: a thin layer over the library.

Every user error (``IvitError``, bad arguments, unreadable paths) prints one line on stderr and exits
with code 2; no traceback, no partial output file.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import IvitError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise IvitError(f"{self.prog}: {message}")


def _cmd_demo(a: argparse.Namespace) -> int:
    from .workflows.demo import print_report, run_demo

    report = run_demo(a.model, a.out, epochs=a.epochs, qat_epochs=a.qat_epochs, batch=a.batch, seed=a.seed)
    print_report(report)
    print(f"wrote {Path(a.out) / 'report.json'}")
    return 0 if report["bitexact"] and report["integer_only"] else 1


def _calibration_batches(name: str, img: int, batch: int, n: int, seed: int) -> list:
    import torch

    if name == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, generator=g) for _ in range(n)]
    from . import data

    ds = data.build_dataset(name, "train", img)
    return list(itertools.islice(data.make_loader(ds, batch, shuffle=True, seed=seed), n))


def _cmd_quantize(a: argparse.Namespace) -> int:
    from . import data, models, quant
    from .quant import freeze
    from .training.trainer import TrainConfig, train

    out = Path(a.output)
    if not out.parent.exists():
        raise IvitError(f"output folder does not exist: {out.parent}")
    if a.qat_epochs > 0 and a.data == "random":  # fail before the (slow) model creation and calibration
        raise IvitError("QAT needs real data: pass --data")
    kwargs = {}
    if a.img_size:
        kwargs["img_size"] = a.img_size
    model = models.create_model(a.model, pretrained=a.pretrained, checkpoint=a.checkpoint,
                                num_classes=a.num_classes, **kwargs)
    qmodel = quant.quantize(model)
    img = qmodel.img_size[0]
    batches = _calibration_batches(a.data, img, a.batch, a.calib_batches, a.seed)
    quant.calibrate(qmodel, batches, progress=True)
    if a.qat_epochs > 0:
        ds = data.build_dataset(a.data, "train", img)
        ds.transform = data.train_augment(img, flip=a.data not in ("digits", "fashion-mnist"))
        train(qmodel, data.make_loader(ds, a.batch, shuffle=True, seed=a.seed),
              TrainConfig(epochs=a.qat_epochs, lr=a.lr, weight_decay=0.0), desc="qat")
    prog = freeze(qmodel, name=a.model)
    prog.save(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(prog.nodes)} integer ops)")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import data
    from .backends import load
    from .training.trainer import evaluate

    engine = load(a.file, backend=a.backend)
    c, h, w = engine.program.input_shape
    if h != w:
        raise IvitError("eval supports square inputs only")
    ds = data.build_dataset(a.data, a.split, h)
    n_cls = data.num_classes(ds)
    if n_cls > engine.num_classes:
        raise IvitError(f"dataset has {n_cls} classes but the model predicts {engine.num_classes}")
    loader = data.make_loader(ds, a.batch, shuffle=False)
    batches = itertools.islice(loader, a.limit) if a.limit else loader
    res = evaluate(engine, batches, progress=True)
    t = Table(title=f"{Path(a.file).name} on {a.data} ({a.split})")
    for col in ("images", "top-1", "top-5"):
        t.add_column(col, justify="right")
    t.add_row(str(res["n"]), f"{res['top1'] * 100:.2f}%", f"{res['top5'] * 100:.2f}%")
    Console().print(t)
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    from .backends import Engine
    from .ir.program import Limits, load_program
    from .ir.validate import validate
    from .verify import verify_integer_only

    limits = Limits().with_overrides(a.limit)
    prog = load_program(a.file, limits)
    types = validate(prog, limits).types
    engine = Engine(prog, backend=a.backend, limits=limits)
    check = verify_integer_only(engine)
    c, h, w = prog.input_shape
    con = Console()
    meta = prog.meta
    con.print(f"[bold]{a.file}[/bold]: {meta.get('model')} ({meta.get('family')}), format {prog.format_version}, "
              f"input uint8 (B, {c}, {h}, {w}) -> {types[prog.output].describe()}")
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
    import torch
    from rich.console import Console
    from rich.table import Table

    from . import models as api
    from .backends import load
    from .bench import median_ms
    from .training.trainer import FloatWrapper

    if a.threads:
        torch.set_num_threads(a.threads)
    engine = load(a.file)
    c, h, w = engine.program.input_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (a.batch, c, h, w), dtype=torch.uint8, generator=g)
    rows: list[tuple[str, float]] = []
    name = str(engine.meta.get("model"))
    try:
        arch = engine.meta.get("arch", {})
        kw = {"img_size": h} if name not in api.CUSTOM_MODELS and arch else {}
        fmodel = FloatWrapper(api.create_model(name, num_classes=engine.num_classes, **kw)).eval()
    except IvitError as e:
        print(f"ivit: note: no float twin for {name}: {e}", file=sys.stderr)
        fmodel = None
    if fmodel is not None:
        rows.append(("torch fp32", median_ms(fmodel, x, iters=a.iters)))

        def bf16(t: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fmodel(t)

        rows.append(("torch bf16 autocast", median_ms(bf16, x, iters=a.iters)))
    rows.append((f"ivit int ({engine.backend})", median_ms(engine, x, iters=a.iters)))
    if a.reference:
        ref = load(a.file, backend="reference")
        rows.append(("ivit int (reference)", median_ms(ref, x, iters=a.iters)))
    base = rows[0][1]
    t = Table(title=f"{Path(a.file).name}: batch {a.batch}, {torch.get_num_threads()} threads (median of {a.iters})")
    t.add_column("method")
    t.add_column("median ms", justify="right")
    t.add_column("speed-up vs first", justify="right")
    for m, ms in rows:
        t.add_row(m, f"{ms:.2f}", f"{base / ms:.2f}x")
    Console().print(t)
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from .models import list_models

    for n in list_models():
        if a.filter in n:
            print(n)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ivit", description="Integer-only Vision Transformers (I-ViT).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="digits -> float -> integer-only, end to end (no downloads)")
    d.add_argument("--model", default="vit", choices=["vit", "swin"])
    d.add_argument("--out", default="ivit-demo", help="output folder (report.json and the .ivit file)")
    d.add_argument("--epochs", type=int, default=None, help="float training epochs")
    d.add_argument("--qat-epochs", type=int, default=None)
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)

    q = sub.add_parser("quantize", help="timm model (name + optional checkpoint) -> calibrated .ivit file")
    q.add_argument("model", help="timm model name (e.g. deit_small_patch16_224) or a custom size (vit_digits)")
    q.add_argument("-o", "--output", required=True, help="output .ivit file")
    q.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network)")
    q.add_argument("--checkpoint", help="local timm state dict (.safetensors or .pth)")
    q.add_argument("--num-classes", type=int, default=None)
    q.add_argument("--img-size", type=int, default=None)
    q.add_argument("--data", required=True,
                   help="calibration data: digits, fashion-mnist, an ImageNet-layout folder, or 'random'")
    q.add_argument("--calib-batches", type=int, default=8)
    q.add_argument("--batch", type=int, default=32)
    q.add_argument("--qat-epochs", type=int, default=0)
    q.add_argument("--lr", type=float, default=5e-6)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_cmd_quantize)

    e = sub.add_parser("eval", help="top-1/top-5 of a .ivit file with the integer engine")
    e.add_argument("file")
    e.add_argument("--data", required=True, help="digits, fashion-mnist, or an ImageNet-layout folder")
    e.add_argument("--split", default="test", choices=["train", "test", "val"])
    e.add_argument("--batch", type=int, default=64)
    e.add_argument("--limit", type=int, default=0, help="evaluate only this many batches")
    e.add_argument("--backend", default=None, choices=["reference", "fast"])
    e.set_defaults(fn=_cmd_eval)

    i = sub.add_parser("inspect", help="ops, dtypes, shapes, size and the integer-only verdict of a .ivit file")
    i.add_argument("file")
    i.add_argument("--ops", action="store_true", help="list every op")
    i.add_argument("--backend", default=None, help="backend to prove (default: the engine's default, cpu)")
    i.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="raise a resource limit (see ivit.Limits), e.g. max_const_bytes=8e9")
    i.set_defaults(fn=_cmd_inspect)

    b = sub.add_parser("bench", help="median latency: integer engine vs the float model, side by side")
    b.add_argument("file")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--reference", action="store_true", help="also time the reference backend")
    b.set_defaults(fn=_cmd_bench)

    m = sub.add_parser("models", help="list supported model names")
    m.add_argument("filter", nargs="?", default="")
    m.set_defaults(fn=_cmd_models)

    try:
        from .workflows.runs import add_train_commands
    except ImportError:
        pass
    else:
        add_train_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        for name in ("batch", "iters", "calib_batches", "img_size", "num_classes"):
            if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
                raise IvitError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("limit", "threads", "qat_epochs", "epochs"):
            if getattr(args, name, 0) is not None and getattr(args, name, 0) < 0:
                raise IvitError(f"--{name.replace('_', '-')} must be >= 0")
        return int(args.fn(args))
    except IvitError as e:
        print(f"ivit: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"ivit: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ivit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
