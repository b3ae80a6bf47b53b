"""TOSA export: every op lowered, run in Arm's ``tosa_reference_model``, ``torch.equal`` to the reference.

Op by op (one-node TOSA graphs) on the real nodes of frozen ViT and Swin programs and on random and extreme
inputs (rounding ties of negative values, all -128/-127/127/255, masks, biases, negative LayerNorm multipliers,
requantizations whose RESCALE preconditions cannot be proven); the shared pieces (requantization paths, floor
division, integer square root) on their edge values; whole models (vit_test, swin_test, the demo models
vit_digits and swin_digits) at batch 1 and 3; a walk of every exported graph finding only integer tensors and
PRO-INT integer operators; the refusal of 64-bit legacy programs; the user-facing errors and atomic output.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
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

pytest.importorskip("tosa_serializer", reason="TOSA export tests need the tosa extra: pip install 'ivit[tosa]'")

from ivit.export import EXPORTERS, run_cli_export  # noqa: E402
from ivit.export import export as export_program  # noqa: E402
from ivit.export import verify as verify_program  # noqa: E402
from ivit.export.tosa import (  # noqa: E402
    available,
    build_graph,
    op_graph,
    read_graph,
    reference_model_path,
    run_reference,
)
from ivit.export.tosa.graph import I8, I32, INT32_MAX, INT32_MIN, Graph  # noqa: E402
from ivit.export.tosa.lower import (  # noqa: E402
    LEGACY_REASON,
    TOSA_OPS_BY_OP,
    UNSUPPORTED,
    floor_div,
    isqrt,
    requant,
)

if reference_model_path() is None:
    pytest.skip("the tosa_reference_model binary of tosa-tools is missing: pip install 'ivit[tosa]'",
                allow_module_level=True)

FIXTURES = Path(__file__).parents[1] / "fixtures"
INT_DTYPES = {"INT8", "INT16", "INT32", "BOOL", "SHAPE"}
_D = {"INT8", "INT16", "INT32"}
#: operator -> element types of its main operand that the PRO-INT profile allows (TOSA 1.0 specification)
PRO_INT = {
    **{op: {"INT32"} for op in ("ADD", "SUB", "INTDIV", "MAXIMUM", "MINIMUM", "ABS", "CLZ", "REDUCE_SUM", "GREATER",
                                "GREATER_EQUAL", "EQUAL")},
    "MUL": _D, "ARITHMETIC_RIGHT_SHIFT": _D, "LOGICAL_LEFT_SHIFT": _D, "REDUCE_MAX": _D, "RESCALE": _D,
    "CLAMP": {"INT8"}, "TABLE": {"INT8"}, "MATMUL": {"INT8"}, "CONCAT": {"INT8", "INT32", "BOOL"},
    "SELECT": {"BOOL"}, "GATHER": _D, "CAST": _D | {"BOOL"},
    **{op: _D | {"BOOL"} for op in ("RESHAPE", "TRANSPOSE", "SLICE", "PAD", "TILE", "IDENTITY", "CONST")},
    "CONST_SHAPE": {"SHAPE"},
}


def _np(t: Tensor) -> np.ndarray:
    t = t.contiguous()
    return t.numpy().view(np.int8) if t.dtype == torch.uint8 else t.numpy()


def assert_integer_only(data: bytes) -> None:
    """Every tensor integer (int8/int16/int32/bool/shape), every operator PRO-INT on its element type."""
    info = read_graph(data)
    assert info.version == "1.0.0"
    for name, dt in info.tensors:
        assert dt in INT_DTYPES, f"tensor {name} is {dt}"
    for op, dt_in, dt_out in info.operators:
        assert op in PRO_INT, f"operator {op} is not an integer PRO-INT operator"
        main = dt_out[0] if op in ("CONST", "CONST_SHAPE") else dt_in[0]
        assert main in PRO_INT[op], f"{op} on {main} needs an extension beyond PRO-INT"
        assert all(d in INT_DTYPES for d in dt_in + dt_out), (op, dt_in, dt_out)


# ---------------------------------------------------------------------------------------------
# Registry and lowering table


def test_every_op_of_the_op_set_has_a_lowering() -> None:
    ex = EXPORTERS["tosa"]
    assert ex.available() and available() and ex.requirement == "pip install 'ivit[tosa]'"
    assert ex.unsupported() == {"layernorm": LEGACY_REASON, "shiftmax": LEGACY_REASON}
    assert "64-bit" in LEGACY_REASON and "layernorm=int32" in LEGACY_REASON and "probs=rel8" in LEGACY_REASON
    assert set(ex.lowerings()) == set(OPSET) - set(UNSUPPORTED)
    assert {n for n, d in OPSET.items() if d.legacy} == set(UNSUPPORTED)
    assert set(TOSA_OPS_BY_OP) == set(ex.lowerings())
    assert {o for v in TOSA_OPS_BY_OP.values() for o in v} <= set(PRO_INT)


# ---------------------------------------------------------------------------------------------
# Op by op


def _types(inputs: list[Tensor]) -> list[TType]:
    return [TType.of(t.dtype, tuple(t.shape), 0, int(t.min()), int(t.max())) for t in inputs]


def run_op(op: str, inputs: list[Tensor], consts: dict[str, Tensor] | None = None, attrs: dict[str, Any] | None = None,
           types: list[TType] | None = None, producers: list[Any] | None = None,
           input_names: list[str] | None = None, want: Tensor | None = None) -> dict[str, int]:
    """Lower one node, run it in the reference model and compare with the op's reference (``torch.equal``).
    Returns the TOSA operators the lowering emitted."""
    consts, attrs = consts or {}, attrs or {}
    types = types or _types(inputs)
    g, out_t = op_graph(op, types, consts, attrs, producers=producers, input_names=input_names)
    data = g.serialize()
    assert_integer_only(data)
    boundary = {"RESCALE"} if torch.uint8 in [t.dtype for t in types] + [out_t.dtype] else set()
    used = set(g.counts) - {"IDENTITY"} - boundary
    assert used <= set(TOSA_OPS_BY_OP[op]), f"{op} emits {sorted(used - set(TOSA_OPS_BY_OP[op]))}, not in its table"
    (got,) = run_reference(data, {t.name: _np(x) for t, x in zip(g.inputs, inputs, strict=True)},
                           [g.outputs[0].name])
    got = torch.from_numpy(got)
    if out_t.dtype == torch.uint8:
        got = got.view(torch.uint8)
    if want is None:
        want = OPSET[op].reference(*inputs, **consts, **attrs)
    assert got.dtype == want.dtype and got.shape == want.shape, (op, got.dtype, want.dtype, got.shape, want.shape)
    if not torch.equal(got, want):
        bad = (got.to(torch.int64) != want.to(torch.int64)).nonzero()[:5].tolist()
        raise AssertionError(f"{op}: the reference model differs from the reference at {bad}")
    return dict(g.counts)


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
                 consts={k: p.consts[v] for k, v in n.consts.items()},
                 types=[TType.of(info.types[v].dtype, tuple(values[v].shape), info.types[v].batch_axis,
                                 info.types[v].lo, info.types[v].hi) for v in n.inputs],
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
        if key in seen and node.op in ("reshape", "permute", "slice", "select", "roll", "pad", "linear", "matmul"):
            continue  # the same data movement (or GEMM shape) again
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


def _ties(s: int, shape: tuple[int, ...]) -> Tensor:
    """``(2k + 1) * 2**(s-1)`` for k around 0: every value a rounding tie of ``>> s``, negative ones included."""
    n = int(np.prod(shape))
    ks = torch.arange(-(n // 2), n - n // 2, dtype=torch.int64)
    return ((2 * ks + 1) << (s - 1)).reshape(shape)


def _cases(op: str) -> list[dict[str, Any]]:
    """Random and extreme cases of one op: dicts with inputs, consts, attrs (and optionally types)."""
    c: list[dict[str, Any]] = []
    if op == "patchify":
        for p in (2, 4):
            for x in (_rand((2, 3, 8, 8), 0, 255, torch.uint8, 1), torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                      torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)):
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
        c.append(dict(inputs=[_rand((6, k), -128, 127, torch.int8, 5)], consts={"weight": ws[0]}))  # rank 2
    elif op == "matmul":
        for a_dt, lo, hi in ((torch.int8, -128, 127), (torch.uint8, 0, 255)):
            a = _rand((2, 3, 5, 16), lo, hi, a_dt, 5)
            for b in (_rand((2, 3, 16, 6), -128, 127, torch.int8, 6), torch.full((2, 3, 16, 6), -128,
                                                                                  dtype=torch.int8)):
                c.append(dict(inputs=[a, b], attrs={"transpose_b": 0}))
                c.append(dict(inputs=[a, b.transpose(-1, -2).contiguous()], attrs={"transpose_b": 1}))
            ext = torch.full((1, 2, 4, 16), hi, dtype=a_dt)
            c.append(dict(inputs=[ext, torch.full((1, 2, 16, 3), -128, dtype=torch.int8)], attrs={"transpose_b": 0}))
        a2, b2 = _rand((4, 16), -128, 127, torch.int8, 7), _rand((16, 5), -128, 127, torch.int8, 8)
        c.append(dict(inputs=[a2, b2], attrs={"transpose_b": 0},  # rank 2, no batch axis
                      types=[TType.of(torch.int8, (4, 16), None), TType.of(torch.int8, (16, 5), None)]))
    elif op == "requantize":
        x = torch.cat([_rand((2, 4, 6), -(2**31) + 1, 2**31 - 1, torch.int64, 7),
                       torch.full((1, 4, 6), 2**31 - 1), torch.full((1, 4, 6), -(2**31) + 1)]).to(torch.int32)
        for bits in (8, 12, 16, 32):
            # shift 1 and full-range inputs: no RESCALE precondition holds, MUL with a shift takes over
            c.append(dict(inputs=[x], consts={"mult": _rand((6,), -(2**31) + 1, 2**31 - 1, torch.int32, 8),
                                               "shift": _i32([1, 5, 31, 40, 61, 62])}, attrs={"bits": bits}))
            c.append(dict(inputs=[x], consts={"mult": _i32([1_518_500_250]), "shift": _i32([37])},
                          attrs={"bits": bits}))
            c.append(dict(inputs=[x], consts={"mult": _i32([-1_518_500_250, 0, 3, -3, 2**31 - 1, -(2**31) + 1]),
                                               "shift": _i32([40, 2, 2, 33, 62, 45])}, attrs={"bits": bits}))
        # rounding ties of negative and positive values: x * mult = (2k + 1) * 2**(s - 1)
        for s in (1, 2, 3, 20):
            for m in (1, -1):
                for bits in (8, 32):
                    c.append(dict(inputs=[_ties(s, (2, 5, 8)).to(torch.int32)], consts={"mult": _i32(m),
                                                                                       "shift": _i32(s)},
                                  attrs={"bits": bits}))
        for dt, lo, hi in ((torch.int8, -128, 127), (torch.int16, -32768, 32767)):
            for m in (2**30 + 7, -(2**30) - 7):
                xs = torch.cat([_rand((3, 4, 5), lo, hi, dt, 9), torch.full((1, 4, 5), lo, dtype=dt),
                                torch.full((1, 4, 5), hi, dtype=dt)])
                c.append(dict(inputs=[xs], consts={"mult": _i32(m), "shift": _i32(30)}, attrs={"bits": 8}))
    elif op == "add_requantize":
        a = _rand((2, 3, 6), -(2**31) + 1, 2**31 - 1, torch.int32, 10)
        b = _rand((2, 3, 6), -32768, 32767, torch.int16, 11)
        c.append(dict(inputs=[a, b], consts={"mult_a": _i32([2**20 + 1] * 6), "shift_a": _i32([31, 32, 33, 34, 35, 36]),
                                             "mult_b": _i32(-(2**30) + 3), "shift_b": _i32(17)}, attrs={"bits": 16}))
        ties = _ties(4, (2, 3, 6)).to(torch.int32)
        for mb in (1, -1):
            c.append(dict(inputs=[ties, ties], consts={"mult_a": _i32(1), "shift_a": _i32(4), "mult_b": _i32(mb),
                                                       "shift_b": _i32(4)}, attrs={"bits": 8}))
        ext = torch.full((1, 3, 6), 127, dtype=torch.int8)
        c.append(dict(inputs=[ext, -ext], consts={"mult_a": _i32(2**30), "shift_a": _i32(24), "mult_b": _i32(2**30),
                                                  "shift_b": _i32(25)}, attrs={"bits": 16}))
        # |a| near 2**(c-1) of its normalized shift: MUL with a shift, not RESCALE
        big = torch.cat([torch.full((1, 3, 6), 2**29 + 5), torch.full((1, 3, 6), -(2**29) - 5)]).to(torch.int32)
        c.append(dict(inputs=[big, big], consts={"mult_a": _i32([2**30 + 1] * 6), "shift_a": _i32([30] * 6),
                                                 "mult_b": _i32(-(2**29)), "shift_b": _i32(31)}, attrs={"bits": 8}))
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
        for bits in (8, 16, 24):
            for xs, cs in ((x, base), (small, moderate)):
                c.append(dict(inputs=[xs], consts=cs, attrs={"bits": bits}))
                c.append(dict(inputs=[xs], consts={**cs, "prefix": _rand((2, 5), -40000, 40000, torch.int32, 18)},
                              attrs={"bits": bits}))
    elif op == "layernorm32":
        for ch in (8, 48, 96):
            rows = [_rand((2, 3, ch), -32767, 32767, torch.int64, 19 + ch), torch.full((1, 3, ch), -32767),
                    torch.full((1, 3, ch), 1234), torch.arange(3 * ch).reshape(1, 3, ch) % 2 * 65534 - 32767]
            spike = torch.zeros(1, 3, ch, dtype=torch.int64)
            spike[..., 0] = 32767
            neg_spike = torch.zeros(1, 3, ch, dtype=torch.int64)
            neg_spike[..., -1] = -32768
            x = torch.cat(rows + [spike, neg_spike]).to(torch.int16)
            # negative multipliers (negative gamma) on half the channels; validated: z b / 2**c, offset <= 2**30
            mult = _rand((ch,), 2**29, 2**31 - 1, torch.int64, 20)
            mult[::2] = -mult[::2]
            consts = {"mult": mult.to(torch.int32), "shift": _rand((ch,), 22, 40, torch.int32, 21),
                      "offset": _rand((ch,), -300, 300, torch.int32, 22)}
            for bits in (8, 16):
                c.append(dict(inputs=[x], consts=consts, attrs={"bits": bits}))
            x8 = torch.cat([_rand((2, 3, ch), -128, 127, torch.int8, 23),
                            torch.full((1, 3, ch), -128, dtype=torch.int8),
                            torch.full((1, 3, ch), 127, dtype=torch.int8)])
            c.append(dict(inputs=[x8], consts={"mult": _i32(2**30), "shift": _i32(24), "offset": _i32(-3)},
                          attrs={"bits": 8}))
            c.append(dict(inputs=[x8], consts={"mult": _i32(-(2**30)), "shift": _i32(21), "offset": _i32(5)},
                          attrs={"bits": 8}))
    elif op == "shiftmax_rel":
        for dt, lo, hi in ((torch.int8, -128, 127), (torch.int16, -32768, 32767),
                           (torch.int32, -(2**24) + 1, 2**24 - 1)):
            x = _rand((4, 2, 6, 6), lo, hi, dt, 26)
            x[1, 1] = hi  # equal rows
            x[2, 0] = lo
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
        if op == "mean":  # rounding ties of negative means, and sums that leave int32 (odd and even counts)
            for n in (4, 5):
                t = torch.tensor([[-3] + [-2] * (n - 1), [-1] * (n - 1) + [-2], [2**31 - 1] * n, [-(2**31)] * n],
                                 dtype=torch.int32)
                c.append(dict(inputs=[t.reshape(1, 4, n)], attrs={"dim": -1}))
    elif op == "attention":
        b, h, n, d = 4, 2, 5, 8
        qkv = [_rand((b, h, n, d), -128, 127, torch.int8, 40 + i) for i in range(3)]
        ext = [torch.full((b, h, n, d), v, dtype=torch.int8) for v in (-128, -128, 127)]
        for inputs in (qkv, ext):
            for extra in ({}, {"bias": _rand((h, n, n), -(2**20), 2**20, torch.int32, 43)},
                          {"mask": _window_mask(2, n, 44)},
                          {"bias": _rand((h, n, n), -(2**10), 2**10, torch.int32, 45), "mask": _window_mask(4, n, 46)}):
                consts = {"score_mult": _i32([1_300_000_000]), "score_shift": _i32([37]), **extra}
                c.append(dict(inputs=inputs, consts=consts, attrs={"score_bits": 16, "probs": 1, "x0": -180}))
        c.append(dict(inputs=qkv, consts={"score_mult": _i32(2**30), "score_shift": _i32(44)},
                      attrs={"score_bits": 8, "probs": 1, "x0": -12}))
    elif op == "requantize_table":
        table = _rand((256,), -128, 127, torch.int8, 50)
        for dt, lo, hi in ((torch.int16, -32768, 32767), (torch.int32, -(2**31) + 1, 2**31 - 1)):
            x = torch.cat([_rand((2, 5, 4), lo, hi, dt, 51), torch.full((1, 5, 4), lo, dtype=dt)])
            c.append(dict(inputs=[x], consts={"mult": _i32(2**30 + 1), "shift": _i32(45 if dt == torch.int32 else 37),
                                               "table": table}))
            c.append(dict(inputs=[x], consts={"mult": _rand((4,), -(2**31) + 1, 2**31 - 1, torch.int32, 52),
                                               "shift": _i32([38, 40, 50, 62]), "table": table}))
            c.append(dict(inputs=[x], consts={"mult": _i32([-(2**30), 2**30, 7, -7]), "shift": _i32([1, 2, 3, 31]),
                                               "table": table}))
    return c


@pytest.mark.parametrize("op", sorted(set(OPSET) - set(UNSUPPORTED)))
def test_op_on_random_and_extreme_inputs(op: str) -> None:
    cases = _cases(op)
    assert cases, f"no cases for {op}"
    for i, case in enumerate(cases):
        try:
            run_op(op, case["inputs"], case.get("consts"), case.get("attrs"), types=case.get("types"),
                   producers=case.get("producers"), input_names=case.get("input_names"))
        except Exception as e:
            raise AssertionError(f"{op} case {i}: {e}") from e


def test_wide_intervals_need_no_tighter_proof() -> None:
    """The lowerings also hold with the widest intervals the op set accepts (int32 accumulators)."""
    x = _rand((2, 3, 4), -(2**31) + 1, 2**31 - 1, torch.int32, 60)
    wide = [TType.of(torch.int32, (2, 3, 4), 0)]
    for bits in (8, 31, 32):
        counts = run_op("requantize", [x], {"mult": _i32(2**31 - 1), "shift": _i32(1)}, {"bits": bits}, types=wide)
        assert "MUL" in counts and "RESCALE" not in counts  # shift 1: no RESCALE can do it
    run_op("requantize_table", [x], {"mult": _i32(-(2**31) + 1), "shift": _i32(62),
                                     "table": _rand((256,), -128, 127, torch.int8, 61)}, types=wide)


# ---------------------------------------------------------------------------------------------
# Shared pieces on their edge values


def _run_piece(build: Any, x: Tensor, lo: int, hi: int) -> Tensor:
    g = Graph()
    inp = g.input("x", tuple(x.shape), I32, lo, hi)
    g.output(build(g, inp))
    assert_integer_only(g.serialize())
    (got,) = run_reference(g.serialize(), {"x": _np(x.to(torch.int32))}, [g.outputs[0].name])
    return torch.from_numpy(got)


@pytest.mark.parametrize("path", ["rescale", "mul"])
def test_requantization_paths_at_saturation_points_and_ties(path: str) -> None:
    """``requant`` = ``clamp(round_shift(x b, c), lo, hi)`` on full int32 inputs, around every channel's saturation
    point and on rounding ties, with negative, zero and extreme multipliers, by RESCALE and by MUL with a shift."""
    mult = [2**30 + 12345, -(2**30) - 999, 0, 1, -1, 2**31 - 1, -(2**31) + 1, 77_777_777]
    shift = [40, 33, 5, 2, 3, 45, 62, 30] if path == "rescale" else [40, 1, 5, 1, 3, 1, 62, 30]
    lo_out, hi_out = -127, 127
    b = torch.tensor(mult, dtype=torch.int64)
    c = torch.tensor(shift, dtype=torch.int64)
    cols = []
    for j in range(len(mult)):  # values around the thresholds of channel j
        if mult[j]:
            for t in (hi_out, lo_out):
                x0 = ((t << shift[j]) // mult[j])
                cols.append(torch.arange(x0 - 3, x0 + 4))
    pts = torch.cat(cols + [torch.tensor([INT32_MIN, INT32_MIN + 1, INT32_MAX, -1, 0, 1])])
    pts = pts.clamp(INT32_MIN, INT32_MAX)
    x = torch.cat([pts[:, None].expand(-1, len(mult)), _rand((64, len(mult)), INT32_MIN, INT32_MAX, torch.int64, 70),
                   _ties(3, (16, len(mult)))]).contiguous()
    counts: dict[str, int] = {}

    def build(g: Graph, inp: Any) -> Any:
        y = requant(g, inp, np.array(mult), np.array(shift), lo_out, hi_out, I8, "test")
        counts.update(g.counts)
        return y

    got = _run_piece(build, x, INT32_MIN, INT32_MAX)
    want = ops.requantize(x, b, c, 8)
    assert torch.equal(got, want)
    assert ("RESCALE" in counts) == (path == "rescale") and ("MUL" in counts)


def test_floor_division_of_negative_values() -> None:
    """floor, not truncation (INTDIV truncates): both tricks (shift up by a multiple, select on the sign)."""
    x = torch.cat([torch.arange(-70, 70), torch.tensor([INT32_MIN + 10, INT32_MIN + 7, INT32_MAX - 7, 0])])[None]
    for d, lo, hi in ((7, -70, 70), (16, -70, 70), (7, INT32_MIN + 7, INT32_MAX)):
        xs = x.clamp(lo, hi)
        got = _run_piece(lambda g, t, d=d: floor_div(g, t, d), xs, lo, hi)
        assert torch.equal(got, torch.div(xs, d, rounding_mode="floor").to(torch.int32)), d


def test_isqrt_is_exact() -> None:
    j = torch.tensor([1, 2, 3, 100, 1000, 32767, 46340], dtype=torch.int64)
    v = torch.cat([torch.arange(0, 300), j * j, j * j - 1, j * j + 1, 2 ** torch.arange(0, 31) - 1,
                   2 ** torch.arange(0, 31), torch.tensor([2**31 - 1]),
                   torch.randint(0, 2**31, (3000,), generator=_gen(62))])
    v = v[(v >= 0) & (v < 2**31)]
    got = _run_piece(lambda g, t: isqrt(g, t), v[None], 0, INT32_MAX)
    assert torch.equal(got[0].to(torch.int64), ops.isqrt(v))


# ---------------------------------------------------------------------------------------------
# Whole models


def _export(prog: ivit.Program, tmp_path: Path, name: str, **options: Any) -> Path:
    out = tmp_path / f"{name}.tosa"
    res = export_program(prog, "tosa", out, **options)
    assert res.path == out and out.is_file() and res.info["tosa_ops"]["MATMUL"] > 0
    assert res.info["batch"] == options.get("batch", 1) and res.info["profile"] == "PRO-INT"
    assert_integer_only(out.read_bytes())
    return out


@pytest.mark.parametrize("name", ["vit_test", "swin_test", "vit_digits", "swin_digits"])
def test_whole_models_are_bitexact_in_the_reference_model(name: str, tmp_path: Path, vit_prog: ivit.Program,
                                                          swin_prog: ivit.Program) -> None:
    if name in ("vit_test", "swin_test"):
        q = None
        prog = vit_prog if name == "vit_test" else swin_prog
    else:  # the demo models, calibrated instances with random init
        q = make_qmodel(name)
        prog = ivit.freeze(q)
    out = _export(prog, tmp_path, name, batch=2)
    info = read_graph(out.read_bytes())
    assert info.inputs == [("pixels", (2, *prog.input_shape), "INT8")]
    assert info.outputs == [("logits", (2, 10), "INT32")]
    x = random_pixels(2, prog.input_shape[1], seed=9)
    (got,) = run_reference(out.read_bytes(), {info.inputs[0][0]: _np(x)}, [info.outputs[0][0]])
    want = ivit.Engine(prog, backend="reference")(x)
    assert torch.equal(torch.from_numpy(got), want)
    if q is not None:
        assert torch.equal(want, q.logits(x))  # and so the PyTorch integer model's
    v = verify_program(prog, "tosa", out, images=2)  # all-0, all-255, 2 checkerboards, 2 random: 3 runs of 2
    assert v.bitexact and v.images == 6 and "tosa_reference_model" in v.runtime and "batch 2" in v.detail, v


@pytest.mark.slow
def test_deit_tiny_is_bitexact_in_the_reference_model(tmp_path: Path) -> None:
    prog = ivit.freeze(make_qmodel("deit_tiny_patch16_224", calib_batches=1, batch=2))
    out = _export(prog, tmp_path, "deit_tiny")
    v = verify_program(prog, "tosa", out, images=1)
    assert v.bitexact and v.images == 5, v


def test_batch_one_and_fused_passes(swin_prog: ivit.Program, tmp_path: Path) -> None:
    out = _export(swin_prog, tmp_path, "fused", passes=("fuse_attention", "fold_gelu_table"))
    v = verify_program(swin_prog, "tosa", out, images=1)  # batch 1: all-0, all-255, 2 checkerboards, 1 random
    assert v.bitexact and v.images == 5 and v.info["batch"] == 1, v


def test_the_integer_only_walk_can_fail(vit_prog: ivit.Program) -> None:
    g = build_graph(vit_prog)
    t = g.ser.addIntermediate([1, 10], g.DType.FP32)
    g.ser.addOperator(g.Op.CAST, [g.outputs[0].name], [t.name], g._attr("Cast"))
    with pytest.raises(AssertionError):
        assert_integer_only(g.serialize())
    g2 = build_graph(vit_prog)  # and an int16 CLAMP, which needs EXT-INT16
    x16 = g2.const(np.zeros((2,)), "int16")
    y = g2._new((2,), "int16", -5, 5)
    g2._emit("CLAMP", [x16.name], y, "Clamp", [0, 0], [1, 0], g2.ts.NanPropagationMode.PROPAGATE)
    with pytest.raises(AssertionError, match="beyond PRO-INT"):
        assert_integer_only(g2.serialize())


# ---------------------------------------------------------------------------------------------
# Refusals: 64-bit legacy programs


@pytest.mark.parametrize("name", ["vit_test_v1.ivit", "swin_test_v1.ivit"])
def test_format1_programs_are_refused_with_one_line(name: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    prog = ivit.load_program(FIXTURES / name)
    out = tmp_path / "v1.tosa"
    with pytest.raises(IvitError) as e:
        export_program(prog, "tosa", out)
    msg = str(e.value)
    assert "\n" not in msg and "layernorm" in msg and LEGACY_REASON in msg
    assert not out.exists() and not list(tmp_path.iterdir())
    assert run_cli_export(FIXTURES / name, "tosa", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ivit: error: tosa export: node") and "\n" not in err and not out.exists()


@pytest.mark.parametrize("fused", [False, True], ids=["shiftmax", "attention_probs0"])
def test_legacy_shiftmax_and_probs0_attention_are_refused(fused: bool, tmp_path: Path) -> None:
    prog = ivit.freeze(make_qmodel("vit_test", config=QuantConfig(probs=Probs.SHIFTMAX8)))
    if fused:  # the fused attention with probs=0 (not an op listed as unsupported: refused by the exporter)
        prog = apply_passes(prog, ["fuse_attention"])
        assert {int(n.attrs["probs"]) for n in prog.nodes if n.op == "attention"} == {0}
    out = tmp_path / "m.tosa"
    with pytest.raises(IvitError, match="needs 64-bit intermediates") as e:
        export_program(prog, "tosa", out)
    assert ("(attention, probs=0)" if fused else "(shiftmax)") in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
    if not fused:
        prog64 = ivit.freeze(make_qmodel("vit_test", config=QuantConfig(layernorm=LayerNormImpl.INT64)))
        with pytest.raises(IvitError, match=r"\(layernorm\) cannot be lowered"):
            export_program(prog64, "tosa", out)
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The command-line function, user errors, atomic output


def test_cli_export_and_verify_on_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = ivit.freeze(make_qmodel("vit_digits")).save(tmp_path / "m.ivit")  # the model `ivit demo` writes
    out = tmp_path / "m.tosa"
    assert run_cli_export(src, "tosa", out, verify=True) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "bit-exact" in text and "yes" in text and "tosa_reference_model" in text
    from ivit.cli import main

    out2 = tmp_path / "cli.tosa"
    assert main(["export", str(src), "--format", "tosa", "-o", str(out2), "--verify"]) == 0
    assert out2.read_bytes() == out.read_bytes()  # deterministic


def test_corrupt_input_gives_one_line_and_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    vit_prog: ivit.Program) -> None:
    good = vit_prog.save(tmp_path / "m.ivit").read_bytes()
    bad = tmp_path / "bad.ivit"
    bad.write_bytes(good[:5000])
    out = tmp_path / "bad.tosa"
    assert run_cli_export(bad, "tosa", out, verify=True) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ivit: error:") and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".bad.tosa*"))


def test_missing_output_folder_gives_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              vit_prog: ivit.Program) -> None:
    src = vit_prog.save(tmp_path / "m.ivit")
    out = tmp_path / "nope" / "m.tosa"
    assert run_cli_export(src, "tosa", out) == 2
    err = capsys.readouterr().err.strip()
    assert "output folder does not exist" in err and "\n" not in err and not out.parent.exists()


def test_corrupt_or_mismatched_artefact_gives_one_line(tmp_path: Path, vit_prog: ivit.Program,
                                                       swin_prog: ivit.Program) -> None:
    bad = tmp_path / "bad.tosa"
    bad.write_bytes(b"\x00" * 64 + b"not a flatbuffer")
    with pytest.raises(IvitError, match="is not a TOSA flatbuffer") as e:
        verify_program(vit_prog, "tosa", bad)
    assert "\n" not in str(e.value)
    with pytest.raises(IvitError, match="no such file"):
        verify_program(vit_prog, "tosa", tmp_path / "missing.tosa")
    other = _export(swin_prog, tmp_path, "swin")
    digits = ivit.freeze(make_qmodel("vit_digits"))  # 16x16 pixels, not 32x32
    with pytest.raises(IvitError, match="does not take 3x16x16 pixels"):
        verify_program(digits, "tosa", other)


def test_a_failing_graph_gives_one_line() -> None:
    g = Graph()
    x = g.input("x", (2,), I32)
    big = g.scalar(2**31 - 1, I32, 1)
    g.output(g.add(x, big, proven=(0, 2**31 - 1)))  # a wrong proof: 1 + (2**31 - 1) overflows, UNPREDICTABLE
    with pytest.raises(IvitError, match="tosa_reference_model failed") as e:
        run_reference(g.serialize(), {"x": np.array([1, 2], np.int32)}, [g.outputs[0].name])
    assert "\n" not in str(e.value) and "UNPREDICTABLE" in str(e.value)


def test_a_failed_write_leaves_nothing(tmp_path: Path, vit_prog: ivit.Program, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.tosa"
    real = Path.write_bytes

    def half(self: Path, data: bytes) -> int:
        real(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half)
    with pytest.raises(OSError):
        export_program(vit_prog, "tosa", out)
    monkeypatch.undo()
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_options_are_one_line_errors(vit_prog: ivit.Program, tmp_path: Path) -> None:
    for opts, msg in (({"batch": 0}, "batch must be"), ({"batch": 2.5}, "batch must be"),
                      ({"opset": 3}, "unknown TOSA export option")):
        with pytest.raises(IvitError, match=msg):
            export_program(vit_prog, "tosa", tmp_path / "m.tosa", **opts)
    assert not list(tmp_path.iterdir())


def test_missing_extra_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], vit_prog: ivit.Program,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import ivit.export.tosa as tosa_mod

    monkeypatch.setattr(tosa_mod, "_has_serializer", lambda: False)
    assert not EXPORTERS["tosa"].available() and EXPORTERS["tosa"].lowerings()
    with pytest.raises(IvitError, match=r"^export format tosa needs pip install 'ivit\[tosa\]'$"):
        export_program(vit_prog, "tosa", tmp_path / "m.tosa")
    src = vit_prog.save(tmp_path / "m.ivit")
    assert run_cli_export(src, "tosa", tmp_path / "m.tosa") == 2
    err = capsys.readouterr().err.strip()
    assert err == "ivit: error: export format tosa needs pip install 'ivit[tosa]'"
    assert not (tmp_path / "m.tosa").exists()


def test_the_module_imports_tosa_tools_only_when_used() -> None:
    import ast

    for f in (Path(ivit.__file__).parent / "export" / "tosa").glob("*.py"):
        for node in ast.parse(f.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("tosa_serializer", "tosa", "tosa_reference_model") for n in names), f


@pytest.mark.slow
def test_without_tosa_tools_the_package_imports() -> None:
    """In a fresh interpreter that cannot import tosa-tools: the package imports, the registry names the extra."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tosa_serializer', 'tosa', 'tosa_reference_model'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ivit.export as E\n"
        "from ivit.export.tosa import available\n"
        "assert not available() and E.EXPORTERS['tosa'].lowerings()\n"
        "try:\n"
        "    E.get_exporter('tosa')\n"
        "except Exception as e:\n"
        "    print(e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "export format tosa needs pip install 'ivit[tosa]'"
