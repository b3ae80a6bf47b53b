"""Where the compiled backend's time goes: a per-step profile of one model, grouped by kind of step.

Builds the model (random timm weights, calibrated on random pixels) for ``ivit.Engine(..., backend="compiled")``,
runs ``ivit.backends.compiled.profile`` (a build with a timer after each step's barrier, median of ``--runs``
runs after ``--warmup`` untimed ones: on a VM the first runs of a fresh build are slow) and prints, per kind
of step (``gemm``: the int8 GEMMs with their fused epilogues; ``attn``: q k^T, Shiftmax, p v and the
normalization; ``ln``, ``gather``, ...), the time, its share and the achieved int8 ops/s (2 per
multiply-accumulate).

Example::

    python benchmarks/compiled_profile.py deit_small_patch16_224 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import collections

import torch
from rich.console import Console
from rich.table import Table

import ivit
from ivit.backends import compiled as cb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a timm model name that ivit quantizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=15, help="timed runs (the median is shown)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    a = p.parse_args()
    if a.runs < 1 or a.warmup < 0 or a.batch < 1 or a.threads < 1:
        raise SystemExit("compiled_profile: --runs, --batch and --threads must be at least 1, --warmup at least 0")
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    q = ivit.quantize(ivit.create_model(a.model).eval(), ivit.QuantConfig())
    size = q.img_size
    ivit.calibrate(q, [torch.randint(0, 256, (2, q.in_chans, *size), dtype=torch.uint8)])
    eng = ivit.Engine(ivit.freeze(q, self_check=False), backend="compiled")
    if "fallback" in eng.compiled.info:
        raise SystemExit(f"compiled backend fell back: {eng.compiled.info['fallback']}")
    x = torch.randint(0, 256, (a.batch, q.in_chans, *size), dtype=torch.uint8)
    rows = cb.profile(eng.compiled.info["model"], x, runs=a.runs, warmup=a.warmup)
    total = sum(r["ns"] for r in rows)
    kinds: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for r in rows:
        k = kinds[r["kind"]]
        k[0] += r["ns"]
        k[1] += r["macs"]
        k[2] += 1
    t = Table(title=f"{a.model}, batch {a.batch}, {a.threads} thread(s), code path {eng.compiled.info['isa']}: "
                    f"{total / 1e6:.2f} ms in {len(rows)} steps")
    for col in ("kind", "steps", "ms", "share", "int8 GOPS"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    for kind, (ns, macs, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        t.add_row(kind, str(n), f"{ns / 1e6:.2f}", f"{100 * ns / total:.1f}%", f"{2 * macs / ns:.0f}" if macs else "-")
    Console().print(t)


if __name__ == "__main__":
    main()
