"""Latency of the integer-only ONNX export in ONNX Runtime next to the ivit engine, in one run.

For each model (timm weights, random init with a fixed seed, calibrated on random images) the frozen
program is exported with ``ivit.export.export(program, "onnx", ...)`` (each ``--gemm`` mode), its int32
logits are checked ``torch.equal`` to the engine's on the timed batch, and then the engine
(``ivit.Engine(program)``, the default backend) and the ONNX Runtime sessions (CPU provider) are timed
round-robin at each thread count: per round ``--warmup`` untimed calls and ``--iters`` timed calls.  The
table reports the best round median of each method (on a shared machine the least disturbed round; the
JSON also has every round median and the median of all timed calls).

Example::

    python benchmarks/onnx_latency.py --json benchmarks/results/onnx_latency.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import ivit
from ivit.export import export
from ivit.export.onnx.lower import GEMM_MODES

DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224")


@dataclass
class Row:
    """One (model, batch, threads) measurement: median ms of the engine and of each ONNX graph."""

    model: str
    batch: int
    threads: int
    engine_ms: float
    ort_ms: dict[str, float] = field(default_factory=dict)
    bitexact: dict[str, bool] = field(default_factory=dict)
    round_medians_ms: dict[str, list[float]] = field(default_factory=dict)
    pooled_median_ms: dict[str, float] = field(default_factory=dict)


def random_pixels(n: int, seed: int, size: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def build_program(name: str, seed: int, calib_batches: int) -> ivit.Program:
    torch.manual_seed(seed)
    q = ivit.quantize(ivit.create_model(name))
    ivit.calibrate(q, [random_pixels(4, seed + 1 + i) for i in range(calib_batches)])
    return ivit.freeze(q)


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def bench_model(name: str, args: argparse.Namespace, tmp: Path, console: Console) -> list[Row]:
    prog = build_program(name, args.seed, args.calib_batches)
    paths = {}
    for gemm in args.gemm:
        paths[gemm] = tmp / f"{name}.{gemm}.onnx"
        t = time.perf_counter()
        res = export(prog, "onnx", paths[gemm], gemm=gemm)
        console.print(f"{name}: exported ({gemm}) {res.info['nodes']} ONNX nodes, {res.info['bytes'] / 1e6:.1f} MB "
                      f"in {time.perf_counter() - t:.1f} s")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        engine = ivit.Engine(prog)
        sessions = {g: ort_session(p, threads) for g, p in paths.items()}
        for batch in args.batches:
            x = random_pixels(batch, args.seed + 100 + batch)
            xn = x.numpy()
            want = engine(x)
            exact = {g: torch.equal(torch.from_numpy(s.run(["logits"], {"pixels": xn})[0]), want)
                     for g, s in sessions.items()}
            runners: dict[str, Callable[[], Any]] = {"engine": lambda e=engine, x=x: e(x)}
            for g, s in sessions.items():
                runners[g] = lambda s=s, xn=xn: s.run(["logits"], {"pixels": xn})
            times: dict[str, list[float]] = {k: [] for k in runners}
            rounds: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(args.rounds):
                for k, fn in runners.items():
                    t = time_calls(fn, args.warmup, args.iters)
                    times[k] += t
                    rounds[k].append(statistics.median(t))
            med = {k: min(v) for k, v in rounds.items()}
            row = Row(name, batch, threads, med.pop("engine"), med, exact, rounds,
                      {k: statistics.median(v) for k, v in times.items()})
            console.print(f"  batch {batch}, {threads} thread(s): engine {row.engine_ms:.1f} ms, " + ", ".join(
                f"ORT {g} {ms:.1f} ms (bit-exact {'yes' if exact[g] else 'NO'})" for g, ms in med.items()))
            rows.append(row)
    return rows


def print_table(console: Console, rows: list[Row], gemms: Sequence[str]) -> None:
    t = Table(title="integer-only ONNX graph in ONNX Runtime vs the ivit engine (best round median, ms)")
    for col in ("model", "batch", "threads", "ivit engine", *[f"ORT int ({g})" for g in gemms],
                *[f"ORT {g} / engine" for g in gemms], "bit-exact"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        ok = all(r.bitexact.values())
        t.add_row(r.model.replace("_patch16_224", ""), str(r.batch), str(r.threads), f"{r.engine_ms:.1f}",
                  *[f"{r.ort_ms[g]:.1f}" for g in gemms], *[f"{r.ort_ms[g] / r.engine_ms:.1f}x" for g in gemms],
                  "yes" if ok else "NO")
    console.print(t)


def environment() -> dict[str, str]:
    out = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out["loadavg_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    for name in ("torch", "onnx", "onnxruntime", "ivit"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts (engine and ORT alike)")
    p.add_argument("--gemm", nargs="+", choices=GEMM_MODES, default=list(GEMM_MODES), help="ONNX GEMM modes")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per method and round")
    p.add_argument("--iters", type=int, default=5, help="timed calls per method and round")
    p.add_argument("--calib-batches", type=int, default=2, help="random calibration batches of 4 images")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and images")
    p.add_argument("--json", type=Path, default=None, help="write the rows and the environment as JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=150)
    env = environment()
    console.print(f"{env['cpu']}; torch {env['torch']}, onnxruntime {env['onnxruntime']}, ivit {env['ivit']}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp), console)
    env["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print_table(console, rows, args.gemm)
    console.print(f"load average at the start {env['loadavg_start']}, at the end {env['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": [asdict(r) for r in rows]}, indent=2))
    return 0 if all(all(r.bitexact.values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
