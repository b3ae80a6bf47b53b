"""The frozen integer program and its ``.ivit`` file format.

A ``Program`` is a straight-line list of ``Node`` s over named integer tensors.  Each node names an
op of the integer op set (``OPS`` below), its value inputs, its integer constants and its integer
attributes.  Nothing in a program is a float: the checker ``check_program`` proves it statically
and ``ivit.engine.verify_integer_only`` proves it again at run time.

File format (``.ivit``, version 1): one safetensors file.  Tensors: the program constants.
Header metadata (strings): ``format = "ivit"``, ``format_version``, ``program`` (JSON: nodes, input,
output, meta) and ``checksum`` (SHA-256 over the program JSON and every tensor's name, dtype,
shape and bytes).  Loading parses JSON and raw tensor bytes only: no pickle, nothing executed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import IvitError
from .runlog import atomic_path

__all__ = ["Node", "Program", "OPS", "FORMAT_VERSION", "save_program", "load_program", "check_program"]

FORMAT_VERSION = 1

#: op name -> (number of value inputs, required const names, optional const names, required attrs)
OPS: dict[str, tuple[int, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "patchify": (1, (), (), ("patch",)),
    "linear": (1, ("weight",), ("bias",), ()),
    "requantize": (1, ("mult", "shift"), (), ("bits",)),
    "add_requantize": (2, ("mult_a", "shift_a", "mult_b", "shift_b"), (), ("bits",)),
    "embed": (1, ("mult", "shift", "pos"), ("prefix",), ("bits",)),
    "layernorm": (1, ("mult", "shift", "offset"), (), ("bits",)),
    "slice": (1, (), (), ("dim", "start", "end")),
    "reshape": (1, (), (), ("shape",)),
    "permute": (1, (), (), ("perm",)),
    "roll": (1, (), (), ("shifts", "dims")),
    "pad": (1, (), (), ("pads",)),
    "matmul": (2, (), (), ("transpose_b",)),
    "add_const": (1, ("const",), (), ()),
    "shiftmax": (1, (), ("mask",), ("x0", "n", "k_out")),
    "shiftgelu": (1, (), (), ("x0", "n", "k_out")),
    "select": (1, (), (), ("dim", "index")),
    "mean": (1, (), (), ("dim",)),
}

INT_DTYPES = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool}


@dataclass(frozen=True)
class Node:
    """One integer op: ``output = op(*inputs, **consts, **attrs)``."""

    op: str
    inputs: tuple[str, ...]
    output: str
    consts: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "inputs": list(self.inputs), "output": self.output,
                "consts": dict(self.consts), "attrs": dict(self.attrs)}

    @classmethod
    def from_json(cls, d: Any) -> Node:
        if not isinstance(d, dict):
            raise IvitError("program node is not an object")
        try:
            return cls(op=str(d["op"]), inputs=tuple(str(i) for i in d["inputs"]), output=str(d["output"]),
                       consts={str(k): str(v) for k, v in d.get("consts", {}).items()},
                       attrs=dict(d.get("attrs", {})))
        except (KeyError, TypeError, AttributeError) as e:
            raise IvitError(f"malformed program node: {e}") from None


@dataclass
class Program:
    """A frozen integer program.

    Attributes:
        nodes: ops in execution order.
        consts: integer constant tensors by name.
        input: name of the input value (uint8 pixels ``(B, C, H, W)``).
        output: name of the output value (int32 logits ``(B, classes)``).
        meta: JSON-able description: family, model name, input shape ``[C, H, W]``, ``num_classes``,
            ``logit_scale`` (float, *only* for optional dequantization of the final logits, never used
            by the program), the ``QuantConfig`` and the ivit version.
    """

    nodes: list[Node]
    consts: dict[str, Tensor]
    input: str
    output: str
    meta: dict[str, Any]

    def graph_json(self) -> str:
        return json.dumps({"nodes": [n.to_json() for n in self.nodes], "input": self.input,
                           "output": self.output, "meta": self.meta}, sort_keys=True)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.meta["input_shape"]
        return int(c), int(h), int(w)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.consts.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.consts.values())

    def save(self, path: str | os.PathLike[str]) -> Path:
        return save_program(self, path)


def _checksum(graph: str, consts: dict[str, Tensor]) -> str:
    h = hashlib.sha256(graph.encode())
    for name in sorted(consts):
        t = consts[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_program(prog: Program) -> None:
    """Static validation: known ops, arity, defined-before-use values, existing integer constants,
    integer-only attributes.  Raises ``IvitError`` on the first problem."""
    if not prog.nodes:
        raise IvitError("program has no nodes")
    for name, t in prog.consts.items():
        if t.dtype not in INT_DTYPES:
            raise IvitError(f"constant {name!r} has non-integer dtype {t.dtype}")
    defined = {prog.input}
    for i, node in enumerate(prog.nodes):
        spec = OPS.get(node.op)
        if spec is None:
            raise IvitError(f"node {i}: unknown op {node.op!r}")
        n_in, req, opt, req_attrs = spec
        if len(node.inputs) != n_in:
            raise IvitError(f"node {i} ({node.op}): expected {n_in} inputs, got {len(node.inputs)}")
        for v in node.inputs:
            if v not in defined:
                raise IvitError(f"node {i} ({node.op}): input {v!r} is not defined before use")
        for c in req:
            if c not in node.consts:
                raise IvitError(f"node {i} ({node.op}): missing constant {c!r}")
        for c, key in node.consts.items():
            if c not in req and c not in opt:
                raise IvitError(f"node {i} ({node.op}): unexpected constant {c!r}")
            if key not in prog.consts:
                raise IvitError(f"node {i} ({node.op}): constant tensor {key!r} missing from file")
        for a in req_attrs:
            if a not in node.attrs:
                raise IvitError(f"node {i} ({node.op}): missing attribute {a!r}")
        for a, v in node.attrs.items():
            vals = v if isinstance(v, list) else [v]
            if not all(isinstance(x, int) for x in vals):  # bool is an int too
                raise IvitError(f"node {i} ({node.op}): attribute {a!r} is not integer: {v!r}")
        defined.add(node.output)
    if prog.output not in defined:
        raise IvitError(f"program output {prog.output!r} is never computed")
    shape = prog.meta.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise IvitError("program meta has no valid input_shape")


def save_program(prog: Program, path: str | os.PathLike[str]) -> Path:
    """Write ``prog`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save

    check_program(prog)
    graph = prog.graph_json()
    consts = {k: v.detach().cpu().contiguous() for k, v in prog.consts.items()}
    metadata = {"format": "ivit", "format_version": str(FORMAT_VERSION), "program": graph,
                "checksum": _checksum(graph, consts)}
    data = save(consts, metadata=metadata)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise IvitError(f"output folder does not exist: {path.parent}")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def load_program(path: str | os.PathLike[str]) -> Program:
    """Read and fully validate a ``.ivit`` file.  Any defect raises ``IvitError`` (one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = Path(path)
    if not p.exists():
        raise IvitError(f"no such file: {p}")
    if not p.is_file():
        raise IvitError(f"not a file: {p}")
    data = p.read_bytes()
    if len(data) < 8:
        raise IvitError(f"not an .ivit file (too short): {p}")
    try:
        hlen = int.from_bytes(data[:8], "little")
        if hlen <= 0 or 8 + hlen > len(data):
            raise IvitError(f"not an .ivit file (truncated or corrupt header): {p}")
        header = json.loads(data[8:8 + hlen])
        metadata = header.get("__metadata__") or {}
        consts = load(data)
    except IvitError:
        raise
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IvitError(f"not a valid .ivit file ({msg}): {p}") from None
    if metadata.get("format") != "ivit":
        raise IvitError(f"not an .ivit file (no ivit header): {p}")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise IvitError(f"unsupported .ivit format version {version!r} (this ivit reads {FORMAT_VERSION}): {p}")
    graph = metadata.get("program", "")
    if _checksum(graph, consts) != metadata.get("checksum"):
        raise IvitError(f"corrupt .ivit file (checksum mismatch): {p}")
    try:
        g = json.loads(graph)
        prog = Program(nodes=[Node.from_json(n) for n in g["nodes"]], consts=consts,
                       input=str(g["input"]), output=str(g["output"]), meta=dict(g["meta"]))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise IvitError(f"corrupt .ivit program description ({e}): {p}") from None
    check_program(prog)
    return prog
