"""Backends: named kernel tables (with the passes they want) that run a validated program.

A backend registers itself with ``register_backend``: its name, the devices it runs on, an
availability check, a kernel-factory table (``op -> factory``; ops it leaves out use the op set's
reference) and the passes (``ivit.ir.passes``) it applies to a program before planning.  The engine
asks this registry; it has no list of backends of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import IvitError
from ..ir.interpret import KernelFactory
from ..ir.program import Program
from ..ir.validate import ProgramInfo

__all__ = ["Backend", "Compiled", "register_backend", "get_backend", "backend_names", "BACKENDS"]


@dataclass(frozen=True)
class Backend:
    """A registered backend.

    Attributes:
        name: ``"reference"``, ``"cpu"`` ...
        devices: torch device types it runs on.
        available: whether it can run here (compiler present, package installed ...).
        kernels: returns the ``op -> kernel factory`` table (called once per engine).
        passes: program passes applied before planning, in order.
        description: one line for ``ivit inspect`` and error messages.
        native: whether kernels run machine code outside aten (the integer-only proof then also
            disassembles it, see ``ivit.verify``).
        compile: optional whole-program hook ``compile(program, info, consts) -> Compiled``: the backend
            runs the program as one native call instead of one step per node (``kernels`` is then unused).
    """

    name: str
    devices: tuple[str, ...]
    available: Callable[[], bool]
    kernels: Callable[[], Mapping[str, KernelFactory]]
    passes: tuple[str, ...] = ()
    description: str = ""
    native: bool = False
    aliases: tuple[str, ...] = field(default=())
    compile: Callable[[Program, ProgramInfo, Mapping[str, Tensor]], Compiled] | None = None


@dataclass
class Compiled:
    """A whole program compiled by a backend: ``run(pixels) -> output`` and the native files it executes
    (disassembled by the integer-only proof)."""

    run: Callable[[Tensor], Tensor]
    libraries: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


BACKENDS: dict[str, Backend] = {}
_ALIASES: dict[str, str] = {}


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    for a in backend.aliases:
        _ALIASES[a] = backend.name
    return backend


def backend_names() -> list[str]:
    return sorted(BACKENDS)


#: what ``"fast"`` (the default) means on each device type: the first of these backends available here
FAST: dict[str, tuple[str, ...]] = {"cpu": ("compiled", "cpu"), "cuda": ("triton",)}


def get_backend(name: str, device: str = "cpu") -> Backend:
    """The registered backend ``name`` (or alias); ``"fast"`` is the first available of ``FAST[device]``."""
    if name == "fast":
        order = FAST.get(device, ("cpu",))
        name = next((n for n in order if n in BACKENDS and BACKENDS[n].available()), order[-1])
    b = BACKENDS.get(_ALIASES.get(name, name))
    if b is None:
        raise IvitError(f"unknown backend {name!r} (choose from {', '.join(backend_names())})")
    return b
