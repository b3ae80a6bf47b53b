"""CPU latency of the ivit integer engine against PyTorch, ONNX Runtime and OpenVINO.

Every method runs in one process, on the same timm weights (random init, fixed seed), the same
random images and the same thread count. Peers get float normalized input ``(N, 3, 224, 224)``;
the ivit engine gets the uint8 pixels those floats were normalized from.

Timing: methods are built first, then timed round-robin (round-major, so slow drift of the
machine hits every method alike). In each round a method runs ``--warmup`` untimed calls, then
``--iters`` timed calls; the round's median is kept, and the reported ``median_ms`` pools the
timed calls of all rounds (``min_ms`` is their minimum). Every thread count of ``--threads`` (default
1 and 2) is a separate pass over all models and batches.

Fidelity: ``cos vs fp32`` is the cosine similarity of each method's logits to the fp32 PyTorch logits on
the benchmark images (scale-free, so the integer logits of ivit compare directly). ``ivit_int`` is
``ivit.Engine(program)``: the default backend (its name and code path are in the note).

A method whose optional package is missing, or whose conversion fails, is reported as
``n/a (reason)`` and the others go on.

Example::

    python benchmarks/cpu_latency.py --models deit_tiny_patch16_224 --batches 1 --rounds 1 --threads 1 2 \\
        --json cpu.json --png cpu.png
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
METHODS = (
    "torch_fp32",
    "torch_bf16",
    "ort_fp32",
    "ort_int8_dynamic",
    "ort_int8_static",
    "ov_f32",
    "ov_default",
    "ov_int8",
    "ivit_int",
)
BASELINE = "torch_fp32"
OURS = "ivit_int"
IMAGE_SIZE = 224

Runner = Callable[[], Any]
"""A zero-argument callable: one inference on the benchmark batch (input bound inside)."""


@dataclass
class Row:
    """One (model, batch, method) result; ``median_ms`` is None when the method is n/a."""

    model: str
    batch: int
    method: str
    median_ms: float | None = None
    min_ms: float | None = None
    round_medians_ms: list[float] = field(default_factory=list)
    cos_vs_fp32: float | None = None
    status: str = "ok"
    error: str | None = None
    note: str | None = None
    threads: int = 0
    rounds: int = 0
    warmup: int = 0
    iters: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    cpu: str = ""


# ---------------------------------------------------------------------------------------------------
# Inputs and shared artifacts
# ---------------------------------------------------------------------------------------------------


def random_pixels(n: int, seed: int) -> torch.Tensor:
    """Random uint8 RGB images.

    Args:
        n: Number of images.
        seed: Generator seed.

    Returns:
        uint8 tensor ``(n, 3, 224, 224)``.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen, dtype=torch.uint8)


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(pixels / 255 - mean) / std`` per channel, as float32 ``(N, 3, H, W)``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels.float() / 255.0 - m) / s).contiguous()


@dataclass
class Case:
    """Everything one (model, batch) needs, shared by the method builders."""

    name: str
    model: torch.nn.Module
    batch: int
    threads: int
    pixels: torch.Tensor  # (N, 3, 224, 224) uint8, the timed input of ivit
    x: torch.Tensor  # (N, 3, 224, 224) float32, the timed input of the peers
    calib_pixels: list[torch.Tensor]  # batches of (N, 3, 224, 224) uint8
    calib_x: list[torch.Tensor]  # the same batches, normalized
    workdir: Path
    _onnx: Path | None = None
    _onnx_error: str | None = None

    def onnx_path(self) -> Path:
        """Export the fp32 model to ONNX once (static shape ``x.shape``) and cache the path."""
        if self._onnx is not None:
            return self._onnx
        if self._onnx_error is not None:
            raise RuntimeError(self._onnx_error)
        path = self.workdir / f"{self.name}_b{self.batch}.onnx"
        try:
            _export_onnx(self.model, self.x, path)
        except Exception as exc:  # any exporter failure makes the ONNX rows n/a
            self._onnx_error = f"onnx export failed: {_short(exc)}"
            raise RuntimeError(self._onnx_error) from exc
        self._onnx = path
        return path


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    """Legacy TorchScript export (dynamo=False); falls back to the dynamo exporter if it is gone."""
    kwargs: dict[str, Any] = dict(input_names=["input"], output_names=["logits"], opset_version=17)
    with _quiet(), torch.no_grad():
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
        except Exception:
            torch.onnx.export(model, (x,), str(path), dynamo=True, **kwargs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Python warnings and root-logger chatter of the converters (ORT quantization, nncf)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _short(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception, with its type, cut to ``limit`` characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    msg = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# Method builders: each returns (runner, note) or raises
# ---------------------------------------------------------------------------------------------------


def _torch_fp32(case: Case) -> tuple[Runner, str | None]:
    model, x = case.model, case.x

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run, None


def _torch_bf16(case: Case) -> tuple[Runner, str | None]:
    model, x = case.model, case.x

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    return run, "autocast cpu bf16"


def _ort_session(path: Path, threads: int) -> Any:
    ort = importlib.import_module("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _ort_runner(path: Path, case: Case) -> Runner:
    sess = _ort_session(path, case.threads)
    name = sess.get_inputs()[0].name
    feed = {name: case.x.numpy()}

    def run() -> Any:
        return sess.run(None, feed)[0]

    return run


def _ort_fp32(case: Case) -> tuple[Runner, str | None]:
    importlib.import_module("onnxruntime")
    return _ort_runner(case.onnx_path(), case), None


def _ort_preprocessed(case: Case) -> Path:
    """ONNX model after ORT's quantization pre-processing (shape inference, graph optimization)."""
    src = case.onnx_path()
    dst = src.with_name(src.stem + "_pre.onnx")
    if not dst.exists():
        from onnxruntime.quantization.shape_inference import quant_pre_process

        try:
            quant_pre_process(str(src), str(dst))
        except Exception:  # pre-processing is an optimization; quantize the raw graph
            return src
    return dst


def _ort_int8_dynamic(case: Case) -> tuple[Runner, str | None]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = case.workdir / f"{case.name}_b{case.batch}_int8_dynamic.onnx"
    with _quiet():
        quantize_dynamic(str(_ort_preprocessed(case)), str(dst), weight_type=QuantType.QInt8)
    return _ort_runner(dst, case), "QInt8 weights, dynamic activations"


def _ort_int8_static(case: Case) -> tuple[Runner, str | None]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src = _ort_preprocessed(case)
    input_name = _ort_session(src, case.threads).get_inputs()[0].name
    batches = [b.numpy() for b in case.calib_x]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    dst = case.workdir / f"{case.name}_b{case.batch}_int8_static.onnx"
    with _quiet():
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # U8S8: on x86 ORT's S8S8 QDQ path measured ~3x slower here (deit_tiny b1, 2 threads).
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        )
    return _ort_runner(dst, case), "QDQ U8S8 per-channel, MatMul/Gemm/Conv"


def _ov_model(case: Case) -> Any:
    """An OpenVINO model: converted from the ONNX file, or from the torch model if export failed."""
    ov = importlib.import_module("openvino")
    try:
        return ov.convert_model(str(case.onnx_path()))
    except Exception:
        with _quiet():
            return ov.convert_model(case.model, example_input=case.x)


def _ov_runner(ov_model: Any, case: Case, precision: str | None) -> tuple[Runner, str]:
    ov = importlib.import_module("openvino")
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": case.threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    x = case.x.numpy()

    def run() -> Any:
        return request.infer({0: x}, share_inputs=True)[0]

    try:
        note = f"precision {compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}"
    except Exception:
        note = "precision ?"
    return run, note


def _ov_f32(case: Case) -> tuple[Runner, str | None]:
    return _ov_runner(_ov_model(case), case, "f32")


def _ov_default(case: Case) -> tuple[Runner, str | None]:
    return _ov_runner(_ov_model(case), case, None)


def _ov_int8(case: Case) -> tuple[Runner, str | None]:
    nncf = importlib.import_module("nncf")
    data = nncf.Dataset([b.numpy() for b in case.calib_x])
    with _quiet():
        quantized = nncf.quantize(
            _ov_model(case),
            data,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(case.calib_x),
        )
    run, note = _ov_runner(quantized, case, None)
    return run, f"nncf int8, {note}"


def _ivit_runner(
    model: torch.nn.Module,
    example_uint8_batch: torch.Tensor,
    calib_uint8_batch: torch.Tensor | None = None,
) -> Runner:
    """The ivit integer engine on uint8 pixels.

    Args:
        model: The float timm model (copied; the original is left as it is for the other methods).
        example_uint8_batch: uint8 ``(N, 3, 224, 224)`` pixels, the timed input.
        calib_uint8_batch: uint8 pixels to calibrate on; defaults to ``example_uint8_batch``.

    Returns:
        A zero-argument callable running ``Engine(program)(example_uint8_batch)``.
    """
    import ivit

    calib = example_uint8_batch if calib_uint8_batch is None else calib_uint8_batch
    qm = ivit.quantize(copy.deepcopy(model))
    ivit.calibrate(qm, [calib])
    prog = ivit.freeze(qm)
    eng = ivit.Engine(prog)
    x = example_uint8_batch

    def run() -> Any:
        return eng(x)

    run.backend = ivit_backend_note(eng)  # type: ignore[attr-defined]
    return run


def ivit_backend_note(eng: Any) -> str:
    """The engine's backend, with the code path of a compiled one (e.g. ``compiled (avx512vnni)``)."""
    info = eng.compiled.info if getattr(eng, "compiled", None) is not None else {}
    if info.get("fallback"):
        return f"{eng.backend} (fallback: {info['fallback']})"
    return f"{eng.backend} ({info['isa']})" if info.get("isa") else str(eng.backend)


def _ivit_int(case: Case) -> tuple[Runner, str | None]:
    run = _ivit_runner(case.model, case.pixels, case.calib_pixels[0])
    return run, f"uint8 pixels in, backend {run.backend}"  # type: ignore[attr-defined]


BUILDERS: dict[str, Callable[[Case], tuple[Runner, str | None]]] = {
    "torch_fp32": _torch_fp32,
    "torch_bf16": _torch_bf16,
    "ort_fp32": _ort_fp32,
    "ort_int8_dynamic": _ort_int8_dynamic,
    "ort_int8_static": _ort_int8_static,
    "ov_f32": _ov_f32,
    "ov_default": _ov_default,
    "ov_int8": _ov_int8,
    "ivit_int": _ivit_int,
}


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def _to_numpy(out: Any) -> np.ndarray | None:
    """Logits as a float64 numpy array from whatever a runner returns, or None."""
    if isinstance(out, (list, tuple)) and out:
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, torch.Tensor):
        return out.detach().to(torch.float64).cpu().numpy()
    try:
        return np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Cosine similarity of two flattened logit arrays (scale-free, so integer logits compare too)."""
    if a is None or b is None or a.size != b.size:
        return None
    a, b = a.ravel(), b.ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else None


def _time_round(run: Runner, warmup: int, iters: int) -> list[float]:
    """``warmup`` untimed calls, then ``iters`` timed calls; returns per-call milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_case(
    case: Case,
    methods: Sequence[str],
    args: argparse.Namespace,
    progress: Progress,
    meta: dict[str, Any],
) -> list[Row]:
    """Build every method for one (model, batch), then time them round-robin.

    Args:
        case: The model, inputs and work directory.
        methods: Method names, in order.
        args: Parsed CLI arguments (rounds, warmup, iters).
        progress: Rich progress to report on.
        meta: Fields copied into every row (threads, rounds, versions, cpu, ...).

    Returns:
        One row per method, n/a rows included.
    """
    rows = {m: Row(model=case.name, batch=case.batch, method=m, **meta) for m in methods}
    runners: dict[str, Runner] = {}
    ref: np.ndarray | None = None
    build = progress.add_task(f"build {case.name} b{case.batch}", total=len(methods))
    for m in methods:
        progress.update(build, description=f"build {case.name} b{case.batch}: {m}")
        try:
            run, note = BUILDERS[m](case)
            out = _to_numpy(run())
            if m == BASELINE:
                ref = out
            rows[m].note = note
            rows[m].cos_vs_fp32 = _cosine(out, ref) if m != BASELINE else 1.0
            runners[m] = run
        except Exception as exc:  # one broken peer must not stop the benchmark
            rows[m].status = "n/a"
            rows[m].error = _short(exc)
        progress.advance(build)
    progress.remove_task(build)

    samples: dict[str, list[float]] = {m: [] for m in runners}
    timing = progress.add_task(f"time {case.name} b{case.batch}", total=args.rounds * len(runners))
    for r in range(args.rounds):
        for m, run in runners.items():
            progress.update(timing, description=f"time {case.name} b{case.batch}: round {r + 1} {m}")
            try:
                times = _time_round(run, args.warmup, args.iters)
            except Exception as exc:
                rows[m].status, rows[m].error = "n/a", _short(exc)
                continue
            rows[m].round_medians_ms.append(statistics.median(times))
            samples[m].extend(times)
            progress.advance(timing)
    progress.remove_task(timing)

    for m, times in samples.items():
        if rows[m].status == "ok" and times:
            rows[m].median_ms = statistics.median(times)
            rows[m].min_ms = min(times)
    return [rows[m] for m in methods]


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------


def print_case(console: Console, rows: list[Row]) -> None:
    """A table of one (model, batch) and the "ivit_int vs best peer" line."""
    model, batch = rows[0].model, rows[0].batch
    base = next((r.median_ms for r in rows if r.method == BASELINE and r.median_ms), None)
    table = Table(title=f"{model}  batch {batch}  threads {rows[0].threads}")
    for col, just in (
        ("method", "left"),
        ("median ms", "right"),
        ("cos vs fp32", "right"),
        ("min ms", "right"),
        ("speedup vs torch_fp32", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        if r.median_ms is None:
            table.add_row(r.method, "[yellow]n/a[/]", "", "", "", f"[yellow]{r.error}[/]")
            continue
        speed = f"{base / r.median_ms:.2f}x" if base else "-"
        cos = f"{r.cos_vs_fp32:.4f}" if r.cos_vs_fp32 is not None else "-"
        table.add_row(r.method, f"{r.median_ms:.2f}", cos, f"{r.min_ms:.2f}", speed, r.note or "")
    console.print(table)

    ours = next((r for r in rows if r.method == OURS), None)
    peers = [r for r in rows if r.method != OURS and r.median_ms is not None]
    best = min(peers, key=lambda r: r.median_ms or 0.0) if peers else None
    if ours is None:
        return
    if ours.median_ms is None or best is None:
        why = f"n/a ({ours.error})" if ours.median_ms is None else "no peer ran"
        console.print(f"ivit_int vs best peer: {why}")
        return
    ratio = best.median_ms / ours.median_ms  # type: ignore[operator]
    word = "faster" if ratio >= 1 else "slower"
    factor = ratio if ratio >= 1 else 1 / ratio
    console.print(
        f"ivit_int vs best peer: {ours.median_ms:.2f} ms vs {best.median_ms:.2f} ms ({best.method}) "
        f"-> {factor:.2f}x {word}"
    )


def write_png(rows: list[Row], path: Path, methods: Sequence[str]) -> None:
    """Grouped bars of median ms: one panel per batch size, one group per model, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = sorted({(r.threads, r.batch) for r in rows})
    models = list(dict.fromkeys(r.model for r in rows))
    ncol = len({b for _, b in panels})
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(max(7, 2.2 * len(models) + 3) * ncol, 5 * nrow), squeeze=False
    )
    width = 0.8 / max(1, len(methods))
    # One color per method whatever subset is selected; ours in black so it stands out.
    colors = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(x for x in METHODS if x != OURS)}
    colors[OURS] = "black"
    lookup = {(r.model, r.threads, r.batch, r.method): r.median_ms for r in rows}
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    for ax, (threads, batch) in zip(flat, panels, strict=False):
        for j, m in enumerate(methods):
            xs, ys = [], []
            for i, model in enumerate(models):
                x = i + (j - (len(methods) - 1) / 2) * width
                v = lookup.get((model, threads, batch, m))
                if v is None:  # n/a: a label where the bar would be
                    ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="gray")
                else:
                    xs.append(x)
                    ys.append(v)
            ax.bar(xs, ys, width, color=colors[m])
        ax.set_xticks(range(len(models)), [m.replace("_patch", "\n_patch") for m in models], fontsize=8)
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"batch {batch}, {threads} thread{'s' if threads > 1 else ''}")
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colors[m], label=m) for m in methods]  # also for methods that are all n/a
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ours = next((r.note for r in rows if r.method == OURS and r.note), "")
    fig.suptitle(f"CPU latency ({rows[0].cpu}); ivit: {ours}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def library_versions() -> dict[str, str]:
    """Versions of the libraries in the comparison ("missing" when not importable)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "timm", "numpy", "onnx", "onnxruntime", "openvino", "nncf", "ivit"):
        try:
            mod = importlib.import_module(name)
        except Exception:
            out[name] = "missing"
            continue
        if name == "torch":  # keep the local build tag (+cpu, +cu130)
            out[name] = str(mod.__version__)
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = str(getattr(mod, "__version__", "?"))
    return out


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo, or platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """CLI arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        metavar="METHOD",
        help=f"subset of {', '.join(METHODS)}",
    )
    p.add_argument("--rounds", type=int, default=3, help="timing rounds per method")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls at the start of each round")
    p.add_argument("--iters", type=int, default=20, help="timed calls per round")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts (every method uses the same count; one pass per count)")
    p.add_argument("--calib-batches", type=int, default=2, help="random calibration batches (int8 peers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and images")
    p.add_argument("--json", type=Path, default=None, help="write the rows as a JSON list")
    p.add_argument("--png", type=Path, default=None, help="write a grouped bar chart")
    args = p.parse_args(argv)
    if min(args.batches) < 1 or args.rounds < 1 or args.iters < 1 or args.warmup < 0 or min(args.threads) < 1:
        p.error("batches, rounds, iters and threads must be >= 1, warmup >= 0")
    if args.calib_batches < 1:
        p.error("--calib-batches must be >= 1")
    return args


@contextlib.contextmanager
def _in_directory(path: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped to a file: do not squeeze the tables into 80 columns
        console = Console(width=150)
    methods = list(dict.fromkeys(args.methods))
    if BASELINE not in methods:
        console.print(f"[yellow]{BASELINE} not selected: no speedup column[/]")
    versions, cpu = library_versions(), cpu_name()
    console.print(f"cpu: {cpu}  threads: {args.threads}  versions: {versions}")
    if "ivit_int" in methods:
        import ivit

        console.print(f"ivit backend: {os.environ.get('IVIT_BACKEND') or ivit.backends.DEFAULT_BACKEND}")

    rows: list[Row] = []
    # ONNX Runtime's quantization tools drop temporary files into the working directory: run in a scratch one
    args.json = args.json.resolve() if args.json else None
    args.png = args.png.resolve() if args.png else None
    with (
        tempfile.TemporaryDirectory(prefix="ivit_cpu_bench_") as tmp,
        _in_directory(tmp),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress,
    ):
        for threads in args.threads:
            torch.set_num_threads(threads)
            meta = dict(threads=threads, rounds=args.rounds, warmup=args.warmup, iters=args.iters, versions=versions,
                        cpu=cpu)
            for name in args.models:
                torch.manual_seed(args.seed)
                model = timm.create_model(name, pretrained=False).eval()
                cfg = model.pretrained_cfg
                mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
                for batch in args.batches:
                    pixels = random_pixels(batch, args.seed)
                    calib_pixels = [random_pixels(batch, args.seed + 1 + i) for i in range(args.calib_batches)]
                    case_dir = Path(tmp) / f"{name}_b{batch}_t{threads}"
                    case_dir.mkdir()
                    case = Case(
                        name=name,
                        model=model,
                        batch=batch,
                        threads=threads,
                        pixels=pixels,
                        x=normalize(pixels, mean, std),
                        calib_pixels=calib_pixels,
                        calib_x=[normalize(c, mean, std) for c in calib_pixels],
                        workdir=case_dir,
                    )
                    case_rows = bench_case(case, methods, args, progress, meta)
                    rows.extend(case_rows)
                    print_case(console, case_rows)

    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if args.png is not None:
        try:
            write_png(rows, args.png, methods)
            console.print(f"wrote {args.png}")
        except Exception as exc:
            console.print(f"[yellow]png not written: {_short(exc)}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
