"""The integer engine: runs a validated ``Program`` on a registered backend.

``Engine(program, backend)`` validates the program (``ivit.ir.validate``), applies the backend's passes
(fusions with reference semantics), validates the result again, and plans one step per node with
the backend's kernels.  ``engine(pixels)`` takes uint8 ``(B, C, H, W)`` and returns the program's
integer output (int32 logits ``(B, classes)``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import IvitError
from ..ir import interpret
from ..ir.limits import Limits
from ..ir.passes import apply_passes
from ..ir.program import Program, load_program
from ..ir.validate import validate
from .base import Backend, Compiled, get_backend

__all__ = ["Engine", "load", "DEFAULT_BACKEND"]

#: the backend ``Engine`` uses unless told otherwise (env ``IVIT_BACKEND`` overrides)
DEFAULT_BACKEND = "fast"


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise IvitError(f"unknown device {device!r}") from None


class Engine:
    """Runs a frozen integer program.

    ``engine(pixels)`` returns the integer output; ``engine(pixels, dequantize=True)`` returns
    ``logit_scale * logits`` as float32 (the only float op, after the integer program has finished).

    Args:
        program: a ``Program`` (from ``ivit.freeze`` or ``ivit.load``).
        backend: a registered backend name: ``"fast"`` (the default) is ``"compiled"`` where a C compiler
            with OpenMP is here, else ``"cpu"``; ``"reference"`` is the specification.  Env
            ``IVIT_BACKEND`` overrides the default.
        device: torch device of constants and execution (default cpu).
        limits: resource limits (``ivit.Limits``) checked before anything runs.
    """

    def __init__(self, program: Program, backend: str | None = None, device: str | torch.device = "cpu",
                 limits: Limits | None = None) -> None:
        self.device = _device(device)
        self.backend_def: Backend = get_backend(backend or os.environ.get("IVIT_BACKEND", DEFAULT_BACKEND),
                                                self.device.type)
        self.backend = self.backend_def.name
        if self.device.type not in self.backend_def.devices:
            raise IvitError(f"backend {self.backend} runs on {', '.join(self.backend_def.devices)}, not {self.device}")
        if not self.backend_def.available():
            raise IvitError(f"backend {self.backend} is not available here")
        self.limits = limits or Limits()
        validate(program, self.limits)
        self.program = program
        self.executed = apply_passes(program, self.backend_def.passes)
        self.info = validate(self.executed, self.limits)
        self.consts = {k: v.to(self.device) for k, v in self.executed.consts.items()}
        self.compiled: Compiled | None = None
        if self.backend_def.compile is not None:
            self.compiled = self.backend_def.compile(self.executed, self.info, self.consts)
            self.steps: list[interpret.Step] = []
        else:
            self.steps = interpret.plan(self.executed, self.info.types, self.consts, self.backend_def.kernels())

    @property
    def meta(self) -> dict[str, Any]:
        return self.program.meta

    @property
    def num_classes(self) -> int:
        return int(self.program.meta["num_classes"])

    def run(self, pixels: Tensor, trace: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """Execute the program; ``trace(i, out)`` is called with each step's output, ``i`` being the index of
        the node in ``self.executed`` (the program after the backend's passes)."""
        c, h, w = self.program.input_shape
        interpret.check_pixels(pixels, c, (h, w), self.device)
        need = pixels.shape[0] * self.info.peak_bytes_per_image
        if need > self.limits.max_run_bytes:
            raise IvitError(f"batch of {pixels.shape[0]} needs {need} bytes (limit max_run_bytes="
                            f"{self.limits.max_run_bytes}); use smaller batches")
        if self.compiled is not None:
            if trace is not None:
                raise IvitError(f"backend {self.backend} runs the program as one native call: no per-node trace")
            with torch.inference_mode():
                return self.compiled.run(pixels.to(self.device))
        return interpret.run(self.executed, self.steps, pixels.to(self.device), trace)

    def __call__(self, pixels: Tensor, dequantize: bool = False) -> Tensor:
        out = self.run(pixels)
        if dequantize:
            return out.to(torch.float32) * float(self.program.meta.get("logit_scale", 1.0))
        return out


def load(path: str | os.PathLike[str], backend: str | None = None, device: str | torch.device = "cpu",
         limits: Limits | None = None) -> Engine:
    """Load a ``.ivit`` file into an ``Engine`` (validated completely; nothing in the file is executed)."""
    return Engine(load_program(path, limits), backend=backend, device=device, limits=limits)
