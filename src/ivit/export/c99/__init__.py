"""The ``c`` exporter: a standalone, integer-only C99 library of a program, for microcontrollers without an FPU.

``export(program, out_dir)`` writes ``model.h`` (the entry point ``int ivit_run(const uint8_t *pixels,
int32_t *logits, void *arena)`` and ``#define``s of the input geometry, classes, arena and constant
bytes), ``model.c`` (one static function per kernel, each with its formula; a static arena plan),
``model_weights.h``/``model_weights.c`` (the constants as ``const`` arrays, for flash) and
``ivit_export.json`` (what was exported, for ``verify``).  The directory is written atomically.

One ``ivit_run`` call classifies ``batch`` images (default 1).  The code uses only integer arithmetic,
no allocation and nothing from libc beyond ``<stdint.h>``, ``<stddef.h>`` and ``<string.h>``.

``verify(program, out_dir)`` compiles the library with the system ``cc`` and the strict flags
(``host.HOST_FLAGS``: ``-std=c99 -O2 -Wall -Wextra -Werror -pedantic -mgeneral-regs-only``), runs it on
random, all-0, all-255 and checkerboard images and compares its logits with the reference engine
(``torch.equal``).  ``cortexm`` builds and runs the same library on an emulated Cortex-M3.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ... import __version__ as _ivit_version
from ..._io import check_output_folder, sha256_tensors
from ...codegen.c.generator import DEFAULT_PASSES, CModule, generate, lower_graph, lower_program, plan_arena
from ...codegen.c.lowerings import LOWERINGS
from ...codegen.c.target import MCU, Target
from ...errors import IvitError
from ...ir.program import Program
from ..base import Exporter, ExportResult, VerifyResult, check_images, register_exporter
from .host import HOST_FLAGS, build_host_harness, host_cc, run_host_harness, write_files

__all__ = ["export", "verify", "generate", "lower_program", "lower_graph", "CModule", "Target", "MCU", "LOWERINGS",
           "DEFAULT_PASSES", "parse_size", "check_images", "program_digest", "plan_arena", "MANIFEST"]

MANIFEST = "ivit_export.json"
_STALE_SECONDS = 600.0


def parse_size(v: int | str | None, what: str = "size") -> int | None:
    """Bytes from ``123``, ``"64K"``, ``"1.5M"``, ``"2MiB"`` (K/M/G are 1024-based); None stays None."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise IvitError(f"{what} must be a number of bytes, got {v!r}")
    if isinstance(v, int):
        n = v
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)(?:i?[bB])?\s*", str(v))
        if not m:
            raise IvitError(f"{what} must be bytes like 65536, 64K or 2M, got {v!r}")
        n = int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])
    if n < 0:
        raise IvitError(f"{what} must not be negative, got {v!r}")
    return n


def program_digest(program: Program) -> str:
    """SHA-256 of a program's graph and constants (names, dtypes, shapes, bytes): the ``.ivit`` checksum."""
    return sha256_tensors(program.consts, program.graph_json())


def _check_limits(mod: CModule, max_ram: int | None, max_flash: int | None) -> None:
    if max_ram is not None and mod.arena_bytes > max_ram:
        raise IvitError(f"c export: the arena needs {mod.arena_bytes} bytes of RAM (peak of live activations "
                        f"{mod.peak_bytes}), more than --max-ram {max_ram}")
    if max_flash is not None and mod.const_bytes > max_flash:
        raise IvitError(f"c export: the constants take {mod.const_bytes} bytes of flash, more than --max-flash "
                        f"{max_flash}")


def _remove_stale(out: Path) -> None:
    now = time.time()
    for p in out.parent.glob(f".{out.name}.*.tmp"):
        try:
            if now - p.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise IvitError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise IvitError(f"output directory {out} is not empty and holds no ivit C export; choose another")
    check_output_folder(out)


def export(program: Program, out: str | Path, max_ram: int | str | None = None, max_flash: int | str | None = None,
           batch: int = 1, target: Target = MCU, passes: Sequence[str] = DEFAULT_PASSES) -> ExportResult:
    """Write the C library of ``program`` to directory ``out`` (atomically: a temporary sibling, then a rename).

    Args:
        max_ram: refuse (``IvitError`` with the numbers) when the arena needs more bytes.
        max_flash: refuse when the constants take more bytes.
        batch: images per ``ivit_run`` call.
    """
    out = Path(out)
    max_ram, max_flash = parse_size(max_ram, "--max-ram"), parse_size(max_flash, "--max-flash")
    _prepare_out(out)
    mod = lower_program(program, batch=batch, target=target, passes=passes)
    _check_limits(mod, max_ram, max_flash)
    info: dict[str, Any] = {
        "format": "ivit-c99", "ivit_version": _ivit_version, "target": target.name, "batch": batch,
        "model": program.meta.get("model"), "family": program.meta.get("family"),
        "input_shape": list(program.input_shape), "num_classes": program.meta.get("num_classes"),
        "output_size": mod.output.numel // batch if mod.output else None,
        "logit_scale": program.meta.get("logit_scale", 1.0), "arena_bytes": mod.arena_bytes,
        "peak_live_bytes": mod.peak_bytes, "const_bytes": mod.const_bytes, "passes": list(passes),
        "nodes": mod.nodes, "kernels": mod.kernels, "views": mod.views, "ops": mod.ops,
        "program_sha256": program_digest(program),
    }
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else "."))
    old: Path | None = None
    try:
        write_files({**mod.files, MANIFEST: json.dumps(info, indent=2) + "\n"}, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}.tmp")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    files = [out / n for n in sorted([*mod.files, MANIFEST])]
    return ExportResult(path=out, files=files, info=info)


def _read_manifest(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        raise IvitError(f"{d} is not an ivit C export (no readable {MANIFEST})") from None


def verify(program: Program, out: str | Path, images: int = 8, seed: int = 0, work: str | Path | None = None
           ) -> VerifyResult:
    """Compile the export in ``out`` with the system ``cc`` (``HOST_FLAGS``), run it on the ``check_images``
    and compare its logits with ``ivit.Engine(program, backend="reference")`` (``torch.equal``)."""
    from ...backends.engine import Engine

    out = Path(out)
    man = _read_manifest(out)
    if man.get("program_sha256") != program_digest(program):
        raise IvitError(f"{out} was exported from a different program")
    cc = host_cc()
    if cc is None:
        raise IvitError("c verify needs a C compiler (cc)")
    batch = int(man.get("batch", 1))
    sets = check_images(program, images, seed)
    engine = Engine(program, backend="reference")
    with tempfile.TemporaryDirectory(prefix="ivit-c99-") as tmpd:
        wd = Path(work) if work is not None else Path(tmpd)
        exe = build_host_harness(out, wd)
        details, ok, n = [], True, 0
        for name, x in sets.items():
            pad = (-x.shape[0]) % batch
            xp = torch.cat([x, x[:1].expand(pad, *x.shape[1:])]) if pad else x
            got = run_host_harness(exe, xp, wd)[: x.shape[0]]
            want = engine(x).to(torch.int32)
            same = torch.equal(got, want)
            ok &= same
            n += x.shape[0]
            if not same:
                bad = int((got != want).any(dim=1).sum()) if got.shape == want.shape else x.shape[0]
                details.append(f"{name}: {bad}/{x.shape[0]} images differ")
    detail = "; ".join(details) or f"{n} images ({', '.join(sets)}) bit-exact"
    return VerifyResult(runtime=f"host C ({Path(cc).name} {' '.join(HOST_FLAGS)})", images=n, bitexact=ok,
                        detail=detail, info={"flags": list(HOST_FLAGS)})


register_exporter(Exporter(
    name="c",
    description="standalone C99 library: integer only, no FPU, no malloc, static arena (microcontrollers)",
    requirement="nothing to export; a C compiler (cc) to verify",
    available=lambda: True,
    lowerings=lambda: LOWERINGS,
    unsupported=lambda: {},
    export=export,
    verify=verify,
))

