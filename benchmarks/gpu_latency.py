"""GPU latency of the ivit ``triton`` engine against PyTorch on the same GPU, and its bit-exactness.

Models (timm, random init, fixed seed): DeiT-S, DeiT-B, Swin-T at 224x224; batch 1 and 64.  Methods:

* ``torch_fp32``: the timm model in float32 (TF32 off, PyTorch's default for matmuls; cuDNN TF32 off too);
* ``torch_bf16``: the model cast to bfloat16;
* ``torch_bf16_compile``: bfloat16 + ``torch.compile`` (``mode="reduce-overhead"``, i.e. CUDA graphs, at batch 1;
  the default mode at larger batches);
* ``ivit_triton``: the frozen integer program on the ``triton`` backend, uint8 pixels in, int32 logits out, replayed
  from a CUDA graph (``ivit_triton_eager``: the same engine called step by step, without the graph).

Peers get normalized float input ``(N, 3, 224, 224)``; the ivit engine gets the uint8 pixels those floats were
normalized from.  The integer model is calibrated on the CPU on a few of those images and frozen; its triton engine's
logits are compared with the CPU engine's (``torch.equal``) on ``--exact-images`` images, at every batch size.

Timing: ``--warmup`` untimed calls, then ``--iters`` calls each timed with CUDA events and synchronized; the median
and the minimum are reported.  Compilation time (torch.compile, Triton JIT) is outside the timed calls and reported
as ``build_s``.  A global ``--budget-s`` (default 290 s) bounds the whole run: a method that no longer fits is
reported as ``skipped (time budget)``, never estimated.

Targets (issue 15): at batch 64 ``ivit_triton`` at least 1.3x faster than ``torch_bf16_compile`` and 6x faster than
``torch_fp32``; at batch 1 under 1 ms; bit-exact with the CPU engine.

Without a CUDA GPU the script prints one line and exits with status 2; nothing is measured or estimated.

Example::

    python benchmarks/gpu_latency.py --json gpu_latency.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODELS = ("deit_small_patch16_224", "deit_base_patch16_224", "swin_tiny_patch4_window7_224")
# in the order they run (the budget cuts from the end): ours first, torch.compile (the slowest to build) last
METHODS = ("ivit_triton", "torch_fp32", "torch_bf16", "ivit_triton_eager", "torch_bf16_compile")
OURS = "ivit_triton"
IMAGE_SIZE = 224
NO_GPU_EXIT = 2


@dataclass
class Row:
    """One (model, batch, method) result; ``median_ms`` is None when the method did not run."""

    model: str
    batch: int
    method: str
    median_ms: float | None = None
    min_ms: float | None = None
    build_s: float | None = None
    status: str = "ok"
    note: str = ""
    times_ms: list[float] = field(default_factory=list)


class Budget:
    """The whole run's time budget."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def fits(self, need: float) -> bool:
        return self.left() >= need


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def random_pixels(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g)


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() / 255.0 - m) / s


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Milliseconds of ``iters`` calls, each between CUDA events and synchronized."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def cuda_graph(fn: Callable[[], torch.Tensor], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture ``fn`` (static inputs bound inside) in a CUDA graph after warm-up calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


@dataclass
class ModelCase:
    name: str
    model: torch.nn.Module  # float32, CPU
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixels: dict[int, torch.Tensor]  # batch -> uint8 CPU pixels
    program: Any = None
    exact: dict[str, Any] = field(default_factory=dict)


def build_case(name: str, batches: list[int], seed: int) -> ModelCase:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    pixels = {b: random_pixels(b, seed + b) for b in batches}
    return ModelCase(name, model, mean, std, pixels)


def freeze_program(case: ModelCase, calib_images: int) -> tuple[Any, float]:
    """Quantize, calibrate on the CPU (a few of the benchmark's images) and freeze; returns (program, seconds)."""
    import ivit

    t0 = time.perf_counter()
    qm = ivit.quantize(copy.deepcopy(case.model))
    calib = random_pixels(calib_images, 12345)
    ivit.calibrate(qm, [calib])
    prog = ivit.freeze(qm, self_check=False)  # exactness is checked below, against the CPU engine
    return prog, time.perf_counter() - t0


def bench_torch(case: ModelCase, batch: int, method: str, args: argparse.Namespace, budget: Budget) -> Row:
    row = Row(case.name, batch, method)
    need = 90.0 if method == "torch_bf16_compile" else 10.0
    if not budget.fits(need):
        row.status = "skipped (time budget)"
        return row
    try:
        t0 = time.perf_counter()
        dtype = torch.float32 if method == "torch_fp32" else torch.bfloat16
        model = copy.deepcopy(case.model).to("cuda", dtype).eval()
        x = normalize(case.pixels[batch].cuda(), case.mean, case.std).to(dtype)
        if method == "torch_bf16_compile":
            mode = "reduce-overhead" if batch == 1 else "default"
            row.note = f"mode={mode}"
            model = torch.compile(model, mode=mode, dynamic=False)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        for _ in range(3 if method == "torch_bf16_compile" else 1):  # compile / CUDA-graph recording
            run()
        torch.cuda.synchronize()
        row.build_s = round(time.perf_counter() - t0, 2)
        row.times_ms = time_calls(run, args.warmup, args.iters)
    except Exception as e:  # noqa: BLE001 - reported as the row's status; the other methods go on
        row.status = f"failed: {_short(e)}"
    return row


def bench_ivit(case: ModelCase, batch: int, graph: bool, args: argparse.Namespace, budget: Budget,
               cpu_logits: torch.Tensor) -> Row:
    import ivit
    import ivit.backends.triton  # noqa: F401  (registers the backend if the registry does not yet)

    row = Row(case.name, batch, OURS if graph else OURS + "_eager")
    if not budget.fits(20.0):
        row.status = "skipped (time budget)"
        return row
    try:
        t0 = time.perf_counter()
        eng = ivit.Engine(case.program, backend="triton", device="cuda")
        static = case.pixels[batch].cuda()
        eager_out = eng(static)  # compiles the Triton kernels (cached on disk across runs)
        torch.cuda.synchronize()
        k = min(args.exact_images, batch)
        exact = bool(torch.equal(eager_out[:k].cpu(), cpu_logits[:k]))
        fn: Callable[[], Any] = lambda: eng(static)  # noqa: E731
        if graph:
            try:
                g, out = cuda_graph(lambda: eng(static))
                g.replay()
                torch.cuda.synchronize()
                exact = exact and bool(torch.equal(out[:k].cpu(), cpu_logits[:k]))
                fn = g.replay
                row.note = "CUDA graph"
            except Exception as e:  # noqa: BLE001 - reported; the eager row still measures the engine
                row.status = f"failed: CUDA graph capture: {_short(e, 160)}"
                case.exact[f"batch{batch}_eager_only"] = exact
                return row
        row.build_s = round(time.perf_counter() - t0, 2)
        case.exact[f"batch{batch}{'' if graph else '_eager'}"] = exact
        row.times_ms = time_calls(fn, args.warmup, args.iters)
        if not exact:
            row.status = "NOT BIT-EXACT"
    except Exception as e:  # noqa: BLE001
        row.status = f"failed: {_short(e)}"
        traceback.print_exc(file=sys.stderr)
    return row


def finish(row: Row) -> Row:
    if row.times_ms:
        row.median_ms = round(statistics.median(row.times_ms), 4)
        row.min_ms = round(min(row.times_ms), 4)
        row.times_ms = [round(t, 4) for t in row.times_ms]
    return row


def _ms(rows: list[Row], model: str, batch: int, method: str) -> float | None:
    for r in rows:
        if (r.model, r.batch, r.method) == (model, batch, method) and r.status in ("ok",) and r.median_ms:
            return r.median_ms
    return None


def targets(rows: list[Row], cases: list[ModelCase], batches: list[int]) -> dict[str, Any]:
    """Each target of issue 15 per model: the measured ratio or latency and whether it is met (None: not measured)."""
    out: dict[str, Any] = {}
    for c in cases:
        t: dict[str, Any] = {}
        ours64, fp64, cmp64 = (_ms(rows, c.name, 64, m) for m in (OURS, "torch_fp32", "torch_bf16_compile"))
        if 64 in batches:
            t["b64_speedup_vs_bf16_compile"] = None if not (ours64 and cmp64) else round(cmp64 / ours64, 3)
            t["b64_speedup_vs_fp32"] = None if not (ours64 and fp64) else round(fp64 / ours64, 3)
            t["b64_vs_bf16_compile_met"] = None if t["b64_speedup_vs_bf16_compile"] is None \
                else t["b64_speedup_vs_bf16_compile"] >= 1.3
            t["b64_vs_fp32_met"] = None if t["b64_speedup_vs_fp32"] is None else t["b64_speedup_vs_fp32"] >= 6.0
        if 1 in batches:
            ours1 = _ms(rows, c.name, 1, OURS)
            t["b1_ms"] = ours1
            t["b1_under_1ms_met"] = None if ours1 is None else ours1 < 1.0
        t["bit_exact"] = c.exact or None
        out[c.name] = t
    return out


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GPU latency (median of timed calls, ms)")
    for col in ("model", "batch", "method", "median ms", "min ms", "vs fp32", "vs bf16+compile", "build s", "status"):
        table.add_column(col, justify="right" if col not in ("model", "method", "status") else "left")
    for r in rows:
        fp = _ms(rows, r.model, r.batch, "torch_fp32")
        cmp = _ms(rows, r.model, r.batch, "torch_bf16_compile")
        sp = f"{fp / r.median_ms:.2f}x" if fp and r.median_ms else "-"
        sc = f"{cmp / r.median_ms:.2f}x" if cmp and r.median_ms else "-"
        status = r.status + (f" ({r.note})" if r.note else "")
        table.add_row(r.model, str(r.batch), r.method, f"{r.median_ms:.3f}" if r.median_ms else "n/a",
                      f"{r.min_ms:.3f}" if r.min_ms else "n/a", sp, sc, f"{r.build_s}" if r.build_s else "-", status)
    Console(width=170).print(table)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
                           "capability": list(torch.cuda.get_device_capability(0)),
                           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--exact-images", type=int, default=2, help="images compared with the CPU engine per batch size")
    p.add_argument("--calib-images", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=290.0, help="time budget of the whole run (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_latency: no CUDA GPU (torch.cuda.is_available() is False); nothing measured", flush=True)
        return NO_GPU_EXIT
    budget = Budget(args.budget_s)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import ivit

    rows: list[Row] = []
    cases: list[ModelCase] = []
    for name in args.models:
        if not budget.fits(30.0):
            rows += [Row(name, b, m, status="skipped (time budget)") for b in args.batches for m in args.methods]
            continue
        case = build_case(name, args.batches, args.seed)
        cases.append(case)
        cpu_logits: dict[int, torch.Tensor] = {}
        if any(m.startswith(OURS) for m in args.methods):
            try:
                case.program, secs = freeze_program(case, args.calib_images)
                cpu = ivit.Engine(case.program, backend="cpu")
                for b in args.batches:
                    cpu_logits[b] = cpu(case.pixels[b][: args.exact_images])
                print(f"{name}: integer program frozen in {secs:.1f} s ({len(case.program.nodes)} ops)", flush=True)
            except Exception as e:  # noqa: BLE001
                case.program = None
                print(f"{name}: could not freeze: {_short(e)}", flush=True)
        for b in args.batches:
            for m in args.methods:
                if m.startswith(OURS):
                    if case.program is None:
                        row = Row(name, b, m, status="failed: no program")
                    else:
                        row = bench_ivit(case, b, m == OURS, args, budget, cpu_logits[b])
                else:
                    row = bench_torch(case, b, m, args, budget)
                rows.append(finish(row))
                r = rows[-1]
                print(f"  {name} b{b} {m}: {r.median_ms if r.median_ms is not None else 'n/a'} ms {r.status}",
                      flush=True)
                torch.cuda.empty_cache()
        torch._dynamo.reset()

    print_table(rows)
    result = {"environment": environment(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items()},
              "rows": [asdict(r) for r in rows], "targets": targets(rows, cases, args.batches),
              "total_s": round(time.monotonic() - budget.start, 1)}
    print(json.dumps(result["targets"], indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    exact = all(v is not False for c in cases for v in c.exact.values())
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
