"""The frozen integer program and its ``.ivit`` file format.

A ``Program`` is a straight-line list of ``Node`` s over named integer values.  Each node names an op
of the op set (``ivit.ir.opset``), its value inputs, its integer constants and integer attributes.

File format (``.ivit``): one safetensors file.  Tensors: the program constants (integer dtypes only).
Header metadata (strings): ``format = "ivit"``, ``format_version`` (1 or 2), ``program`` (JSON: nodes,
input, output, meta) and ``checksum`` (SHA-256 over the program JSON and every tensor's name, dtype,
shape and bytes).  The checksum catches accidents, not intent: whoever edits a file can recompute it,
so ``load_program`` then validates the whole program statically (``ivit.ir.validate``) before anything
runs.  Loading reads JSON and raw tensor bytes only: no pickle, nothing executed.

Format 1 (ivit 0.1) holds the original ops only; format 2 adds ``layernorm32``, ``shiftmax_rel`` and
``attn_normalize``.  Both load and run with the numerics they were written with.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import atomic_path, check_output_path, sha256_tensors
from .limits import Limits
from .types import DTYPE_NAMES, ProgramError
from .validate import validate

__all__ = ["Node", "Program", "Limits", "FORMAT_VERSION", "READABLE_VERSIONS", "save_program", "load_program",
           "parse_program_json"]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_NODE_KEYS = frozenset({"op", "inputs", "output", "consts", "attrs"})
_MAX_NAME = 200


@dataclass(frozen=True)
class Node:
    """One integer op: ``output = op(*inputs, **consts, **attrs)``.  ``consts`` maps the op's constant
    names to keys of ``Program.consts``; ``attrs`` holds integers or lists of integers."""

    op: str
    inputs: tuple[str, ...]
    output: str
    consts: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "inputs": list(self.inputs), "output": self.output,
                "consts": dict(self.consts), "attrs": dict(self.attrs)}

    @classmethod
    def from_json(cls, d: Any, where: str = "node") -> Node:
        """Strict parsing: exactly the known keys, string names, integer (or integer-list) attributes."""
        if not isinstance(d, dict):
            raise ProgramError(f"{where} is not an object")
        extra = set(d) - _NODE_KEYS
        if extra:
            raise ProgramError(f"{where}: unknown keys {sorted(extra)}")
        for k in ("op", "inputs", "output"):
            if k not in d:
                raise ProgramError(f"{where}: missing {k!r}")
        op, inputs, output = d["op"], d["inputs"], d["output"]
        consts, attrs = d.get("consts", {}), d.get("attrs", {})
        if not isinstance(op, str) or not isinstance(output, str) or not 0 < len(output) <= _MAX_NAME:
            raise ProgramError(f"{where}: op and output must be non-empty strings")
        if not isinstance(inputs, list) or len(inputs) > 8 or not all(
                isinstance(i, str) and 0 < len(i) <= _MAX_NAME for i in inputs):
            raise ProgramError(f"{where} ({op}): inputs must be a list of at most 8 names")
        if not isinstance(consts, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in consts.items()):
            raise ProgramError(f"{where} ({op}): consts must map names to tensor keys")
        if not isinstance(attrs, dict):
            raise ProgramError(f"{where} ({op}): attrs must be an object")
        clean: dict[str, Any] = {}
        for k, v in attrs.items():
            vals = v if isinstance(v, list) else [v]
            if isinstance(v, list) and len(v) > 16:
                raise ProgramError(f"{where} ({op}): attribute {k!r} has {len(v)} values")
            if not all(isinstance(x, int) for x in vals):  # bool is an int too
                raise ProgramError(f"{where} ({op}): attribute {k!r} is not integer: {str(v)[:60]}")
            if not all(-(2**62) <= int(x) <= 2**62 for x in vals):
                raise ProgramError(f"{where} ({op}): attribute {k!r} out of range")
            clean[k] = [int(x) for x in v] if isinstance(v, list) else int(v)
        return cls(op=op, inputs=tuple(inputs), output=output, consts=dict(consts), attrs=clean)


@dataclass
class Program:
    """A frozen integer program.

    Attributes:
        nodes: ops in execution order.
        consts: integer constant tensors by name.
        input: name of the input value (uint8 pixels ``(B, C, H, W)``).
        output: name of the output value (int32 logits ``(B, classes)``, or an int8/int16 embedding).
        meta: JSON-able description: family, model name and constructor arguments, input shape
            ``[C, H, W]``, ``num_classes``, ``logit_scale`` (a float used *only* to dequantize the final
            logits on request, never by the program), the ``QuantConfig`` and the ivit version.
        format_version: the ``.ivit`` format the program was read from (or will be written as).
    """

    nodes: list[Node]
    consts: dict[str, Tensor]
    input: str
    output: str
    meta: dict[str, Any]
    format_version: int = FORMAT_VERSION

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
    """The file's checksum: SHA-256 over the program JSON and every constant (``_io.sha256_tensors``)."""
    return sha256_tensors(consts, graph)


def _json_depth_ok(text: str, max_depth: int) -> bool:
    """True if the nesting depth of JSON ``text`` is at most ``max_depth`` (scans brackets outside strings,
    so ``json.loads`` never recurses deeper)."""
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ProgramError(f"duplicated JSON key {k!r}")
        d[k] = v
    return d


def _strict_json(text: str | bytes, limits: Limits, what: str) -> Any:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ProgramError(f"{what} is not UTF-8") from None
    if not _json_depth_ok(text, limits.max_json_depth):
        raise ProgramError(f"{what} is nested deeper than {limits.max_json_depth} levels")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except json.JSONDecodeError as e:
        raise ProgramError(f"{what} is not valid JSON ({e.msg} at {e.pos})") from None
    except RecursionError:  # pragma: no cover - the depth scan prevents it
        raise ProgramError(f"{what} is nested too deeply") from None


def _bad_constant(name: str) -> Any:
    raise ProgramError(f"non-finite number {name} in the program")


def parse_program_json(graph: str, consts: dict[str, Tensor], limits: Limits, version: int) -> Program:
    """Program from its JSON description (structure and types of every field checked, not yet validated)."""
    g = _strict_json(graph, limits, "program description")
    if not isinstance(g, dict) or set(g) - {"nodes", "input", "output", "meta"} or not {"nodes", "input",
                                                                                      "output"} <= set(g):
        raise ProgramError("program description must hold exactly nodes, input, output and meta")
    nodes_j, inp, out, meta = g["nodes"], g["input"], g["output"], g.get("meta", {})
    if not isinstance(nodes_j, list):
        raise ProgramError("program nodes must be a list")
    if len(nodes_j) > limits.max_nodes:
        raise ProgramError(f"program has {len(nodes_j)} nodes (limit {limits.max_nodes})")
    if not isinstance(inp, str) or not isinstance(out, str) or not inp or not out:
        raise ProgramError("program input and output must be names")
    if not isinstance(meta, dict):
        raise ProgramError("program meta must be an object")
    nodes = [Node.from_json(n, f"node {i}") for i, n in enumerate(nodes_j)]
    return Program(nodes=nodes, consts=consts, input=inp, output=out, meta=meta, format_version=version)


def save_program(prog: Program, path: str | os.PathLike[str]) -> Path:
    """Validate ``prog`` and write it to ``path`` atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save

    path = check_output_path(path, ".ivit output")
    validate(prog)
    prog = replace(prog, format_version=FORMAT_VERSION)
    graph = prog.graph_json()
    consts = {k: v.detach().cpu().contiguous() for k, v in prog.consts.items()}
    metadata = {"format": "ivit", "format_version": str(FORMAT_VERSION), "program": graph,
                "checksum": _checksum(graph, consts)}
    data = save(consts, metadata=metadata)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


_ST_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}


def _read_consts(data: bytes, header: dict[str, Any], start: int, p: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors body, every entry checked (integer dtype, shape, offsets in bounds)."""
    body = len(data) - start
    consts: dict[str, Tensor] = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ProgramError(f"invalid program in {p}: tensor {name!r}: malformed entry")
        dt = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            raise ProgramError(f"invalid program in {p}: tensor {name!r} has non-integer dtype "
                               f"{str(info['dtype'])[:20]}")
        shape, offs = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(s) is int and 0 <= s < 2**40 for s in shape)):
            raise ProgramError(f"invalid program in {p}: tensor {name!r} has a bad shape")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= body):
            raise ProgramError(f"not an .ivit file (tensor {name!r} lies outside the file): {p}")
        esize = torch.empty((), dtype=dt).element_size()
        if math.prod(shape) * esize != offs[1] - offs[0]:
            raise ProgramError(f"not an .ivit file (tensor {name!r}: {offs[1] - offs[0]} bytes for shape "
                               f"{shape}): {p}")
        spans.append((offs[0], offs[1]))
        raw = bytearray(data[start + offs[0]:start + offs[1]])
        t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        consts[name] = t.view(dt).reshape(shape).clone() if raw else torch.empty(shape, dtype=dt)
    spans.sort()
    for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise ProgramError(f"not an .ivit file (overlapping tensor data): {p}")
    return consts


def load_program(path: str | os.PathLike[str], limits: Limits | None = None) -> Program:
    """Read and fully validate a ``.ivit`` file.  Any defect raises ``ProgramError`` (one line)."""
    limits = limits or Limits()
    p = Path(path)
    if not p.exists():
        raise ProgramError(f"no such file: {p}")
    if not p.is_file():
        raise ProgramError(f"not a file: {p}")
    size = p.stat().st_size
    if size > limits.max_file_bytes:
        raise ProgramError(f"file is {size} bytes (limit {limits.max_file_bytes}): {p}")
    data = p.read_bytes()
    if len(data) < 8:
        raise ProgramError(f"not an .ivit file (too short): {p}")
    hlen = int.from_bytes(data[:8], "little")
    if hlen <= 1 or 8 + hlen > len(data) or hlen > limits.max_header_bytes:
        raise ProgramError(f"not an .ivit file (truncated or corrupt header): {p}")
    try:
        header = _strict_json(data[8:8 + hlen], limits, "file header")
    except ProgramError as e:
        raise ProgramError(f"not an .ivit file ({e}): {p}") from None
    if not isinstance(header, dict):
        raise ProgramError(f"not an .ivit file (header is not an object): {p}")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != "ivit":
        raise ProgramError(f"not an .ivit file (no ivit header): {p}")
    version_s = metadata.get("format_version")
    if version_s not in tuple(str(v) for v in READABLE_VERSIONS):
        raise ProgramError(f"unsupported .ivit format version {str(version_s)[:20]!r} (this ivit reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))}): {p}")
    consts = _read_consts(data, header, 8 + hlen, p)
    graph = metadata.get("program", "")
    if not isinstance(graph, str) or _checksum(graph, consts) != metadata.get("checksum"):
        raise ProgramError(f"corrupt .ivit file (checksum mismatch): {p}")
    try:
        prog = parse_program_json(graph, consts, limits, int(version_s))
        validate(prog, limits)
    except ProgramError as e:
        raise ProgramError(f"invalid program in {p}: {e}") from None
    return prog


def dtype_name(t: Tensor) -> str:
    return DTYPE_NAMES.get(t.dtype, str(t.dtype))
