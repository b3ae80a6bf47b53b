"""Exporters: write an integer program for another runtime, and check it there.

An exporter registers itself with ``register_exporter``: its name (the ``--format``), the pip extra or
system tools it needs, a lowering table (``op -> lowering``; one per op of the op set, fused ops
included, except the ones it lists in ``unsupported`` with the reason), an ``export`` function and a
``verify`` function that runs the exported artefact in its real runtime (ONNX Runtime, the TOSA
reference model, a C compiler or an emulator) and compares its integers with the engine's
(``torch.equal``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import IvitError
from ..ir.program import Program

__all__ = ["check_images", "Exporter", "ExportResult", "VerifyResult", "register_exporter", "get_exporter", "EXPORTERS",
           "exporter_names"]


@dataclass
class ExportResult:
    """What ``export`` wrote: the output path(s) and facts for reports (ops used, sizes ...)."""

    path: Path
    files: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyResult:
    """Outcome of running an exported artefact in its runtime on ``images`` random images."""

    runtime: str
    images: int
    bitexact: bool
    detail: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exporter:
    """A registered export target.

    Attributes:
        name: the ``--format`` value.
        description: one line.
        requirement: what to install when it is missing (``pip install 'ivit[onnx]'`` ...).
        available: whether its packages/tools are importable here.
        lowerings: returns the ``op -> lowering`` table.
        unsupported: returns ``op -> reason`` for ops it cannot lower (e.g. 64-bit legacy ops on a
            32-bit target); a program using one is refused with that reason before anything is written.
        export: ``export(program, out, **options) -> ExportResult`` (writes atomically).
        verify: ``verify(program, artefact, images, seed) -> VerifyResult``.
    """

    name: str
    description: str
    requirement: str
    available: Callable[[], bool]
    lowerings: Callable[[], Mapping[str, Callable[..., Any]]]
    unsupported: Callable[[], Mapping[str, str]]
    export: Callable[..., ExportResult]
    verify: Callable[..., VerifyResult]


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(ex: Exporter) -> Exporter:
    EXPORTERS[ex.name] = ex
    return ex


def exporter_names() -> list[str]:
    return sorted(EXPORTERS)


def get_exporter(name: str) -> Exporter:
    ex = EXPORTERS.get(name)
    if ex is None:
        raise IvitError(f"unknown export format {name!r} (choose from {', '.join(exporter_names())})")
    if not ex.available():
        raise IvitError(f"export format {name} needs {ex.requirement}")
    return ex


def check_supported(ex: Exporter, program: Program) -> None:
    """Refuse (one line) a program using an op the exporter cannot lower, before anything is written."""
    unsup = ex.unsupported()
    low = ex.lowerings()
    for i, n in enumerate(program.nodes):
        if n.op in unsup:
            raise IvitError(f"{ex.name} export: node {i} ({n.op}) cannot be lowered: {unsup[n.op]}")
        if n.op not in low:
            raise IvitError(f"{ex.name} export: no lowering for op {n.op}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def check_images(program: Program, images: int = 8, seed: int = 0) -> dict[str, Tensor]:
    """The images every exporter's ``verify`` runs, uint8 ``(N, C, H, W)``: ``random`` (``images`` of them, seeded),
    ``zeros`` (all 0), ``full`` (all 255) and ``checker`` (a 0/255 checkerboard and its inverse)."""
    c, h, w = program.input_shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = (((yy + xx) % 2) * 255).to(torch.uint8).expand(c, h, w)
    return {
        "random": torch.randint(0, 256, (images, c, h, w), generator=g, dtype=torch.uint8),
        "zeros": torch.zeros(1, c, h, w, dtype=torch.uint8),
        "full": torch.full((1, c, h, w), 255, dtype=torch.uint8),
        "checker": torch.stack([board, 255 - board]),
    }
