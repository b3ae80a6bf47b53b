"""Kernel factories of the ``triton`` backend: bind a node's constants and attributes to a Triton launcher.

Nothing here imports triton at import time: a factory imports ``kernels`` when the engine plans a program.  At
plan time constants are moved to int32 per-channel vectors, scalar attention constants are read once, and window
masks become uint8, so running a step never copies from the host or synchronizes (CUDA-graph capturable).  Each
step checks its operands against the validated static types (dtype, rank, shape for some batch size) before any
pointer reaches a kernel.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType

import torch
from torch import Tensor

from ...errors import IvitError
from ...ir.program import Node
from ...ir.types import TType

__all__ = ["triton_kernels", "proposed_kernels", "interpreting", "available", "load_kernels"]

Fn = Callable[..., Tensor]
_KERNELS_MODULE = __name__.rsplit(".", 1)[0] + ".kernels"


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` when they were first imported
    (or now, if they have not been imported yet)."""
    mod = sys.modules.get(_KERNELS_MODULE)
    if mod is not None:
        return bool(mod.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """triton is importable and there is a CUDA GPU (or the interpreter is on)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):
        return False
    return interpreting() or torch.cuda.is_available()


def load_kernels() -> ModuleType:
    """The kernels module (imports triton)."""
    return importlib.import_module(_KERNELS_MODULE)


def _device_ok(t: Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise IvitError(f"the triton backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                    f"got a tensor on {t.device}")


def _check(x: Tensor, t: TType) -> None:
    """The operand has the validated dtype and shape for some batch size (never trust a caller)."""
    if x.dtype != t.dtype or x.dim() != t.rank:
        raise RuntimeError(f"operand {x.dtype}{tuple(x.shape)} does not match {t.describe()}")
    b = 1
    if t.batch_axis is not None:
        k = t.shape[t.batch_axis]
        b = x.shape[t.batch_axis] // k
        if b < 1 or b * k != x.shape[t.batch_axis]:
            raise RuntimeError(f"operand {tuple(x.shape)} does not match {t.describe()}")
    if tuple(x.shape) != t.concrete(b):
        raise RuntimeError(f"operand {tuple(x.shape)} does not match {t.describe()}")


def _step(kernel: Fn, ins: list[TType], bound: Mapping[str, object]) -> Fn:
    def fn(*xs: Tensor) -> Tensor:
        for x, t in zip(xs, ins, strict=True):
            _check(x, t)
            _device_ok(x)
        return kernel(*xs, **bound)
    return fn


def _factory(op: str, channel_consts: tuple[str, ...] = ()) -> Callable[..., Fn]:
    """A factory binding the node's constants (the ``channel_consts`` widened to contiguous int32 ``(C,)`` on their
    device, once) and attributes to ``kernels.KERNELS[op]``."""

    def factory(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
        k = load_kernels()
        bound: dict[str, object] = {}
        for name, t in consts.items():
            _device_ok(t)
            bound[name] = k.channels(t, ins[0].shape[-1], t.device) if name in channel_consts else t.contiguous()
        bound.update(node.attrs)
        return _step(k.KERNELS[op], ins, bound)
    return factory


def _gemm_factory(op: str, channel_consts: tuple[str, ...]) -> Callable[..., Fn]:
    """For the proposed fused GEMM ops: per-channel constants are widened to the output channels (weight rows)."""

    def factory(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
        k = load_kernels()
        n = int(consts["weight"].shape[0])
        bound: dict[str, object] = {}
        for name, t in consts.items():
            _device_ok(t)
            bound[name] = k.channels(t, n, t.device) if name in channel_consts else t.contiguous()
        bound.update(node.attrs)
        return _step(k.PROPOSED[op], ins, bound)
    return factory


def _shiftgelu_factory(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    """The 256-entry table is computed once; it is copied to a device once, on the first run there."""
    k = load_kernels()
    table = k.gelu_table(node.attrs["x0"], node.attrs["n"], node.attrs["k_out"])
    on: dict[torch.device, Tensor] = {}

    def kernel(x: Tensor, **attrs: int) -> Tensor:
        t = on.get(x.device)
        if t is None:
            t = on[x.device] = table.to(x.device)
        return k.shiftgelu(x, table=t, **attrs)
    return _step(kernel, ins, dict(node.attrs))


def _attention_factory(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
    """Scalar score constants read once (a host sync at plan time, none while running); mask as uint8."""
    k = load_kernels()
    bound: dict[str, object] = dict(node.attrs)
    for name, t in consts.items():
        _device_ok(t)
        if name in ("score_mult", "score_shift"):
            bound[name] = int(t.reshape(-1)[0])
        elif name == "mask":
            bound[name] = t.to(torch.uint8).contiguous()
        else:
            bound[name] = t.to(torch.int32).contiguous()
    return _step(k.attention, ins, bound)


def _softmax_factory(op: str) -> Callable[..., Fn]:
    def factory(node: Node, consts: Mapping[str, Tensor], ins: list[TType], out: TType) -> Fn:
        k = load_kernels()
        bound: dict[str, object] = dict(node.attrs)
        if "mask" in consts:
            _device_ok(consts["mask"])
            bound["mask"] = consts["mask"].to(torch.uint8).contiguous()
        return _step(k.KERNELS[op], ins, bound)
    return factory


def triton_kernels() -> dict[str, Callable[..., Fn]]:
    """The ``op -> kernel factory`` table of the triton backend (imports nothing: triton loads at plan time)."""
    return {
        "linear": _factory("linear"),
        "matmul": _factory("matmul"),
        "requantize": _factory("requantize", ("mult", "shift")),
        "add_requantize": _factory("add_requantize", ("mult_a", "shift_a", "mult_b", "shift_b")),
        "requantize_table": _factory("requantize_table", ("mult", "shift")),
        "shiftgelu": _shiftgelu_factory,
        "layernorm": _factory("layernorm", ("mult", "shift", "offset")),
        "layernorm32": _factory("layernorm32", ("mult", "shift", "offset")),
        "shiftmax": _softmax_factory("shiftmax"),
        "shiftmax_rel": _softmax_factory("shiftmax_rel"),
        "attn_normalize": _factory("attn_normalize"),
        "attention": _attention_factory,
    }


def proposed_kernels() -> dict[str, Callable[..., Fn]]:
    """Factories for the fused GEMM ops proposed for the op set (``linear_requantize``, ``linear_add_requantize``,
    ``linear_requantize_table``): merge them into ``triton_kernels()`` once the op set defines those ops."""
    return {
        "linear_requantize": _gemm_factory("linear_requantize", ("mult", "shift")),
        "linear_add_requantize": _gemm_factory("linear_add_requantize", ("mult_a", "shift_a", "mult_b", "shift_b")),
        "linear_requantize_table": _gemm_factory("linear_requantize_table", ("mult", "shift")),
    }
