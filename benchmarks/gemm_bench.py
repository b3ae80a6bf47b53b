"""Benchmark of the exact int8 GEMM (``ivit.native.gemm``) on DeiT-S-like shapes.

Columns (median ms and GOPS, 2*M*N*K integer ops per product, and the GOPS of the fastest run, which is
less disturbed by other load on the machine; one thread by default):

* ``fp32``: ``torch.matmul`` of float32 operands (for scale, not exact integers);
* ``_int_mm``: oneDNN's ``torch._int_mm`` (exact here only on VNNI CPUs);
* ``C native``: our C kernel built with ``-march=native``;
* ``C avx2``: our C kernel built with ``IVIT_NATIVE_MARCH=x86-64-v3`` (the AVX2 ``vpmaddwd`` path that
  CPUs without VNNI run);
* ``_int_mm avx2``: ``torch._int_mm`` under ``ONEDNN_MAX_CPU_ISA=AVX2``: what oneDNN does on a CPU
  without VNNI, with its saturating ``vpmaddubsw`` (INEXACT; shown only for speed comparison);
* ``C scalar`` (``--scalar``): our portable C path (``IVIT_NATIVE_MARCH=x86-64``).

Every column runs in its own subprocess (the ISA settings must be set before torch / the library
load) and every C result is checked against the exact int64 product.

    python benchmarks/gemm_bench.py [--threads 1] [--reps 20] [--scalar]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(197 * 8, 384, 1152), (1576, 384, 1536), (1576, 1536, 384), (197, 384, 384)]


def _worker(kind: str, threads: int, reps: int) -> dict[str, object]:
    import torch

    torch.set_num_threads(threads)
    out: dict[str, object] = {"times": [], "best": []}
    g = torch.Generator().manual_seed(0)
    if kind.startswith("native"):
        from ivit.native import gemm

        out["isa"] = gemm.native_isa()
        out["backend"] = gemm.gemm_backend()
        assert out["backend"] == "native", out["backend"]
    exact = True
    for m, k, n in SHAPES:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        if kind == "fp32":
            af, wf = a.float(), w.float()

            def fn(af=af, wf=wf):
                return torch.matmul(af, wf.t())
        elif kind.startswith("int_mm"):
            wt = w.t()

            def fn(a=a, wt=wt):
                return torch._int_mm(a, wt)
        else:
            def fn(a=a, w=w):
                return gemm.int8_mm(a, w)
        r = fn()
        if kind.startswith("native"):
            exact &= bool(torch.equal(r, torch.matmul(a.long(), w.long().t()).int()))
        for _ in range(2):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            fn()
            ts.append(time.perf_counter_ns() - t0)
        out["times"].append(statistics.median(ts) / 1e6)
        out["best"].append(min(ts) / 1e6)
    out["exact"] = exact
    return out


def _spawn(kind: str, env_extra: dict[str, str], threads: int, reps: int) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "IVIT_GEMM", "IVIT_NATIVE_MARCH")}
    env.update(env_extra)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, __file__, "--worker", kind, "--threads", str(threads), "--reps", str(reps)],
                         env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-2000:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--scalar", action="store_true", help="also time the portable scalar C path")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker, args.threads, args.reps)))
        return
    columns = [
        ("fp32", "fp32", {}),
        ("_int_mm", "int_mm", {}),
        ("C native", "native", {"IVIT_GEMM": "native"}),
        ("C avx2", "native-avx2", {"IVIT_GEMM": "native", "IVIT_NATIVE_MARCH": "x86-64-v3"}),
        ("_int_mm avx2 (inexact)", "int_mm-avx2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ]
    if args.scalar:
        columns.append(("C scalar", "native-scalar", {"IVIT_GEMM": "native", "IVIT_NATIVE_MARCH": "x86-64"}))
    results = {label: _spawn(kind, env, args.threads, args.reps) for label, kind, env in columns}
    notes = [f"{label}: isa {r['isa']}, exact {r['exact']}" for label, r in results.items() if "isa" in r]
    header = ["M x K x N"] + [label for label, _, _ in columns]
    rows = []
    for i, (m, k, n) in enumerate(SHAPES):
        ops = 2 * m * k * n
        row = [f"{m} x {k} x {n}"]
        for label, _, _ in columns:
            ms, best = results[label]["times"][i], results[label]["best"][i]
            row.append(f"{ms:.3f} ms {ops / ms / 1e6:.0f} ({ops / best / 1e6:.0f})")
        rows.append(row)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"int8 GEMM, {args.threads} thread(s): median ms of {args.reps} runs, GOPS "
                            "(GOPS of the best run)")
        for h in header:
            table.add_column(h, justify="right")
        for row in rows:
            table.add_row(*row)
        Console(width=240).print(table)
    except ImportError:
        widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
        print(" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        for row in rows:
            print(" | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
