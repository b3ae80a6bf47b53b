"""Kernel flavours of the C generator: what differs between a microcontroller build and other C runtimes.

The op lowerings (``lowerings.py``) write portable integer C; everything target-specific is read from a
``Target``: the loop-index type, the ``restrict`` spelling, a pragma placed before a kernel's outermost
loop (``#pragma omp parallel for`` for a threaded runtime), extra headers, the symbol prefix and
per-op overrides of the lowering table (a SIMD ``linear``, a batched ``attention`` ...).  The
default, ``MCU``, is the standalone C99 library for a Cortex-M without an FPU: 32-bit loop counters,
no pragmas, nothing beyond ``<stdint.h>``, ``<stddef.h>`` and ``<string.h>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Target", "MCU"]


@dataclass(frozen=True)
class Target:
    """A C kernel flavour.

    Attributes:
        name: a short name written into the generated files.
        index_type: C type of loop counters and element offsets (``int32_t`` on a 32-bit MCU; a
            runtime for big batches would use ``ptrdiff_t``/``int64_t``).
        restrict: the ``restrict`` qualifier of kernel pointer parameters (``""`` to drop it).
        outer_pragma: a line placed before each kernel's outermost loop over independent rows
            (e.g. ``"#pragma omp parallel for"``); empty for the MCU.
        headers: extra ``#include`` lines of ``model.c`` (e.g. ``<omp.h>``, ``<immintrin.h>``).
        prefix: prefix of every external symbol (entry point, constant arrays) so that several
            generated modules link into one program.
        overrides: ``op -> lowering`` replacing the default lowering of that op for this flavour.
    """

    name: str = "mcu"
    index_type: str = "int32_t"
    restrict: str = "restrict"
    outer_pragma: str = ""
    headers: tuple[str, ...] = ()
    prefix: str = "ivit_"
    overrides: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    def with_prefix(self, prefix: str) -> Target:
        return replace(self, prefix=prefix)


#: The standalone C99 library for microcontrollers (the ``c`` exporter).
MCU = Target()
