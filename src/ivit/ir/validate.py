"""Complete static validation of a program: structure, every node against its op, types, ranges, resources.

``validate(program)`` infers the type of every value (dtype, shape with a symbolic batch, interval)
from the declared input geometry through the whole graph, checking each node with its op's rule in
``ivit.ir.opset``, then checks the program as a whole (every value used, output shape and dtype,
metadata, constant and activation bytes).  A program that passes runs without error and gives the
same integers on every backend; one that fails raises ``ProgramError`` with what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .limits import Limits
from .opset import OPSET, Check
from .types import DTYPE_NAMES, ProgramError, TType

if TYPE_CHECKING:
    from .program import Node, Program

__all__ = ["validate", "ProgramInfo", "input_type"]

_OUT_DTYPES = (torch.int8, torch.int16, torch.int32)


@dataclass(frozen=True)
class ProgramInfo:
    """What validation learned: the type of every value and the resources the program needs."""

    types: dict[str, TType]
    const_bytes: int
    peak_bytes_per_image: int

    @property
    def output(self) -> TType:
        return self.types["__output__"]


def _meta_checks(prog: Program, limits: Limits) -> tuple[int, int, int]:
    meta = prog.meta
    shape = meta.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(s) is int and s > 0 for s in shape)):
        raise ProgramError("meta.input_shape must be [C, H, W] with positive integers")
    c, h, w = shape
    if c > limits.max_in_chans or h > limits.max_image_side or w > limits.max_image_side:
        raise ProgramError(f"input {c}x{h}x{w} exceeds the limits ({limits.max_in_chans} channels, "
                           f"{limits.max_image_side} pixels a side)")
    nc = meta.get("num_classes")
    if type(nc) is not int or not 0 <= nc <= limits.max_classes:
        raise ProgramError(f"meta.num_classes must be an integer in [0, {limits.max_classes}]")
    ls = meta.get("logit_scale", 1.0)
    if not isinstance(ls, (int, float)) or isinstance(ls, bool) or not math.isfinite(ls) or ls <= 0:
        raise ProgramError("meta.logit_scale must be a positive finite number")
    for key in ("family", "model", "config", "ivit_version"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, str) or len(v) > 4096):
            raise ProgramError(f"meta.{key} must be a string")
    for key in ("arch", "model_args"):
        v = meta.get(key)
        if v is not None and not isinstance(v, dict):
            raise ProgramError(f"meta.{key} must be an object")
    return c, h, w


def input_type(prog: Program) -> TType:
    c, h, w = prog.input_shape
    return TType.of(torch.uint8, (1, c, h, w), 0)


def _check_node_fields(i: int, node: Node, prog: Program) -> None:
    where = f"node {i} ({node.op})"
    spec = OPSET.get(node.op)
    if spec is None:
        raise ProgramError(f"node {i}: unknown op {node.op!r}")
    if prog.format_version < spec.since and not spec.fused:
        raise ProgramError(f"{where}: op not allowed in a format-{prog.format_version} file")
    if len(node.inputs) != len(spec.inputs):
        raise ProgramError(f"{where}: expected {len(spec.inputs)} inputs, got {len(node.inputs)}")
    for cname, key in node.consts.items():
        cs = next((s for s in spec.consts if s.name == cname), None)
        if cs is None:
            raise ProgramError(f"{where}: unexpected constant {cname!r}")
        t = prog.consts.get(key)
        if t is None:
            raise ProgramError(f"{where}: constant tensor {key!r} missing from the file")
        if t.dtype not in cs.dtypes:
            want = "/".join(DTYPE_NAMES[d] for d in cs.dtypes)
            raise ProgramError(f"{where}: constant {cname} must be {want}, got {DTYPE_NAMES.get(t.dtype, t.dtype)}")
    for cs in spec.consts:
        if not cs.optional and cs.name not in node.consts:
            raise ProgramError(f"{where}: missing constant {cs.name!r}")
    for a, v in node.attrs.items():
        asp = next((s for s in spec.attrs if s.name == a), None)
        if asp is None:
            raise ProgramError(f"{where}: unexpected attribute {a!r}")
        if asp.kind == "ints":
            if not isinstance(v, list) or not asp.min_len <= len(v) <= asp.max_len:
                raise ProgramError(f"{where}: attribute {a} must be a list of {asp.min_len}..{asp.max_len} integers")
            vals = v
        else:
            if isinstance(v, list):
                raise ProgramError(f"{where}: attribute {a} must be one integer")
            vals = [v]
        for x in vals:
            if not isinstance(x, int):  # bool is an int (0/1); floats and strings are not
                raise ProgramError(f"{where}: attribute {a} = {str(x)[:40]!r} is not integer")
            if not asp.lo <= int(x) <= asp.hi:
                raise ProgramError(f"{where}: attribute {a} = {x} outside [{asp.lo}, {asp.hi}]")
    for asp in spec.attrs:
        if not asp.optional and asp.name not in node.attrs:
            raise ProgramError(f"{where}: missing attribute {asp.name!r}")


def validate(prog: Program, limits: Limits | None = None) -> ProgramInfo:
    """Validate ``prog`` completely (see the module docstring); returns the inferred ``ProgramInfo``."""
    limits = limits or Limits()
    if not isinstance(prog.nodes, list) or not prog.nodes:
        raise ProgramError("program has no nodes")
    if len(prog.nodes) > limits.max_nodes:
        raise ProgramError(f"program has {len(prog.nodes)} nodes (limit {limits.max_nodes})")
    _meta_checks(prog, limits)
    const_bytes = 0
    for name, t in prog.consts.items():
        if not isinstance(t, Tensor) or t.dtype not in DTYPE_NAMES:
            raise ProgramError(f"constant {name!r} has non-integer dtype {getattr(t, 'dtype', type(t).__name__)}")
        const_bytes += t.numel() * t.element_size()
    if const_bytes > limits.max_const_bytes:
        raise ProgramError(f"constants take {const_bytes} bytes (limit {limits.max_const_bytes})")

    types: dict[str, TType] = {prog.input: input_type(prog)}
    producer: dict[str, Node] = {}
    used_consts: set[str] = set()
    for i, node in enumerate(prog.nodes):
        _check_node_fields(i, node, prog)
        for v in node.inputs:
            if v not in types:
                raise ProgramError(f"node {i} ({node.op}): input {v!r} is not defined before use")
        if node.output in types:
            raise ProgramError(f"node {i} ({node.op}): value {node.output!r} is defined twice")
        consts = {c: prog.consts[k] for c, k in node.consts.items()}
        used_consts.update(node.consts.values())
        chk = Check(f"node {i} ({node.op})", [types[v] for v in node.inputs], consts, node.attrs,
                    [producer.get(v) for v in node.inputs], list(node.inputs))
        out = OPSET[node.op].infer(chk)
        if out.numel_per_image() > 2**40:
            raise ProgramError(f"node {i} ({node.op}): output {out.describe()} is too large")
        types[node.output] = out
        producer[node.output] = node
    unused = sorted(set(prog.consts) - used_consts)
    if unused:
        raise ProgramError(f"constant {unused[0]!r} is not used by any node")

    if prog.output not in producer:
        raise ProgramError(f"program output {prog.output!r} is never computed by a node")
    uses: dict[str, int] = {}
    for node in prog.nodes:
        for v in node.inputs:
            uses[v] = uses.get(v, 0) + 1
    for i, node in enumerate(prog.nodes):
        if node.output != prog.output and not uses.get(node.output):
            raise ProgramError(f"node {i} ({node.op}): output {node.output!r} is never used")
    out = types[prog.output]
    nc = prog.meta["num_classes"]
    if out.dtype not in _OUT_DTYPES or out.rank != 2 or out.batch_axis != 0 or out.shape[0] != 1:
        raise ProgramError(f"program output must be int8/int16/int32 (B, K), got {out.describe()}")
    if nc and out.shape[1] != nc:
        raise ProgramError(f"program output has {out.shape[1]} columns but meta.num_classes is {nc}")

    # peak bytes of live values per image, freeing each value after its last use (as the engine does)
    last: dict[str, int] = {}
    for i, node in enumerate(prog.nodes):
        for v in node.inputs:
            last[v] = i
    live = types[prog.input].bytes_per_image()
    peak = live
    for i, node in enumerate(prog.nodes):
        live += types[node.output].bytes_per_image()
        peak = max(peak, live)
        for v in set(node.inputs):
            if last.get(v) == i and v != prog.output:
                live -= types[v].bytes_per_image()
    if peak > limits.max_activation_bytes:
        raise ProgramError(f"running needs {peak} bytes per image (limit {limits.max_activation_bytes})")
    types["__output__"] = out
    return ProgramInfo(types, const_bytes, peak)
