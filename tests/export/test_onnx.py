"""ONNX export: every op lowered, run in ONNX Runtime, ``torch.equal`` to the reference.

Op by op (one-node ONNX models) on the real nodes of frozen ViT and Swin programs and on random and
extreme inputs (rounding ties of negative values, all -128/127/255, masks, biases); whole models (both
attention probability modes, both I-LayerNorms, the format-1 fixtures) at batch 1 and 3; a walk of every
graph (and of ONNX Runtime's optimized graph) finding no floating-point tensor, initializer, value or op;
the user-facing errors (corrupt input, missing folder, missing extra) and atomic output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

import ivit
from conftest import make_qmodel, random_pixels
from ivit import ops
from ivit.config import LayerNormImpl, Probs, QuantConfig
from ivit.errors import IvitError
from ivit.ir import OPSET, Node, TType
from ivit.ir.interpret import plan, run
from ivit.ir.passes import apply_passes
from ivit.ir.validate import validate

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the onnx extra: pip install 'ivit[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need the onnx extra: pip install 'ivit[onnx]'")

from ivit.export import EXPORTERS, run_cli_export  # noqa: E402
from ivit.export import export as export_program  # noqa: E402
from ivit.export import verify as verify_program  # noqa: E402
from ivit.export.base import check_images  # noqa: E402
from ivit.export.onnx import build_model, op_model  # noqa: E402
from ivit.export.onnx.graph import Graph  # noqa: E402
from ivit.export.onnx.lower import GEMM_MODES, ONNX_OPS_BY_OP  # noqa: E402

FIXTURES = Path(__file__).parents[1] / "fixtures"
INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
             onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
             onnx.TensorProto.BOOL}
FLOAT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "Sqrt", "Exp",
             "Log", "Erf", "Sigmoid", "Softmax", "LayerNormalization", "Pow", "Reciprocal", "Round", "Floor", "Ceil"}


def _session(model: Any) -> Any:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _np(t: Tensor) -> np.ndarray:
    return t.contiguous().numpy()


def assert_integer_only(model: Any, session: Any = None) -> None:
    """No floating-point initializer, graph input/output, inferred value or op output; no float attribute."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    g = inferred.graph
    for init in g.initializer:
        assert init.data_type in INT_TYPES, f"initializer {init.name} has type {init.data_type}"
    typed = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        assert vi.type.HasField("tensor_type"), vi.name
        assert vi.type.tensor_type.elem_type in INT_TYPES, f"value {vi.name} has type {vi.type.tensor_type.elem_type}"
        typed[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name for i in g.initializer}
    for node in g.node:
        assert node.op_type not in FLOAT_OPS, node.op_type
        assert node.domain in ("", "ai.onnx"), node.domain
        for out in node.output:
            assert out in typed, f"output {out} of {node.op_type} has no inferred type"
        for i in node.input:
            assert not i or i in typed or i in inits, f"input {i} of {node.op_type} is untyped"
        for a in node.attribute:
            assert a.type not in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS, onnx.AttributeProto.TENSOR,
                                  onnx.AttributeProto.TENSORS, onnx.AttributeProto.GRAPH), (node.op_type, a.name)
            if node.op_type == "Cast" and a.name == "to":
                assert a.i in INT_TYPES, f"Cast to {a.i}"
    if session is not None:
        assert [i.type for i in session.get_inputs()] == ["tensor(uint8)"]
        assert all(o.type.startswith("tensor(int") for o in session.get_outputs())


# ---------------------------------------------------------------------------------------------
# Registry and lowering table


def test_every_op_of_the_op_set_has_a_lowering() -> None:
    ex = EXPORTERS["onnx"]
    assert ex.available() and ex.requirement == "pip install 'ivit[onnx]'"
    assert set(ex.lowerings()) == set(OPSET)
    assert ex.unsupported() == {}
    assert set(ONNX_OPS_BY_OP) == set(OPSET)
    assert {o for v in ONNX_OPS_BY_OP.values() for o in v}.isdisjoint(FLOAT_OPS)


# ---------------------------------------------------------------------------------------------
# Op by op


def _types(inputs: list[Tensor], batch_axes: list[int | None] | None = None) -> list[TType]:
    """Static types of concrete inputs: their dtype and shape, their exact value range."""
    axes = batch_axes or [0] * len(inputs)
    return [TType.of(t.dtype, tuple(t.shape), ax, int(t.min()) if t.numel() else 0, int(t.max()) if t.numel() else 0)
            for t, ax in zip(inputs, axes, strict=True)]


def run_op(op: str, inputs: list[Tensor], consts: dict[str, Tensor] | None = None, attrs: dict[str, Any] | None = None,
           types: list[TType] | None = None, gemm: str = "u8u8", producers: list[Any] | None = None,
           input_names: list[str] | None = None, want: Tensor | None = None) -> None:
    """Lower one node, run it in ONNX Runtime and compare with the op's reference (``torch.equal``)."""
    consts, attrs = consts or {}, attrs or {}
    types = types or _types(inputs)
    model, out_t = op_model(op, types, consts, attrs, gemm=gemm, producers=producers, input_names=input_names)
    onnx.checker.check_model(model, full_check=True)
    used = {n.op_type for n in model.graph.node} - {"Identity"}
    assert used <= set(ONNX_OPS_BY_OP[op]), f"{op} emits {sorted(used - set(ONNX_OPS_BY_OP[op]))}, not in its table"
    (got,) = _session(model).run(["y"], {f"x{i}": _np(t) for i, t in enumerate(inputs)})
    got = torch.from_numpy(got)
    if want is None:
        want = OPSET[op].reference(*inputs, **consts, **attrs)
    assert got.dtype == want.dtype and got.shape == want.shape, (op, got.dtype, want.dtype, got.shape, want.shape)
    if not torch.equal(got, want):
        bad = (got.to(torch.int64) != want.to(torch.int64)).nonzero()[:5].tolist()
        raise AssertionError(f"{op} ({gemm}): ONNX Runtime differs from the reference at {bad}")


def _prog_nodes(prog: ivit.Program, passes: tuple[str, ...], batch: int) -> list[dict[str, Any]]:
    """Every node of ``prog`` after ``passes`` with its constants, real inputs and output on random images."""
    p = apply_passes(prog, list(passes))
    info = validate(p)
    values: dict[str, Tensor] = {}
    steps = plan(p, info.types, p.consts, {})
    x = random_pixels(batch, prog.input_shape[1], seed=7)
    run(p, steps, x, lambda i, out: values.__setitem__(p.nodes[i].output, out))
    values[p.input] = x
    producer = {n.output: n for n in p.nodes}
    return [dict(node=n, inputs=[values[v] for v in n.inputs], want=values[n.output],
                 consts={k: p.consts[v] for k, v in n.consts.items()}, types=[info.types[v] for v in n.inputs],
                 producers=[producer.get(v) for v in n.inputs]) for n in p.nodes]


@pytest.fixture(scope="module")
def vit_prog() -> ivit.Program:
    return ivit.freeze(make_qmodel("vit_test"))


@pytest.fixture(scope="module")
def swin_prog() -> ivit.Program:
    return ivit.freeze(make_qmodel("swin_test"))


@pytest.mark.parametrize("passes", [(), ("fuse_attention", "fold_gelu_table")], ids=["basic", "fused"])
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_real_nodes_op_by_op(family: str, passes: tuple[str, ...], vit_prog: ivit.Program,
                             swin_prog: ivit.Program) -> None:
    prog = vit_prog if family == "vit" else swin_prog
    seen: set[str] = set()
    for rec in _prog_nodes(prog, passes, batch=2):
        node = rec["node"]
        key = repr((node.op, [t.shape for t in rec["types"]], sorted(node.attrs.items())))
        if key in seen and node.op in ("reshape", "permute", "slice", "select", "roll", "pad"):
            continue  # the same data movement again
        seen.add(node.op)
        seen.add(key)
        run_op(node.op, rec["inputs"], rec["consts"], dict(node.attrs), types=rec["types"], producers=rec["producers"],
               input_names=list(node.inputs), want=rec["want"])
    if passes:
        assert {"attention", "requantize_table"} <= seen


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape: tuple[int, ...], lo: int, hi: int, dtype: torch.dtype, seed: int = 0) -> Tensor:
    return torch.randint(lo, hi + 1, shape, generator=_gen(seed), dtype=torch.int64).to(dtype)


def _i32(v: Any) -> Tensor:
    return torch.tensor(v, dtype=torch.int32)


def _window_mask(nw: int, n: int, seed: int) -> Tensor:
    m = torch.rand(nw, n, n, generator=_gen(seed)) < 0.4
    m[0, 1] = True  # a fully masked row
    m[-1, 0] = False
    return m


def _cases(op: str) -> list[dict[str, Any]]:
    """Random and extreme cases of one op: dicts with inputs, consts, attrs (and optionally types)."""
    c: list[dict[str, Any]] = []
    if op == "patchify":
        for p in (2, 4):
            for x in (_rand((2, 3, 8, 8), 0, 255, torch.uint8, 1), torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                      torch.full((3, 3, 8, 8), 255, dtype=torch.uint8)):
                c.append(dict(inputs=[x], attrs={"patch": p}))
    elif op == "linear":
        k = 16
        xs = [_rand((2, 5, k), -128, 127, torch.int8, 2), torch.full((2, 5, k), -128, dtype=torch.int8),
              torch.full((1, 3, k), 127, dtype=torch.int8)]
        ws = [_rand((7, k), -127, 127, torch.int8, 3), torch.full((7, k), -127, dtype=torch.int8),
              torch.full((7, k), 127, dtype=torch.int8)]
        for x in xs:
            for w in ws:
                c.append(dict(inputs=[x], consts={"weight": w}))
                c.append(dict(inputs=[x], consts={"weight": w, "bias": _rand((7,), -(2**30), 2**30, torch.int32, 4)}))
    elif op == "matmul":
        for a_dt, lo, hi in ((torch.int8, -128, 127), (torch.uint8, 0, 255)):
            a = _rand((2, 3, 5, 16), lo, hi, a_dt, 5)
            for b in (_rand((2, 3, 16, 6), -128, 127, torch.int8, 6), torch.full((2, 3, 16, 6), -128,
                                                                                  dtype=torch.int8)):
                c.append(dict(inputs=[a, b], attrs={"transpose_b": 0}))
                c.append(dict(inputs=[a, b.transpose(-1, -2).contiguous()], attrs={"transpose_b": 1}))
            ext = torch.full((1, 2, 4, 16), hi, dtype=a_dt)
            c.append(dict(inputs=[ext, torch.full((1, 2, 16, 3), -128, dtype=torch.int8)], attrs={"transpose_b": 0}))
    elif op == "requantize":
        x = torch.cat([_rand((2, 4, 6), -(2**31) + 1, 2**31 - 1, torch.int64, 7),
                       torch.full((1, 4, 6), 2**31 - 1), torch.full((1, 4, 6), -(2**31) + 1)]).to(torch.int32)
        for bits in (8, 16, 32):
            c.append(dict(inputs=[x], consts={"mult": _rand((6,), -(2**31) + 1, 2**31 - 1, torch.int32, 8),
                                               "shift": _i32([1, 5, 31, 40, 61, 62])}, attrs={"bits": bits}))
            c.append(dict(inputs=[x], consts={"mult": _i32([1_518_500_250]), "shift": _i32([37])},
                          attrs={"bits": bits}))
        # rounding ties of negative and positive values: x * mult = (2k + 1) * 2**(s - 1)
        for s in (1, 3, 20):
            ks = torch.arange(-40, 40, dtype=torch.int64)
            ties = ((2 * ks + 1) << (s - 1)).reshape(2, 5, 8)
            for m in (1, -1):
                c.append(dict(inputs=[ties.to(torch.int32)], consts={"mult": _i32(m), "shift": _i32(s)},
                              attrs={"bits": 8}))
                c.append(dict(inputs=[ties.to(torch.int32)], consts={"mult": _i32(m), "shift": _i32(s)},
                              attrs={"bits": 32}))
        for dt, lo, hi in ((torch.int8, -128, 127), (torch.int16, -32768, 32767)):
            c.append(dict(inputs=[_rand((3, 4, 5), lo, hi, dt, 9)], consts={"mult": _i32(2**30 + 7), "shift": _i32(30)},
                          attrs={"bits": 8}))
    elif op == "add_requantize":
        a = _rand((2, 3, 6), -(2**31) + 1, 2**31 - 1, torch.int32, 10)
        b = _rand((2, 3, 6), -32768, 32767, torch.int16, 11)
        c.append(dict(inputs=[a, b], consts={"mult_a": _i32([2**20 + 1] * 6), "shift_a": _i32([31, 32, 33, 34, 35, 36]),
                                             "mult_b": _i32(-(2**30) + 3), "shift_b": _i32(17)}, attrs={"bits": 16}))
        ties = ((2 * torch.arange(-18, 18) + 1) << 3).reshape(2, 3, 6).to(torch.int32)
        c.append(dict(inputs=[ties, ties], consts={"mult_a": _i32(1), "shift_a": _i32(4), "mult_b": _i32(-1),
                                                   "shift_b": _i32(4)}, attrs={"bits": 8}))
        ext = torch.full((1, 3, 6), 127, dtype=torch.int8)
        c.append(dict(inputs=[ext, -ext], consts={"mult_a": _i32(2**30), "shift_a": _i32(24), "mult_b": _i32(2**30),
                                                  "shift_b": _i32(25)}, attrs={"bits": 16}))
    elif op == "add_const":
        for dt, lo, hi in ((torch.int32, -(2**30), 2**30), (torch.int16, -32768, 32767), (torch.int8, -128, 127)):
            x = _rand((2, 3, 4), lo, hi, dt, 12)
            c.append(dict(inputs=[x], consts={"const": _rand((3, 4), -(2**30) + 1, 2**30 - 1, torch.int32, 13)}))
            c.append(dict(inputs=[x], consts={"const": _rand((4,), -5, 5, torch.int32, 14)}))
    elif op == "embed":
        x = torch.cat([_rand((2, 4, 5), -(2**31) + 1, 2**31 - 1, torch.int64, 15), torch.full((1, 4, 5), -(2**31) + 1)])
        x = x.to(torch.int32)
        base = {"mult": _rand((5,), -(2**31) + 1, 2**31 - 1, torch.int32, 16), "shift": _i32([30, 31, 40, 45, 62]),
                "pos": _rand((4, 5), -40000, 40000, torch.int32, 17)}
        small = (_rand((3, 4, 5), -(2**20), 2**20, torch.int64, 19) // 2 * 2 + 1).to(torch.int32)  # odd: ties
        moderate = {"mult": _i32([2**30, -(2**30), 3, 2**31 - 1, 1]), "shift": _i32([31, 30, 1, 40, 1]),
                    "pos": base["pos"]}
        for bits in (8, 16):
            for xs, cs in ((x, base), (small, moderate)):
                c.append(dict(inputs=[xs], consts=cs, attrs={"bits": bits}))
                c.append(dict(inputs=[xs], consts={**cs, "prefix": _rand((2, 5), -40000, 40000, torch.int32, 18)},
                              attrs={"bits": bits}))
    elif op in ("layernorm", "layernorm32"):
        for ch in (8, 48):
            rows = [_rand((2, 3, ch), -32767, 32767, torch.int64, 19 + ch), torch.full((1, 3, ch), -32767),
                    torch.full((1, 3, ch), 1234), torch.arange(3 * ch).reshape(1, 3, ch) % 2 * 65534 - 32767]
            spike = torch.zeros(1, 3, ch, dtype=torch.int64)
            spike[..., 0] = 32767
            x = torch.cat(rows + [spike]).to(torch.int16)
            consts = {"mult": _rand((ch,), -(2**31) + 1, 2**31 - 1, torch.int32, 20), "shift": _rand((ch,), 20, 62,
                                                                                                     torch.int32, 21),
                      "offset": _rand((ch,), -300, 300, torch.int32, 22)}
            if op == "layernorm32":  # validated: z * mult / 2**shift and offset within 2**30
                consts["mult"] = _rand((ch,), -(2**31) + 1, 2**31 - 1, torch.int32, 20)
                consts["shift"] = _rand((ch,), 22, 40, torch.int32, 21)
            for bits in (8, 16):
                c.append(dict(inputs=[x], consts=consts, attrs={"bits": bits}))
            x8 = torch.cat([_rand((2, 3, ch), -128, 127, torch.int8, 23),
                            torch.full((1, 3, ch), -128, dtype=torch.int8)])
            c.append(dict(inputs=[x8], consts={"mult": _i32(2**30), "shift": _i32(24), "offset": _i32(-3)},
                          attrs={"bits": 8}))
    elif op == "shiftmax":
        for dt, lo, hi in ((torch.int16, -32767, 32767), (torch.int32, -(2**31) + 1, 2**31 - 1)):
            x = _rand((4, 2, 5, 5), lo, hi, dt, 24)
            x[0, 0] = 7  # equal rows
            for x0 in (-1, -37, -(2**20)):
                for k_out in (8, 16):
                    attrs = {"x0": x0, "n": ops.choose_shiftmax_n(x0, 5), "k_out": k_out}
                    c.append(dict(inputs=[x], attrs=attrs))
                    c.append(dict(inputs=[x], consts={"mask": _window_mask(2, 5, 25)}, attrs=attrs))
    elif op == "shiftmax_rel":
        for dt, lo, hi in ((torch.int8, -128, 127), (torch.int16, -32768, 32767),
                           (torch.int32, -(2**24) + 1, 2**24 - 1)):
            x = _rand((4, 2, 6, 6), lo, hi, dt, 26)
            x[1, 1] = hi  # equal rows
            for x0 in (-1, -3, -100, -(2**20), -(2**27)):
                c.append(dict(inputs=[x], attrs={"x0": x0}))
                c.append(dict(inputs=[x], consts={"mask": _window_mask(2, 6, 27)}, attrs={"x0": x0}))
    elif op == "attn_normalize":
        p = _rand((2, 2, 6, 6), 0, 255, torch.uint8, 28)
        p[0, 0, 0] = 0  # an all-zero row
        p[0, 1] = 255
        for v in (_rand((2, 2, 6, 8), -128, 127, torch.int8, 29), torch.full((2, 2, 6, 8), -128, dtype=torch.int8),
                  torch.full((2, 2, 6, 8), 127, dtype=torch.int8)):
            acc = ops.int_matmul(p, v)
            prod = Node("matmul", ("p", "v"), "acc", {}, {"transpose_b": 0})
            c.append(dict(inputs=[acc, p], producers=[prod, None], input_names=["acc", "p"],
                          types=[TType.of(torch.int32, tuple(acc.shape), 0, -(2**31) + 1, 2**31 - 1),
                                 TType.of(torch.uint8, tuple(p.shape), 0)]))
    elif op == "shiftgelu":
        x = torch.arange(-128, 128, dtype=torch.int16).reshape(2, 8, 16).to(torch.int8)
        for x0 in (-1, -9, -300, -(2**20)):
            for k_out in (8, 16):
                c.append(dict(inputs=[x], attrs={"x0": x0, "n": ops.choose_shiftgelu_n(x0), "k_out": k_out}))
    elif op in ("slice", "reshape", "permute", "roll", "pad", "select", "mean"):
        dts = [(torch.int8, -128, 127), (torch.int16, -32768, 32767), (torch.int32, -(2**31), 2**31 - 1)]
        if op != "mean":
            dts.append((torch.uint8, 0, 255))
        for i, (dt, lo, hi) in enumerate(dts):
            x = _rand((2, 4, 6, 3), lo, hi, dt, 30 + i)
            x[0, 0] = lo
            x[1, -1] = hi
            attrs_list = {
                "slice": [{"dim": 1, "start": 1, "end": 3}, {"dim": -1, "start": 0, "end": 2}],
                "reshape": [{"shape": [0, 8, -1]}, {"shape": [-1, 6, 3]}, {"shape": [0, 2, 2, 6, 3]}],
                "permute": [{"perm": [0, 2, 1, 3]}, {"perm": [0, 3, 2, 1]}],
                "roll": [{"shifts": [1, -2], "dims": [1, 2]}, {"shifts": [7], "dims": [-1]},
                         {"shifts": [0], "dims": [1]}],
                "pad": [{"pads": [1, 2]}, {"pads": [0, 1, 2, 0, 3, 1]}],
                "select": [{"dim": 1, "index": 0}, {"dim": -1, "index": -1}, {"dim": 2, "index": 3}],
                "mean": [{"dim": 1}, {"dim": -1}, {"dim": 2}],
            }[op]
            c.extend(dict(inputs=[x], attrs=a) for a in attrs_list)
    elif op == "attention":
        b, h, n, d = 4, 2, 5, 8
        qkv = [_rand((b, h, n, d), -128, 127, torch.int8, 40 + i) for i in range(3)]
        ext = [torch.full((b, h, n, d), v, dtype=torch.int8) for v in (-128, -128, 127)]
        for probs in (0, 1):
            for inputs in (qkv, ext):
                for extra in ({}, {"bias": _rand((h, n, n), -(2**20), 2**20, torch.int32, 43)},
                              {"mask": _window_mask(2, n, 44)}):
                    attrs = {"score_bits": 16, "probs": probs, "x0": -180}
                    if probs == 0:
                        attrs["n"] = ops.choose_shiftmax_n(-180, n)
                    consts = {"score_mult": _i32([1_300_000_000]), "score_shift": _i32([37]), **extra}
                    c.append(dict(inputs=inputs, consts=consts, attrs=attrs))
            if probs == 1:
                c.append(dict(inputs=qkv, consts={"score_mult": _i32(2**30), "score_shift": _i32(44)},
                              attrs={"score_bits": 8, "probs": 1, "x0": -12}))
    elif op == "requantize_table":
        table = _rand((256,), -128, 127, torch.int8, 50)
        for dt, lo, hi in ((torch.int16, -32768, 32767), (torch.int32, -(2**31) + 1, 2**31 - 1)):
            x = _rand((2, 5, 4), lo, hi, dt, 51)
            c.append(dict(inputs=[x], consts={"mult": _i32(2**30 + 1), "shift": _i32(45 if dt == torch.int32 else 37),
                                               "table": table}))
            c.append(dict(inputs=[x], consts={"mult": _rand((4,), -(2**31) + 1, 2**31 - 1, torch.int32, 52),
                                               "shift": _i32([38, 40, 50, 62]), "table": table}))
    return c


@pytest.mark.parametrize("op", sorted(OPSET))
def test_op_on_random_and_extreme_inputs(op: str) -> None:
    cases = _cases(op)
    assert cases, f"no cases for {op}"
    for i, case in enumerate(cases):
        for gemm in GEMM_MODES if op in ("linear", "matmul", "attention") else ("u8u8",):
            try:
                run_op(op, case["inputs"], case.get("consts"), case.get("attrs"), types=case.get("types"), gemm=gemm,
                       producers=case.get("producers"), input_names=case.get("input_names"))
            except Exception as e:
                raise AssertionError(f"{op} case {i}: {e}") from e


def test_wide_intervals_need_no_tighter_proof() -> None:
    """The lowerings also hold with the widest intervals the op set accepts (int32 accumulators)."""
    x = _rand((2, 3, 4), -(2**31) + 1, 2**31 - 1, torch.int32, 60)
    wide = [TType.of(torch.int32, (2, 3, 4), 0)]
    run_op("requantize", [x], {"mult": _i32(2**31 - 1), "shift": _i32(1)}, {"bits": 32}, types=wide)
    run_op("requantize_table", [x], {"mult": _i32(-(2**31) + 1), "shift": _i32(62),
                                     "table": _rand((256,), -128, 127, torch.int8, 61)}, types=wide)


def _graph_model(g: Graph, inputs: list[tuple[str, np.ndarray]], out: str, out_shape: list[int]) -> Any:
    from onnx import helper, numpy_helper

    from ivit.export.onnx.graph import onnx_dtype

    g.rename_output(out, "y")
    g.prune(["y"])
    ins = [helper.make_tensor_value_info(n, onnx_dtype(a.dtype), list(a.shape)) for n, a in inputs]
    outs = [helper.make_tensor_value_info("y", onnx_dtype(g.dtype("y")), out_shape)]
    inits = [numpy_helper.from_array(a, n) for n, a in g.initializers.items()]
    graph = helper.make_graph(g.nodes, "t", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("max_bits", [32, 62])
def test_isqrt_is_exact(max_bits: int) -> None:
    j = torch.tensor([1, 2, 3, 46340, 46341, 65535, 65536, 2**31 - 1], dtype=torch.int64)
    vals = [torch.arange(0, 300), j * j, j * j - 1, j * j + 1, 2 ** torch.arange(0, max_bits) - 1,
            2 ** torch.arange(0, max_bits), torch.randint(0, 2**max_bits, (3000,), generator=_gen(62))]
    v = torch.cat(vals)
    v = v[(v >= 0) & (v < 2**max_bits)].to(torch.int64)
    g = Graph()
    x = g.declare("v", np.int64, 0, 2**max_bits - 1)
    model = _graph_model(g, [("v", _np(v))], g.isqrt(x, max_bits), list(v.shape))
    onnx.checker.check_model(model, full_check=True)
    (got,) = _session(model).run(["y"], {"v": _np(v)})
    assert torch.equal(torch.from_numpy(got), ops.isqrt(v))


def test_floor_division_and_shifts_of_negative_values() -> None:
    """floor, not truncation (ONNX Runtime's Div truncates): every helper on negative values and ties."""
    a = torch.cat([torch.arange(-70, 70), torch.tensor([-(2**40) - 1, -(2**40), 2**40 + 1])]).to(torch.int64)
    shifts = torch.tensor([1, 3, 7])
    g = Graph()
    x = g.declare("a", np.int64, -(2**41), 2**41)
    s_var = g.declare("s", np.int64, 1, 7)
    outs = [g.floor_div(x, 7), g.floor_div(x, np.array([[3], [16], [5]])), g.shift_right(x, 3),
            g.round_shift(x, np.array([[1], [3], [7]])), g.shift_right(x, s_var)]
    stacked = g.op("Concat", [g.unsqueeze_last(g.op("Expand", [o, g.const([3, a.numel()])], np.int64, g.lohi(o)))
                              for o in outs], np.int64, axis=-1)
    model = _graph_model(g, [("a", _np(a)), ("s", _np(shifts[:, None]))], stacked, [3, a.numel(), len(outs)])
    (got,) = _session(model).run(["y"], {"a": _np(a), "s": _np(shifts[:, None])})
    got = torch.from_numpy(got)
    a2 = a.expand(3, -1)
    want = torch.stack([torch.div(a2, 7, rounding_mode="floor"),
                        torch.div(a2, torch.tensor([[3], [16], [5]]), rounding_mode="floor"), a2 >> 3,
                        ops.round_shift(a2, torch.tensor([[1], [3], [7]])), a2 >> shifts[:, None]], dim=-1)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Whole models


def _qmodel(name: str, probs: Probs, ln: LayerNormImpl) -> ivit.models.QModel:
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model(name), QuantConfig(probs=probs, layernorm=ln))
    ivit.calibrate(q, [random_pixels(4, q.img_size, seed=i) for i in range(2)])
    return q


def _check_model_runs(prog: ivit.Program, model: Any, seed: int = 3) -> None:
    onnx.checker.check_model(model, full_check=True)
    sess = _session(model)
    assert_integer_only(model, sess)
    engine = ivit.Engine(prog, backend="reference")
    sets = check_images(prog, 1, seed)
    batches = [random_pixels(b, prog.input_shape[1:], seed=seed + b) for b in (1, 2, 7)]
    for x in [*batches, torch.cat([sets["zeros"], sets["full"], sets["checker"]])]:  # all-0, all-255, checkerboards
        (got,) = sess.run(["logits"], {"pixels": _np(x)})
        assert torch.equal(torch.from_numpy(got), engine(x)), f"batch {x.shape[0]}"


@pytest.mark.parametrize("ln", list(LayerNormImpl), ids=lambda v: v.value)
@pytest.mark.parametrize("probs", list(Probs), ids=lambda v: v.value)
@pytest.mark.parametrize("name", ["vit_test", "swin_test"])
def test_whole_models_are_bitexact_in_onnx_runtime(name: str, probs: Probs, ln: LayerNormImpl) -> None:
    q = _qmodel(name, probs, ln)
    prog = ivit.freeze(q)
    _check_model_runs(prog, build_model(prog))
    x = random_pixels(3, q.img_size, seed=9)
    engine = ivit.Engine(prog, backend="reference")
    assert torch.equal(engine(x), q.logits(x))  # and so the PyTorch integer model's


@pytest.mark.parametrize("name", ["vit_digits", "swin_digits"])
def test_the_demo_models_are_bitexact_in_onnx_runtime(name: str, tmp_path: Path) -> None:
    q = make_qmodel(name)  # calibrated, random init: the architectures `ivit demo` writes
    prog = ivit.freeze(q)
    _check_model_runs(prog, build_model(prog), seed=5)
    x = random_pixels(3, q.img_size, seed=9)
    assert torch.equal(ivit.Engine(prog, backend="reference")(x), q.logits(x))


@pytest.mark.parametrize("gemm", GEMM_MODES)
@pytest.mark.parametrize("passes", [(), ("fuse_attention", "fold_gelu_table")], ids=["basic", "fused"])
def test_passes_and_gemm_modes(passes: tuple[str, ...], gemm: str, swin_prog: ivit.Program) -> None:
    _check_model_runs(swin_prog, build_model(swin_prog, passes=passes, gemm=gemm), seed=11)


def test_a_newer_opset(swin_prog: ivit.Program) -> None:
    model = build_model(swin_prog, opset=21)
    assert model.opset_import[0].version == 21
    _check_model_runs(swin_prog, model, seed=17)


@pytest.mark.parametrize("name", ["vit_test", "swin_test"])
def test_format1_fixtures_give_their_stored_logits(name: str, tmp_path: Path) -> None:
    expected = load_file(str(FIXTURES / "v1_expected.safetensors"))
    prog = ivit.load_program(FIXTURES / f"{name}_v1.ivit")
    assert prog.format_version == 1
    out = tmp_path / f"{name}.onnx"
    res = export_program(prog, "onnx", out)
    assert res.path == out and out.is_file() and res.info["onnx_ops"]["MatMulInteger"] > 0
    model = onnx.load(str(out))
    _check_model_runs(prog, model)
    pixels, logits = expected[f"{name}.pixels"], expected[f"{name}.logits"]
    (got,) = _session(model).run(["logits"], {"pixels": _np(pixels)})
    assert torch.equal(torch.from_numpy(got), logits)
    v = verify_program(prog, "onnx", out, images=4)
    assert v.bitexact and v.images == 4 + 4 and "onnxruntime" in v.runtime, v  # 1 + 2 + 1 random, 4 extreme


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_the_onnx_reference_evaluator_agrees(family: str, vit_prog: ivit.Program, swin_prog: ivit.Program) -> None:
    """ONNX's reference evaluator floors integer Div where ONNX Runtime truncates (onnxruntime#26997): the
    graphs never depend on the difference, so both give the engine's integers."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):  # the evaluator's own uses np.choose, which takes at most 64 entries
        def _run(self, data: np.ndarray, indices: np.ndarray, axis: int = 0) -> tuple[np.ndarray]:
            idx = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, idx, axis=axis),)

    prog = vit_prog if family == "vit" else swin_prog
    ev = ReferenceEvaluator(build_model(prog), new_ops=[GatherElements])
    x = random_pixels(3, prog.input_shape[1:], seed=13)
    (got,) = ev.run(["logits"], {"pixels": _np(x)})
    assert torch.equal(torch.from_numpy(got), ivit.Engine(prog, backend="reference")(x))


def test_the_integer_only_walk_can_fail(vit_prog: ivit.Program) -> None:
    from onnx import helper

    model = build_model(vit_prog)
    out = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Cast", [out], ["as_float"], to=onnx.TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info("as_float", onnx.TensorProto.FLOAT, ["batch", 10]))
    with pytest.raises(AssertionError):
        assert_integer_only(model)


@pytest.mark.slow
def test_deit_tiny_is_bitexact_in_onnx_runtime() -> None:
    prog = ivit.freeze(make_qmodel("deit_tiny_patch16_224", calib_batches=1, batch=2))
    _check_model_runs(prog, build_model(prog))


def test_onnx_runtime_optimized_graph_stays_integer(vit_prog: ivit.Program, tmp_path: Path) -> None:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(build_model(vit_prog).SerializeToString(), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    for init in opt.graph.initializer:
        assert init.data_type in INT_TYPES, init.name
    assert not {n.op_type for n in opt.graph.node} & FLOAT_OPS


# ---------------------------------------------------------------------------------------------
# The command-line function, user errors, atomic output


def test_cli_export_and_verify_on_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = ivit.freeze(make_qmodel("vit_digits")).save(tmp_path / "m.ivit")  # the model `ivit demo` writes
    out = tmp_path / "m.onnx"
    assert run_cli_export(src, "onnx", out, verify=True) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "bit-exact" in text and "yes" in text


def test_corrupt_input_gives_one_line_and_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    vit_prog: ivit.Program) -> None:
    good = vit_prog.save(tmp_path / "m.ivit").read_bytes()
    bad = tmp_path / "bad.ivit"
    bad.write_bytes(good[:5000])
    out = tmp_path / "bad.onnx"
    assert run_cli_export(bad, "onnx", out, verify=False) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ivit: error:") and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".bad.onnx*"))


def test_missing_output_folder_gives_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              vit_prog: ivit.Program) -> None:
    src = vit_prog.save(tmp_path / "m.ivit")
    out = tmp_path / "nope" / "m.onnx"
    assert run_cli_export(src, "onnx", out, verify=False) == 2
    err = capsys.readouterr().err.strip()
    assert "output folder does not exist" in err and "\n" not in err
    assert not (tmp_path / "nope").exists()
    with pytest.raises(IvitError, match="output folder"):
        export_program(vit_prog, "onnx", out)


def test_missing_extra_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], vit_prog: ivit.Program,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = vit_prog.save(tmp_path / "m.ivit")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert run_cli_export(src, "onnx", tmp_path / "m.onnx", verify=False) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'ivit[onnx]'" in err and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_failed_write_leaves_nothing(tmp_path: Path, vit_prog: ivit.Program, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"

    def broken(model: Any, path: str, *a: Any, **k: Any) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(OSError):
        export_program(vit_prog, "onnx", out)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_one_line_errors(vit_prog: ivit.Program, tmp_path: Path) -> None:
    with pytest.raises(IvitError, match="gemm"):
        export_program(vit_prog, "onnx", tmp_path / "a.onnx", gemm="s4s4")
    with pytest.raises(IvitError, match="opset"):
        export_program(vit_prog, "onnx", tmp_path / "a.onnx", opset=11)
    with pytest.raises(IvitError, match="pass"):
        export_program(vit_prog, "onnx", tmp_path / "a.onnx", passes=("no_such_pass",))
    with pytest.raises(IvitError, match="option"):
        export_program(vit_prog, "onnx", tmp_path / "a.onnx", colour="red")
    assert list(tmp_path.iterdir()) == []
