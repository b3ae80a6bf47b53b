"""The ``reference`` backend: every op by its reference semantics in ``ivit.ops`` (the specification)."""

from __future__ import annotations

from .base import Backend, register_backend

__all__ = ["REFERENCE"]

REFERENCE = register_backend(Backend(
    name="reference",
    devices=("cpu",),
    available=lambda: True,
    kernels=lambda: {},
    passes=(),
    description="ivit.ops reference semantics through aten (the specification)",
))
