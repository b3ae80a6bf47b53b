"""Microcontroller deployment of integer ViTs: the ``c`` exporter's sizes, host latency and Cortex-M3 cost.

For each model (calibrated on scikit-learn digits images, random init, frozen to an integer program):

* ``flash``: bytes of code + constants of the model's objects built with ``arm-none-eabi-gcc -O2
  -mcpu=cortex-m3 -mthumb -mfloat-abi=soft`` (``arm-none-eabi-size``: text + data), and the constants
  alone (``IVIT_CONST_BYTES``);
* ``RAM``: the static arena (``IVIT_ARENA_BYTES``) and the peak of live activations it is planned from;
* host latency of one image: the C library built with the system ``cc`` and the strict flags
  (``-std=c99 -O2 ... -mgeneral-regs-only``: scalar code, one thread) against ``ivit.Engine`` (default
  backend, ``torch.set_num_threads(1)``), the best of ``--rounds`` interleaved rounds of ``--repeat``
  calls (each round's median); for reference also the same C built with ``-O3 -march=native`` (vector
  code allowed);
* Cortex-M3 instructions per image: QEMU ``mps2-an385`` with ``-icount shift=0`` (1 ns of virtual time per
  executed instruction) and the board's 25 MHz APB timer around each ``ivit_run`` call (40 instructions
  per tick; a loop of known length checks the factor);
* bit-exactness: the host build on random, all-0, all-255 and checkerboard images, and the Cortex-M3
  logits, both ``torch.equal`` to the reference engine.

Usage (prints a table and JSON; about a minute)::

    python benchmarks/mcu.py --json mcu.json

Needs a C compiler; the Cortex-M3 columns need ``apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi
qemu-system-arm`` (they read ``n/a`` without).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ivit
from ivit import data
from ivit.export import c99
from ivit.export.c99 import cortexm
from ivit.export.c99.host import HOST_FLAGS, build_host_harness, host_cc, time_host_harness

MODELS = ("vit_digits", "swin_digits", "vit_fmnist")


def calibrated_program(name: str, seed: int = 0) -> ivit.Program:
    """``name`` with random init (``seed``), calibrated on 2 x 32 digits training images, frozen."""
    torch.manual_seed(seed)
    q = ivit.quantize(ivit.create_model(name))
    size = q.img_size[0] if isinstance(q.img_size, (tuple, list)) else int(q.img_size)
    images = data.digits("train", img_size=size).images
    ivit.calibrate(q, [images[:32], images[32:64]])
    return ivit.freeze(q)


def engine_latency(engine: ivit.Engine, x: torch.Tensor, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after 5 warm-up calls."""
    for _ in range(5):
        engine(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        engine(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, work: Path, repeat: int, rounds: int, qemu_images: int) -> dict[str, Any]:
    prog = calibrated_program(name)
    out = work / name
    res = c99.export(prog, out)
    row: dict[str, Any] = {"model": name, "params": prog.num_parameters(), "const_bytes": res.info["const_bytes"],
                           "arena_bytes": res.info["arena_bytes"], "peak_live_bytes": res.info["peak_live_bytes"],
                           "kernels": res.info["kernels"], "nodes": res.info["nodes"]}
    v = c99.verify(prog, out, images=8)
    row["host_bitexact"] = v.bitexact
    x = c99.check_images(prog, 1)["random"]
    exe = build_host_harness(out, work / f"{name}_host")
    # the same C with vector code allowed (what a host build without the no-FPU proof flag gives)
    simd = build_host_harness(out, work / f"{name}_simd", flags=["-std=c99", "-O3", "-march=native"])
    engine = ivit.Engine(prog)
    times: dict[str, list[float]] = {"host_c_ms": [], "host_c_simd_ms": [], "engine_ms": []}
    for _ in range(rounds):  # interleaved rounds; the best round's median is kept (a busy machine only slows)
        times["host_c_ms"].append(time_host_harness(exe, x, work / f"{name}_host", repeat)[1])
        times["host_c_simd_ms"].append(time_host_harness(simd, x, work / f"{name}_simd", repeat)[1])
        times["engine_ms"].append(engine_latency(engine, x, repeat))
    for k, v in times.items():
        row[k] = 1e3 * min(v)
        row[k.replace("_ms", "_round_medians_ms")] = [1e3 * t for t in v]
    row["speedup"] = row["engine_ms"] / row["host_c_ms"]
    miss = cortexm.missing_tools()
    if miss:
        row["cortex_m3"] = f"n/a (missing {', '.join(miss)})"
        return row
    objs = cortexm.compile_model(out)
    sizes = cortexm.section_sizes(objs)
    row["flash_bytes"] = sizes["text"] + sizes["data"]
    row["code_bytes"] = row["flash_bytes"] - res.info["const_bytes"]
    row["soft_float_symbols"] = cortexm.soft_float_symbols(objs)
    sets = c99.check_images(prog, qemu_images, seed=1)
    xs = torch.cat([sets["random"], sets["zeros"], sets["full"], sets["checker"]])
    run = cortexm.run_images(out, xs, work / f"{name}_arm", timeout=1800)
    row["m3_bitexact"] = torch.equal(run.logits, ivit.Engine(prog, backend="reference")(xs))
    ins = run.instructions()
    row["m3_instructions_per_image"] = int(statistics.median(ins))
    row["m3_instructions_range"] = [min(ins), max(ins)]
    row["m3_calibration_insns_per_tick"] = run.calibrated_insns_per_tick
    row["qemu_seconds"] = run.seconds
    return row


def _fmt(v: Any, unit: str = "") -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3f}{unit}" if v < 10 else f"{v:.1f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return "n/a" if v is None else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "flash (code + consts)", "consts", "RAM (arena)", "peak live", "host C ms",
            "host C -O3 -march=native ms", "engine ms", "C vs engine", "M3 instructions / image",
            "bit-exact host / M3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m3 = r.get("m3_instructions_per_image")
        cells = [r["model"], _fmt(r.get("flash_bytes")), _fmt(r["const_bytes"]), _fmt(r["arena_bytes"]),
                 _fmt(r["peak_live_bytes"]), _fmt(r["host_c_ms"]), _fmt(r["host_c_simd_ms"]), _fmt(r["engine_ms"]),
                 f"{r['speedup']:.1f}x",
                 _fmt(m3) if m3 is not None else r.get("cortex_m3", "n/a"),
                 f"{_fmt(r['host_bitexact'])} / {_fmt(r.get('m3_bitexact'))}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--repeat", type=int, default=200, help="timed calls per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best is kept)")
    ap.add_argument("--qemu-images", type=int, default=2, help="random images on the Cortex-M3 (+ 4 extremes)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if host_cc() is None:
        print("no C compiler (cc): nothing to measure", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ivit-mcu-") as tmp:
        for name in args.models:
            t0 = time.perf_counter()
            rows.append(measure(name, Path(tmp), args.repeat, args.rounds, args.qemu_images))
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    result = {"host": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                       "python": platform.python_version(), "torch": torch.__version__, "cc_flags": list(HOST_FLAGS),
                       "threads": 1},
              "cortex_m3": {"emulator": "qemu-system-arm -M mps2-an385 -cpu cortex-m3 -icount shift=0",
                            "compiler": "arm-none-eabi-gcc -O2 -mcpu=cortex-m3 -mthumb -mfloat-abi=soft"},
              "rows": rows}
    print(table(rows))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = all(r["host_bitexact"] and r.get("m3_bitexact", True) and not r.get("soft_float_symbols") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
