"""ONNX export: an integer-only ONNX graph (uint8 pixels in, int32 logits out) run by ONNX Runtime.

``export(program, out)`` lowers every node with its op's lowering (``lower.LOWERINGS``, one per op of the
op set), checks the model with ``onnx.checker`` (full check, strict shape inference) and writes it
atomically.  ``verify(program, artefact)`` runs the file in ONNX Runtime (CPU provider) on random images
and compares its integers with ``ivit.Engine(program, backend="reference")`` (``torch.equal``).

``onnx`` and ``onnxruntime`` are optional (``pip install 'ivit[onnx]'``) and imported only when used.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

from ..._io import atomic_path, check_output_path
from ...errors import IvitError
from ...ir.program import Program
from ..base import Exporter, ExportResult, VerifyResult, check_images, register_exporter

__all__ = ["build_model", "op_model", "export_onnx", "verify_onnx", "run_onnx", "DEFAULT_OPSET", "MIN_OPSET",
           "DEFAULT_PASSES", "DEFAULT_GEMM", "REQUIREMENT"]

REQUIREMENT = "pip install 'ivit[onnx]'"
#: default ONNX opset (ONNX Runtime >= 1.14); ``Reduce*`` take their axes as an input from 18 on
DEFAULT_OPSET = 18
MIN_OPSET = 18
#: passes applied before lowering (the GELU table turns requantize -> ShiftGELU -> requantize into one lookup)
DEFAULT_PASSES = ("fold_gelu_table",)
#: GEMM operand types: "u8u8" is exact on every CPU ONNX Runtime runs on (see ``lower``)
DEFAULT_GEMM = "u8u8"


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _require() -> None:
    if not available():
        raise IvitError(f"ONNX export needs onnx and onnxruntime: {REQUIREMENT}")


def _lowerings() -> dict[str, Any]:
    from .lower import lowering_table

    return lowering_table()


def build_model(program: Program, opset: int = DEFAULT_OPSET, passes: tuple[str, ...] | list[str] = DEFAULT_PASSES,
                gemm: str = DEFAULT_GEMM, name: str | None = None) -> Any:
    """The ``onnx.ModelProto`` of ``program`` (validated, passes applied, every node lowered), not yet checked.

    Args:
        opset: ONNX opset (``MIN_OPSET`` .. the installed ``onnx``'s newest).
        passes: program passes applied first (``ivit.ir.passes``).
        gemm: ``"u8u8"`` (exact on every CPU) or ``"u8s8"`` (see ``lower``).
    """
    return _build(program, opset, passes, gemm, name)[0]


def _check_options(opset: int, gemm: str, passes: tuple[str, ...] | list[str] = ()) -> None:
    import onnx

    from ...ir.passes import PASSES
    from .lower import GEMM_MODES

    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise IvitError(f"unknown pass {unknown[0]!r} (choose from {', '.join(sorted(PASSES))})")

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        newest = onnx.defs.onnx_opset_version()
        raise IvitError(f"ONNX opset {opset} not supported (choose {MIN_OPSET}..{newest})")
    if gemm not in GEMM_MODES:
        raise IvitError(f"unknown gemm mode {gemm!r} (choose {', '.join(GEMM_MODES)})")


def _model(g: Any, inputs: list[tuple[str, Any]], outputs: list[tuple[str, Any]], opset: int, name: str,
           meta: dict[str, Any]) -> Any:
    """A ModelProto of graph ``g``; ``inputs``/``outputs``: (value name, TType) with the batch axis symbolic."""
    from onnx import helper, numpy_helper

    from .graph import onnx_dtype

    def info(v: str, t: Any) -> Any:
        dims = ["batch" if i == t.batch_axis else int(d) for i, d in enumerate(t.shape)]
        return helper.make_tensor_value_info(v, onnx_dtype(g.dtype(v)), dims)

    inits = [numpy_helper.from_array(arr, n) for n, arr in g.initializers.items()]
    graph = helper.make_graph(g.nodes, name, [info(v, t) for v, t in inputs], [info(v, t) for v, t in outputs],
                              inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="ivit",
                              producer_version=str(meta.get("ivit_version", "")),
                              doc_string="integer-only ivit program: uint8 pixels -> int32 logits")
    model.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(model, {"ivit.family": str(meta.get("family", "")),
                                   "ivit.model": str(meta.get("model", ""))})
    return model


def _build(program: Program, opset: int, passes: tuple[str, ...] | list[str], gemm: str, name: str | None
           ) -> tuple[Any, dict[str, str], Program]:
    """The model, the ONNX value of every program value and the program after the passes."""
    _require()
    from ...ir.passes import apply_passes
    from ...ir.validate import validate
    from .graph import Graph, np_dtype
    from .lower import LOWERINGS, Ctx

    _check_options(opset, gemm, passes)
    validate(program)
    prog = apply_passes(program, list(passes))
    types = validate(prog).types

    g = Graph()
    t_in = types[prog.input]
    g.declare("pixels", np_dtype(t_in.dtype), t_in.lo, t_in.hi)
    env = {prog.input: "pixels"}
    options = {"gemm": gemm}
    for i, node in enumerate(prog.nodes):
        fn = LOWERINGS.get(node.op)
        if fn is None:
            raise IvitError(f"onnx export: no lowering for op {node.op}")
        g.scope = f"n{i}.{node.op}"
        consts = {k: prog.consts[v] for k, v in node.consts.items()}
        ctx = Ctx(g, dict(node.attrs), consts, [types[v] for v in node.inputs], options)
        out = fn(ctx, *[env[v] for v in node.inputs])
        t = types[node.output]
        if g.dtype(out) != np_dtype(t.dtype):  # a lowering bug, not a user error
            raise AssertionError(f"lowering of {node.op} gave {g.dtype(out)}, expected {t.describe()}")
        env[node.output] = g.assume(out, t.lo, t.hi)  # the interval validation proved for this value
    g.rename_output(env[prog.output], "logits")
    g.prune(["logits"])
    model = _model(g, [("pixels", t_in)], [("logits", types[prog.output])], opset,
                   name or str(program.meta.get("model", "ivit")), program.meta)
    return model, env, prog


def op_model(op: str, in_types: list[Any], consts: dict[str, Any], attrs: dict[str, Any],
             gemm: str = DEFAULT_GEMM, opset: int = DEFAULT_OPSET, producers: list[Any] | None = None,
             input_names: list[str] | None = None) -> tuple[Any, Any]:
    """A one-node model of op ``op`` (inputs ``x0, x1, ...`` of the given ``TType`` s, batch axis symbolic,
    output ``y``), after checking the node with the op's static rule (``producers``/``input_names`` as in
    ``ivit.ir.opset.Check``).  Returns ``(model, output TType)``."""
    _require()
    from ...ir.opset import OPSET, Check
    from .graph import Graph, np_dtype
    from .lower import LOWERINGS, Ctx

    _check_options(opset, gemm)
    out_t = OPSET[op].infer(Check(f"op {op}", in_types, consts, attrs, producers or (), input_names or ()))
    g = Graph()
    g.scope = op
    names = [g.declare(f"x{i}", np_dtype(t.dtype), t.lo, t.hi) for i, t in enumerate(in_types)]
    out = LOWERINGS[op](Ctx(g, dict(attrs), dict(consts), list(in_types), {"gemm": gemm}), *names)
    if g.dtype(out) != np_dtype(out_t.dtype):
        raise AssertionError(f"lowering of {op} gave {g.dtype(out)}, expected {out_t.describe()}")
    g.rename_output(out, "y")
    g.prune(["y"])
    return _model(g, list(zip(names, in_types, strict=True)), [("y", out_t)], opset, op, {}), out_t


def _check(model: Any) -> Any:
    """``onnx.checker`` full check; returns the model with inferred value_info (strict shape inference)."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:  # a lowering bug
        raise AssertionError(f"exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}") from e


def export_onnx(program: Program, out: str | Path, opset: int = DEFAULT_OPSET,
                passes: tuple[str, ...] | list[str] = DEFAULT_PASSES, gemm: str = DEFAULT_GEMM,
                **options: Any) -> ExportResult:
    """Write ``program`` as an integer-only ONNX model to ``out`` (atomically, after a full ``onnx.checker`` pass).

    Options as ``build_model``; unknown options are refused."""
    _require()
    import onnx

    if options:
        raise IvitError(f"unknown ONNX export option(s): {', '.join(sorted(options))}")
    out = check_output_path(out, "ONNX output")
    model = _check(build_model(program, opset=opset, passes=passes, gemm=gemm))
    with atomic_path(out) as tmp:
        onnx.save_model(model, tmp)
    counts = Counter(n.op_type for n in model.graph.node)
    return ExportResult(path=out, files=[out], info={
        "opset": opset, "gemm": gemm, "nodes": len(model.graph.node), "onnx_ops": dict(sorted(counts.items())),
        "initializers": len(model.graph.initializer), "bytes": out.stat().st_size})


def _session(artefact: str | Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(artefact), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable models
        raise IvitError(f"ONNX Runtime cannot load {artefact}: {str(e).splitlines()[0][:200]}") from None


def run_onnx(session: Any, pixels: Any) -> Any:
    """The integer output of an ONNX Runtime session (one input, one output) on uint8 ``pixels`` (torch)."""
    import torch

    inp, outp = session.get_inputs()[0].name, session.get_outputs()[0].name
    (out,) = session.run([outp], {inp: pixels.contiguous().numpy()})
    return torch.from_numpy(out)


def verify_onnx(program: Program, artefact: str | Path, images: int = 10, seed: int = 0) -> VerifyResult:
    """Run ``artefact`` in ONNX Runtime on ``check_images``: the random ones in batches of 1, 2, then 7 (the rest
    last), and one batch of the all-0, all-255 and checkerboard images; compare with the reference engine
    (``torch.equal``)."""
    _require()
    import onnxruntime as ort
    import torch

    from ...backends.engine import Engine

    p = Path(artefact)
    if not p.is_file():
        raise IvitError(f"no such file: {p}")
    sess = _session(p)
    inp, outp = sess.get_inputs()[0], sess.get_outputs()[0]
    engine = Engine(program, backend="reference")
    sets = check_images(program, max(1, images), seed)
    rand, batches, i = sets["random"], [], 0
    for size in (1, 2):
        if i < rand.shape[0]:
            batches.append(rand[i:i + size])
            i += size
    batches += list(rand[i:].split(7))
    batches.append(torch.cat([sets["zeros"], sets["full"], sets["checker"]]))
    ok, detail, n = True, "", 0
    for x in batches:
        want = engine(x)
        n += x.shape[0]
        try:
            got = run_onnx(sess, x)
        except Exception as e:  # a model for other inputs, or a runtime failure: not bit-exact
            ok, detail = False, f"ONNX Runtime failed on a batch of {x.shape[0]}: {str(e).splitlines()[0][:160]}"
            break
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            ok = False
            detail = f"batch of {x.shape[0]}: got {got.dtype}{tuple(got.shape)}, engine {want.dtype}{tuple(want.shape)}"
            if got.shape == want.shape:
                bad = int((got.to(torch.int64) != want.to(torch.int64)).sum())
                detail += f"; {bad} of {want.numel()} logits differ"
            break
    if ok:
        detail = f"int32 logits equal (torch.equal) on {n} images in {len(batches)} batches"
    return VerifyResult(runtime=f"onnxruntime {ort.__version__} (CPUExecutionProvider)", images=n, bitexact=ok,
                        detail=detail, info={"input": f"{inp.type}{inp.shape}", "output": f"{outp.type}{outp.shape}"})


register_exporter(Exporter(
    name="onnx",
    description="integer-only ONNX graph (uint8 pixels -> int32 logits) for ONNX Runtime's CPU provider",
    requirement=REQUIREMENT,
    available=available,
    lowerings=_lowerings,
    unsupported=dict,
    export=export_onnx,
    verify=verify_onnx,
))
