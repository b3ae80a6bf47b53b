"""Exporters of integer programs (ONNX, TOSA, C99), each registered where it is defined.

``export(program, fmt, out, **options)`` lowers a validated program with the exporter registered as
``fmt``; ``verify(program, fmt, artefact)`` runs the artefact in its real runtime and compares.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..ir.program import Program
from .base import EXPORTERS, Exporter, ExportResult, VerifyResult, check_supported, exporter_names, get_exporter

__all__ = ["EXPORTERS", "Exporter", "ExportResult", "VerifyResult", "export", "verify", "exporter_names",
           "get_exporter"]

#: exporter modules, imported on first use (each needs its own optional packages only when used)
_MODULES = ("ivit.export.onnx", "ivit.export.tosa", "ivit.export.c99")


def _load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name is None or not e.name.startswith("ivit.export"):
                raise


_load_all()


def export(program: Program, fmt: str, out: str | Path, **options: Any) -> ExportResult:
    """Write ``program`` for target ``fmt`` to ``out`` (atomically); refuses unsupported ops first."""
    ex = get_exporter(fmt)
    check_supported(ex, program)
    return ex.export(program, Path(out), **options)


def verify(program: Program, fmt: str, artefact: str | Path, images: int = 8, seed: int = 0) -> VerifyResult:
    """Run ``artefact`` in ``fmt``'s real runtime on random images and compare with the engine."""
    return get_exporter(fmt).verify(program, Path(artefact), images=images, seed=seed)
