"""Exporters of integer programs (ONNX, TOSA, C99), each registered where it is defined.

``export(program, fmt, out, **options)`` lowers a validated program with the exporter registered as
``fmt``; ``verify(program, fmt, artefact)`` runs the artefact in its real runtime and compares.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from .._io import check_output_path
from ..errors import IvitError
from ..ir.limits import Limits
from ..ir.program import Program, load_program
from .base import EXPORTERS, Exporter, ExportResult, VerifyResult, check_supported, exporter_names, get_exporter

__all__ = ["EXPORTERS", "Exporter", "ExportResult", "VerifyResult", "export", "verify", "exporter_names",
           "get_exporter", "run_cli_export"]

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


def run_cli_export(file: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str], verify: bool = False,
                   limits: Limits | None = None, images: int = 8, seed: int = 0, **options: Any) -> int:
    """``ivit export FILE --format FMT -o OUT [--verify]``: load, export (atomically), optionally verify in the
    target's runtime; prints a result table.  Returns the exit code: 0 done (and bit-exact), 1 the
    verification found a difference, 2 a user error (printed as one line on stderr; nothing is written)."""
    from rich.console import Console
    from rich.table import Table

    try:
        ex = get_exporter(fmt)
        out_p = Path(out)
        check_output_path(out_p.parent / f".{out_p.name}.probe", f"{fmt} output")  # its folder, before any work
        program = load_program(file, limits)
        res = export(program, fmt, out_p, **options)
        vres = ex.verify(program, res.path, images=images, seed=seed) if verify else None
    except IvitError as e:
        print(f"ivit: error: {e}", file=sys.stderr)
        return 2
    table = Table(title=f"ivit export: {Path(file).name} -> {fmt}", show_header=False)
    table.add_row("output", str(res.path))
    for k, v in res.info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        table.add_row(str(k).replace("_", " "), str(v))
    if vres is not None:
        table.add_row("runtime", vres.runtime)
        table.add_row("bit-exact", "yes" if vres.bitexact else "NO")
        table.add_row("checked", vres.detail)
    Console(soft_wrap=True).print(table)
    return 0 if vres is None or vres.bitexact else 1
