"""``ivit bench``: median latency of a program's integer engine next to the float network it was frozen from.

The float twin is rebuilt from the program's metadata (``spec_from_program``: the timm name and the exact
``model_args`` a workflow recorded), size-checked on the meta device against ``Limits.max_float_params``,
against the parameter count recorded at freeze time and against the program's own size, then built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..bench import median_ms
from ..errors import IvitError
from ..ir.limits import Limits
from ..ir.program import Program
from ..training.trainer import FloatWrapper
from .common import check_positive
from .evaluate import engine_for, open_program, program_errors
from .spec import ModelSpec, spec_from_program

__all__ = ["BenchRun", "BenchResult", "run_bench", "float_twin"]


def float_twin(prog: Program, limits: Limits | None = None) -> tuple[ModelSpec, nn.Module, int]:
    """The float network ``prog`` was frozen from, as a model taking uint8 pixels (random weights: for timing).

    Returns ``(spec, FloatWrapper, parameters)``.  Raises ``IvitError`` when the metadata cannot describe it.
    """
    spec = spec_from_program(prog.meta)
    n = spec.check_size(limits)
    want = prog.meta.get("float_params")
    if want is not None and n != want:
        raise IvitError(f"{spec.describe()} has {n:,} parameters but the program was frozen from a network with "
                        f"{want}")
    if n > 2 * prog.num_parameters() + 100_000:  # a name or model_args that do not describe this program
        raise IvitError(f"{spec.describe()} has {n:,} parameters, far more than the program's "
                        f"{prog.num_parameters():,} integer values")
    return spec, FloatWrapper(spec.create(limits)).eval(), n


@dataclass(frozen=True)
class BenchRun:
    """Latency of ``program`` at ``batch`` images (median of ``iters`` calls after warmup), ``threads`` torch
    threads (0: torch's choice); ``reference`` also times the reference backend; ``float_model`` times the float
    twin (fp32 and bf16 autocast)."""

    program: str | os.PathLike[str]
    batch: int = 1
    iters: int = 10
    threads: int = 0
    backend: str | None = None
    reference: bool = False
    float_model: bool = True
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        check_positive(batch=self.batch, iters=self.iters)
        if not isinstance(self.threads, int) or self.threads < 0:
            raise IvitError("threads must be >= 0")


@dataclass
class BenchResult:
    """``rows``: (method, median ms), the first row being the baseline; ``model``: what the float rows ran
    (None: no float twin, with ``note`` saying why)."""

    rows: list[tuple[str, float]]
    batch: int
    threads: int
    model: str | None
    float_params: int | None
    note: str | None = None
    program: Path | None = None


def run_bench(cfg: BenchRun) -> BenchResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    engine = open_program(cfg.program, cfg.backend, cfg.limits)
    c, h, w = engine.program.input_shape
    x = torch.randint(0, 256, (cfg.batch, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows: list[tuple[str, float]] = []
    model = note = None
    n_params = None
    if cfg.float_model:
        try:
            spec, fmodel, n_params = float_twin(engine.program, cfg.limits)
            model = spec.describe()
        except IvitError as e:
            note = f"no float twin: {e}"
        else:
            rows.append(("torch fp32", median_ms(fmodel, x, iters=cfg.iters)))

            def bf16(t: Tensor) -> Tensor:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fmodel(t)

            rows.append(("torch bf16 autocast", median_ms(bf16, x, iters=cfg.iters)))
    with program_errors(cfg.program):
        rows.append((f"ivit int ({engine.backend})", median_ms(engine, x, iters=cfg.iters)))
        if cfg.reference:
            ref = engine_for(engine.program, cfg.program, "reference", cfg.limits)
            rows.append(("ivit int (reference)", median_ms(ref, x, iters=cfg.iters)))
    return BenchResult(rows, cfg.batch, torch.get_num_threads(), model, n_params, note, Path(cfg.program))
