"""TOSA export: an integer-only TOSA 1.0 flatbuffer (uint8 pixels in, int32 logits out) run by Arm's reference model.

``export(program, out, batch=1)`` lowers every node with its op's lowering (``lower.LOWERINGS``, one per op of
the op set) into a static graph for ``batch`` images, serializes it with ``tosa_serializer`` (tosa-tools) and
writes it atomically.  ``verify(program, artefact)`` runs the file with the ``tosa_reference_model`` binary
(a subprocess per batch, with a timeout) on random, all-0, all-255 and checkerboard images and compares the int32 logits
with ``ivit.Engine(program, backend="reference")`` (``torch.equal``).

The graph uses the PRO-INT profile only: int8/int16/int32/bool tensors, no floating point, no int48/int64.
Shapes are static (the reference model runs static graphs only), so the batch is fixed at export time and read
back from the file's input shape by ``verify``.

``tosa-tools`` is optional (``pip install 'ivit[tosa]'``) and imported only when used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..._io import atomic_path, check_output_path
from ...errors import IvitError
from ...ir.program import Program
from ..base import Exporter, ExportResult, VerifyResult, check_images, register_exporter

__all__ = ["REQUIREMENT", "DEFAULT_PASSES", "available", "build_graph", "op_graph", "export_tosa", "verify_tosa",
           "run_reference", "read_graph", "reference_model_path", "TosaGraphInfo"]

REQUIREMENT = "pip install 'ivit[tosa]'"
#: passes applied before lowering (requantize -> ShiftGELU -> requantize becomes one RESCALE + TABLE)
DEFAULT_PASSES = ("fold_gelu_table",)
#: seconds one run of the reference model may take
RUN_TIMEOUT = 600.0
#: largest batch a graph is exported for
MAX_BATCH = 4096
_BIN = "tosa_reference_model"


def _has_serializer() -> bool:
    try:
        return importlib.util.find_spec("tosa_serializer") is not None
    except (ImportError, ValueError):
        return False


def reference_model_path() -> Path | None:
    """The native ``tosa_reference_model`` binary of tosa-tools (``$TOSA_TOOLS_BIN_DIR``, then the wheel's
    ``site-packages/bin``, then ``PATH``), or None."""
    env = os.environ.get("TOSA_TOOLS_BIN_DIR")
    cands: list[Path] = [Path(env) / _BIN] if env else []
    spec = importlib.util.find_spec("tosa_serializer") if _has_serializer() else None
    if spec is not None and spec.origin:
        cands.append(Path(spec.origin).resolve().parent.parent / "bin" / _BIN)
    which = shutil.which(_BIN)
    if which:
        cands.append(Path(which))
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def available() -> bool:
    return _has_serializer() and reference_model_path() is not None


def _require() -> None:
    if not _has_serializer():
        raise IvitError(f"TOSA export needs tosa-tools: {REQUIREMENT}")


def _require_runtime() -> Path:
    _require()
    p = reference_model_path()
    if p is None:
        raise IvitError(f"TOSA verification needs the tosa_reference_model binary of tosa-tools: {REQUIREMENT}")
    return p


def _lowerings() -> dict[str, Any]:
    from .lower import lowering_table

    return lowering_table()


def _unsupported() -> dict[str, str]:
    from .lower import UNSUPPORTED

    return dict(UNSUPPORTED)


def _check_batch(batch: Any) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise IvitError(f"TOSA export batch must be an integer in [1, {MAX_BATCH}], got {batch!r}")
    return batch


def _refuse(program: Program) -> None:
    """Refuse, with one line, a program the TOSA target cannot run (before anything is built or written)."""
    from ...ir.opset import PROBS_REL8
    from .lower import LEGACY_REASON, LOWERINGS, UNSUPPORTED

    for i, n in enumerate(program.nodes):
        if n.op in UNSUPPORTED:
            raise IvitError(f"tosa export: node {i} ({n.op}) cannot be lowered: {UNSUPPORTED[n.op]}")
        if n.op == "attention" and int(n.attrs.get("probs", PROBS_REL8)) != PROBS_REL8:
            raise IvitError(f"tosa export: node {i} (attention, probs=0) cannot be lowered: {LEGACY_REASON}")
        if n.op not in LOWERINGS:
            raise IvitError(f"tosa export: no lowering for op {n.op}")


def build_graph(program: Program, batch: int = 1, passes: Sequence[str] = DEFAULT_PASSES) -> Any:
    """The ``graph.Graph`` of ``program`` for a static ``batch`` (validated, passes applied, every node lowered).

    Input ``pixels``: int8 ``(batch, C, H, W)`` holding the raw uint8 bits; output ``logits``: the program's output
    (int32 ``(batch, classes)``)."""
    _require()
    from ...ir.passes import apply_passes
    from ...ir.validate import validate
    from .graph import I8, Graph
    from .lower import LOWERINGS, Ctx, stored_dtype, stored_range

    batch = _check_batch(batch)
    validate(program)
    _refuse(program)
    prog = apply_passes(program, list(passes))
    _refuse(prog)
    types = validate(prog).types
    for v, t in types.items():
        if t.rank > 6:
            raise IvitError(f"tosa export: value {v} has rank {t.rank} (TOSA supports rank <= 6)")
    g = Graph()
    t_in = types[prog.input]
    px = g.input("pixels", t_in.concrete(batch), I8)
    # uint8 pixels (raw bits) -> u - 128, the representation of uint8 values inside the graph
    env = {prog.input: g.rescale(px, [1 << 30], [30], I8, out_zp=-128, in_unsigned=True)}
    for i, node in enumerate(prog.nodes):
        consts = {k: prog.consts[v] for k, v in node.consts.items()}
        out_t = types[node.output]
        ctx = Ctx(g, dict(node.attrs), consts, [types[v] for v in node.inputs], out_t, batch, f"node {i} ({node.op})")
        try:
            y = LOWERINGS[node.op](ctx, *[env[v] for v in node.inputs])
        except AssertionError as e:  # an operator whose TOSA result the intervals cannot prove exact: refuse
            raise IvitError(f"tosa export: {ctx.where} cannot be lowered exactly in int32: {e}") from e
        if y.dtype != stored_dtype(out_t.dtype) or y.shape != out_t.concrete(batch):  # a lowering bug
            raise AssertionError(f"lowering of {node.op} gave {y.dtype}{y.shape}, expected {out_t.describe()}")
        env[node.output] = g.assume(y, *stored_range(out_t))  # the interval validation proved for this value
    g.output(env[prog.output], "logits")
    return g


def op_graph(op: str, in_types: list[Any], consts: dict[str, Any], attrs: dict[str, Any], batch: int = 1,
             producers: list[Any] | None = None, input_names: list[str] | None = None) -> tuple[Any, Any]:
    """A one-node graph of op ``op`` (inputs ``x0, x1, ...`` of the given ``TType`` s at ``batch``; uint8 inputs and
    outputs as raw uint8 bits in int8 tensors), after checking the node with the op's static rule
    (``producers``/``input_names`` as in ``ivit.ir.opset.Check``).  Returns ``(graph, output TType)``."""
    _require()
    import torch

    from ...ir.opset import OPSET, Check
    from .graph import I8, Graph
    from .lower import LOWERINGS, Ctx, stored_dtype, stored_range

    out_t = OPSET[op].infer(Check(f"op {op}", in_types, consts, attrs, producers or (), input_names or ()))
    g = Graph()
    args = []
    for i, t in enumerate(in_types):
        x = g.input(f"x{i}", t.concrete(batch), stored_dtype(t.dtype))
        if t.dtype == torch.uint8:
            x = g.rescale(x, [1 << 30], [30], I8, out_zp=-128, in_unsigned=True)
        args.append(g.assume(x, *stored_range(t)))
    ctx = Ctx(g, dict(attrs), dict(consts), list(in_types), out_t, batch, f"op {op}")
    y = LOWERINGS[op](ctx, *args)
    if y.dtype != stored_dtype(out_t.dtype) or y.shape != out_t.concrete(batch):
        raise AssertionError(f"lowering of {op} gave {y.dtype}{y.shape}, expected {out_t.describe()}")
    if out_t.dtype == torch.uint8:
        y = g.rescale(y, [1 << 30], [30], I8, in_zp=-128, out_unsigned=True)
    g.output(y, "y")
    return g, out_t


class TosaGraphInfo:
    """What a ``.tosa`` file holds: its TOSA version, inputs/outputs ``(name, shape, dtype)``, every tensor's
    ``(name, dtype)`` and every operator as ``(op, input dtypes, output dtypes)`` (read with tosa-tools' flatbuffer
    classes)."""

    def __init__(self, version: str, inputs: list[tuple[str, tuple[int, ...], str]],
                 outputs: list[tuple[str, tuple[int, ...], str]], tensors: list[tuple[str, str]],
                 operators: list[tuple[str, tuple[str, ...], tuple[str, ...]]]) -> None:
        self.version = version
        self.inputs = inputs
        self.outputs = outputs
        self.tensors = tensors
        self.operators = operators


def read_graph(data: bytes, what: str = "TOSA file") -> TosaGraphInfo:
    """Parse a TOSA flatbuffer (one line ``IvitError`` when it is not one)."""
    _require()
    from tosa import DType as _DType
    from tosa import Op as _Op
    from tosa.TosaGraph import TosaGraph

    dnames = {v: k for k, v in vars(_DType.DType).items() if not k.startswith("_")}
    onames = {v: k for k, v in vars(_Op.Op).items() if not k.startswith("_")}
    try:
        if len(data) < 8 or not TosaGraph.TosaGraphBufferHasIdentifier(data, 0):
            raise ValueError("no TOSA identifier")
        g = TosaGraph.GetRootAs(data, 0)
        v = g.Version()
        version = f"{v._Major()}.{v._Minor()}.{v._Patch()}{'d' if v._Draft() else ''}"
        block = g.Regions(0).Blocks(0)
        tensors: dict[str, tuple[tuple[int, ...], str]] = {}
        for i in range(block.TensorsLength()):
            t = block.Tensors(i)
            shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            tensors[t.Name().decode()] = (shape, dnames.get(t.Type(), str(t.Type())))
        for i in range(block.ShapesLength()):
            tensors[block.Shapes(i).Name().decode()] = ((), "SHAPE")
        ins = [block.Inputs(i).decode() for i in range(block.InputsLength())]
        outs = [block.Outputs(i).decode() for i in range(block.OutputsLength())]
        ops = []
        for i in range(block.OperatorsLength()):
            o = block.Operators(i)
            dt_in = tuple(tensors.get(o.Inputs(j).decode(), ((), "?"))[1] for j in range(o.InputsLength()))
            dt_out = tuple(tensors.get(o.Outputs(j).decode(), ((), "?"))[1] for j in range(o.OutputsLength()))
            ops.append((onames.get(o.Op(), str(o.Op())), dt_in, dt_out))
    except Exception as e:  # flatbuffers raises assorted errors on garbage
        raise IvitError(f"{what} is not a TOSA flatbuffer ({type(e).__name__})") from None
    if not ins or not outs or any(n not in tensors for n in ins + outs):
        raise IvitError(f"{what} is not a TOSA flatbuffer (inputs/outputs missing)")
    return TosaGraphInfo(version, [(n, *tensors[n]) for n in ins], [(n, *tensors[n]) for n in outs],
                         [(n, d) for n, (_, d) in tensors.items()], ops)


def _failure_line(log: str) -> str:
    keep = ("REQUIRE", "ERROR_IF", "LEVEL_CHECK", "Graph result", "Unsupported", "OpFactory", "fail", "Unable")
    lines = [ln.strip() for ln in log.splitlines() if any(k in ln for k in keep)]
    if lines:
        return " | ".join(lines[:3])[:400]
    tail = log.strip().splitlines()
    return tail[-1][:400] if tail else "no output"


def run_reference(data: bytes, inputs: dict[str, Any], outputs: Sequence[str], timeout: float = RUN_TIMEOUT,
                  level: str = "EIGHTK") -> list[Any]:
    """Run a TOSA flatbuffer in ``tosa_reference_model`` (a subprocess; inputs/outputs as numpy arrays by tensor
    name).  A graph that is not VALID (ERROR, UNPREDICTABLE, a crash, a timeout) raises ``IvitError``."""
    import numpy as np

    exe = _require_runtime()
    with tempfile.TemporaryDirectory(prefix="ivit-tosa-") as d:
        dp = Path(d)
        (dp / "model.tosa").write_bytes(data)
        ifm = []
        for i, (name, arr) in enumerate(inputs.items()):
            np.save(dp / f"in{i}.npy", np.ascontiguousarray(arr))
            ifm.append((name, f"in{i}.npy"))
        desc = {"tosa_file": "model.tosa", "ifm_name": [n for n, _ in ifm], "ifm_file": [f for _, f in ifm],
                "ofm_name": list(outputs), "ofm_file": [f"out{i}.npy" for i in range(len(outputs))]}
        (dp / "desc.json").write_text(json.dumps(desc))
        env = dict(os.environ, PATH="/nonexistent")  # on errors the binary would start gdb from PATH
        try:
            p = subprocess.run([str(exe), "--test_desc", str(dp / "desc.json"), "--tosa_level", level], cwd=d, env=env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise IvitError(f"tosa_reference_model did not finish within {timeout:.0f} s") from None
        results = [dp / f for f in desc["ofm_file"]]
        if p.returncode != 0 or not all(r.is_file() for r in results):
            raise IvitError(f"tosa_reference_model failed (exit {p.returncode}): {_failure_line(p.stdout + p.stderr)}")
        return [np.load(r) for r in results]


def _runtime_version() -> str:
    try:
        tools = importlib.metadata.version("tosa-tools")
    except importlib.metadata.PackageNotFoundError:
        tools = "?"
    model = "?"
    exe = reference_model_path()
    if exe is not None:
        with tempfile.TemporaryDirectory() as d:
            try:
                p = subprocess.run([str(exe), "--version"], cwd=d, capture_output=True, text=True, timeout=30,
                                   env=dict(os.environ, PATH="/nonexistent"))
                for ln in (p.stdout + p.stderr).splitlines():
                    if ln.startswith("Model version"):
                        model = ln.split()[-1]
            except (OSError, subprocess.TimeoutExpired):
                pass
    return f"tosa_reference_model {model} (tosa-tools {tools})"


def export_tosa(program: Program, out: str | Path, batch: int = 1, passes: Sequence[str] = DEFAULT_PASSES,
                **options: Any) -> ExportResult:
    """Write ``program`` as an integer-only TOSA flatbuffer for a static ``batch`` to ``out`` (atomically)."""
    _require()
    if options:
        raise IvitError(f"unknown TOSA export option(s): {', '.join(sorted(options))}")
    out = check_output_path(out, "TOSA output")
    g = build_graph(program, batch=batch, passes=passes)
    data = g.serialize()
    info = read_graph(data, "the serialized graph")  # a round trip through tosa-tools' own reader
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(data)
    counts = dict(sorted(g.counts.items()))
    return ExportResult(path=out, files=[out], info={
        "tosa_version": info.version, "profile": "PRO-INT", "batch": batch, "operators": sum(counts.values()),
        "tosa_ops": counts, "requantizations": dict(sorted(g.requant_paths.items())), "constants": g.n_consts,
        "bytes": out.stat().st_size})


def verify_tosa(program: Program, artefact: str | Path, images: int = 8, seed: int = 0,
                timeout: float = RUN_TIMEOUT) -> VerifyResult:
    """Run ``artefact`` in ``tosa_reference_model`` on ``check_images`` (the all-0, all-255 and checkerboard images
    first, then ``images`` random ones, in batches of the file's static batch; the last batch topped up with
    random images) and compare with the reference engine (``torch.equal``)."""
    import numpy as np
    import torch

    from ...backends.engine import Engine

    _require_runtime()
    p = Path(artefact)
    if not p.is_file():
        raise IvitError(f"no such file: {p}")
    info = read_graph(p.read_bytes(), f"TOSA file {p}")
    in_name, in_shape, in_dt = info.inputs[0]
    c, h, w = program.input_shape
    if len(info.inputs) != 1 or len(info.outputs) != 1 or len(in_shape) != 4 or tuple(in_shape[1:]) != (c, h, w) \
            or in_dt != "INT8":
        raise IvitError(f"TOSA file {p} does not take {c}x{h}x{w} pixels (inputs {info.inputs})")
    b = in_shape[0]
    engine = Engine(program, backend="reference")
    g = torch.Generator().manual_seed(seed + 1)
    n_rand = max(1, images)
    sets = check_images(program, n_rand, seed)
    extremes = torch.cat([sets["zeros"], sets["full"], sets["checker"]])
    pool = torch.cat([extremes, sets["random"]])
    # batches of b: the extremes first, the last batch topped up with more random images
    total = -(-pool.shape[0] // b) * b
    if total > pool.shape[0]:
        pool = torch.cat([pool, torch.randint(0, 256, (total - pool.shape[0], c, h, w), generator=g,
                                              dtype=torch.uint8)])
    data = p.read_bytes()
    out_name = info.outputs[0][0]
    ok, detail = True, ""
    for i in range(0, total, b):
        x = pool[i:i + b]
        (got_np,) = run_reference(data, {in_name: x.numpy().view(np.int8)}, [out_name], timeout=timeout)
        got = torch.from_numpy(got_np)
        want = engine(x)
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            ok = False
            diff = (got.to(torch.int64) - want.to(torch.int64)).abs().max().item() if got.shape == want.shape else None
            detail = f"images {i}..{i + b - 1}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}" + (
                f", max |diff| {diff}" if diff is not None else "")
            break
    if ok:
        detail = (f"int32 logits equal (torch.equal) on {total} images ({n_rand} random, all-0, all-255, "
                  f"2 checkerboards{', padding' if total > n_rand + 4 else ''}) in {total // b} run(s) of batch {b}")
    return VerifyResult(runtime=_runtime_version(), images=total, bitexact=ok, detail=detail,
                        info={"tosa_version": info.version, "batch": b, "input": f"{in_dt}{list(in_shape)}",
                              "output": f"{info.outputs[0][2]}{list(info.outputs[0][1])}"})


register_exporter(Exporter(
    name="tosa",
    description="integer-only TOSA 1.0 flatbuffer (PRO-INT; uint8 pixels -> int32 logits) for Arm's reference model",
    requirement=REQUIREMENT,
    available=available,
    lowerings=_lowerings,
    unsupported=_unsupported,
    export=export_tosa,
    verify=verify_tosa,
))
