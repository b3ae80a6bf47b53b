"""Backends that run integer programs, and the engine that asks their registry."""

from . import compiled, cpu, reference, triton  # noqa: F401  (register the backends; triton imports lazily)
from .base import BACKENDS, Backend, Compiled, backend_names, get_backend, register_backend
from .engine import DEFAULT_BACKEND, Engine, load

__all__ = ["BACKENDS", "Backend", "Compiled", "backend_names", "get_backend", "register_backend", "DEFAULT_BACKEND",
           "Engine", "load"]
