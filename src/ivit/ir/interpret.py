"""Run a validated program with a table of kernels (the op set's references by default).

This is the whole execution model of every Python backend: bind each node's constants and attributes
to a kernel once (``plan``), then call the steps in order on a batch, freeing each value after its
last use (``run``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import IvitError
from .opset import OPSET
from .program import Node, Program
from .types import TType

__all__ = ["Step", "KernelFactory", "plan", "run", "check_pixels", "reference_factory"]

#: ``factory(node, consts, input types, output type) -> step function`` taking the node's inputs
KernelFactory = Callable[[Node, Mapping[str, Tensor], list[TType], TType], Callable[..., Tensor]]


def reference_factory(node: Node, consts: Mapping[str, Tensor], in_types: list[TType], out: TType
                      ) -> Callable[..., Tensor]:
    """The op set's reference semantics with the node's constants and attributes bound."""
    return functools.partial(OPSET[node.op].reference, **consts, **node.attrs)


@dataclass(frozen=True)
class Step:
    """``output = fn(*inputs)`` for program node ``index``."""

    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]
    output: str
    index: int


def plan(prog: Program, types: Mapping[str, TType], consts: Mapping[str, Tensor],
         factories: Mapping[str, KernelFactory]) -> list[Step]:
    """One step per node; ``factories[op]`` (or the reference) builds its function."""
    steps = []
    for i, node in enumerate(prog.nodes):
        kw = {c: consts[k] for c, k in node.consts.items()}
        make = factories.get(node.op, reference_factory)
        fn = make(node, kw, [types[v] for v in node.inputs], types[node.output])
        steps.append(Step(fn, node.inputs, node.output, i))
    return steps


def check_pixels(pixels: Tensor, in_chans: int, img_size: tuple[int, int],
                 device: torch.device | None = None) -> None:
    """Reject anything that is not a uint8 ``(B, in_chans, H, W)`` batch of the model's size."""
    if not isinstance(pixels, Tensor):
        raise IvitError(f"expected a torch.Tensor of uint8 pixels, got {type(pixels).__name__}")
    if pixels.dtype != torch.uint8:
        raise IvitError(f"expected uint8 pixels (0..255), got dtype {pixels.dtype}")
    if pixels.dim() != 4 or pixels.shape[1] != in_chans or tuple(pixels.shape[2:]) != tuple(img_size):
        raise IvitError(
            f"expected pixels of shape (B, {in_chans}, {img_size[0]}, {img_size[1]}), got {tuple(pixels.shape)}"
        )
    if pixels.shape[0] == 0:
        raise IvitError("empty batch")
    if pixels.device.type == "meta" or (device is not None and pixels.device.type not in ("cpu", device.type)):
        raise IvitError(f"pixels on device {pixels.device} cannot be run here")


def run(prog: Program, steps: list[Step], pixels: Tensor,
        trace: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Execute ``steps`` on ``pixels``; ``trace(node_index, out)`` sees every step's output."""
    last: dict[str, int] = {}
    for i, st in enumerate(steps):
        for v in st.inputs:
            last[v] = i
    env: dict[str, Tensor] = {prog.input: pixels}
    with torch.inference_mode():
        for i, st in enumerate(steps):
            out = st.fn(*[env[v] for v in st.inputs])
            env[st.output] = out
            if trace is not None:
                trace(st.index, out)
            for v in st.inputs:
                if last.get(v) == i and v != prog.output:
                    env.pop(v, None)
    return env[prog.output]
