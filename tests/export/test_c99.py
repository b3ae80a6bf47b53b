"""The ``c`` exporter (issue 13): standalone integer-only C99 for microcontrollers without an FPU.

* Every op of the op set (fused and legacy ops included) is lowered to C, compiled with the strict host
  flags and run against ``OPSET[op].reference`` on random and extreme values, bit for bit; a second
  build with AddressSanitizer/UndefinedBehaviorSanitizer proves the same code free of overflow, bad
  shifts and out-of-bounds accesses on those inputs; a guard after each arena catches writes past it.
* The flags are a real check: ``-mgeneral-regs-only`` rejects a one-line float function.
* Whole models (ViT, Swin in both probability modes, the demo sizes, the format-1 fixtures) compiled
  with the system ``cc`` give the engine's logits (``torch.equal``) on random, all-0, all-255 and
  checkerboard images.
* With the ARM tools (CI installs them): ``arm-none-eabi-gcc`` builds the model for a Cortex-M3 with the
  soft-float ABI, ``arm-none-eabi-nm`` finds no soft-float helper (a float control does show one), and
  QEMU's ``mps2-an385`` runs ``vit_digits`` and ``swin_digits`` bit-exactly.
* Bad inputs: corrupt files, ``max_ram``/``max_flash`` refusals, no partial directories.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import ivit
import ivit.export
from conftest import hostile, make_qmodel
from ivit import ops
from ivit.codegen.c.generator import NodeCtx, _Buf, lower_graph, plan_arena
from ivit.errors import IvitError
from ivit.export import c99
from ivit.export.c99 import cortexm
from ivit.export.c99.host import HOST_FLAGS, compile_c, host_cc, link
from ivit.ir import OPSET, Node, Program, ProgramError, TType, apply_passes
from ivit.ir.opset import Check

CC = host_cc()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc) on this machine")
ARM_MISSING = cortexm.missing_tools()
needs_arm = pytest.mark.skipif(bool(ARM_MISSING), reason="ARM tools missing: " + ", ".join(ARM_MISSING) +
                               " (apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")

I8, U8, I16, I32, BOOL = torch.int8, torch.uint8, torch.int16, torch.int32, torch.bool


# ---------------------------------------------------------------------------------------------
# Op-by-op: small graphs, every lowering against the reference
# ---------------------------------------------------------------------------------------------

def T(dtype: torch.dtype, shape: tuple[int, ...], batch_axis: int | None = 0, lo: int | None = None,
      hi: int | None = None) -> TType:
    return TType.of(dtype, shape, batch_axis, lo, hi)


@dataclass
class OpCase:
    id: str
    nodes: list[Node]
    consts: dict[str, Tensor]
    inputs: dict[str, TType]
    batch: int = 1
    extra: list[dict[str, Tensor]] = field(default_factory=list)  # extra trials (concrete inputs)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape: tuple[int, ...], lo: int, hi: int, seed: int, dtype: torch.dtype = I32) -> Tensor:
    return torch.randint(lo, hi + 1, shape, generator=_g(seed), dtype=torch.int64).to(dtype)


def _mult(shape: tuple[int, ...], seed: int, lo: int = 1 << 29, hi: int = (1 << 31) - 1) -> Tensor:
    m = _rand(shape, lo, hi, seed)
    sign = torch.where(_rand(shape, 0, 3, seed + 1) == 0, -1, 1).to(I32)
    return m * sign


def one(op: str, inputs: dict[str, TType], consts: dict[str, Tensor] | None = None, batch: int = 1,
        tag: str = "", extra: list[dict[str, Tensor]] | None = None, **attrs: object) -> OpCase:
    consts = consts or {}
    node = Node(op, tuple(inputs), "y", {k: k for k in consts}, dict(attrs))
    return OpCase(f"{op}{'-' + tag if tag else ''}", [node], consts, inputs, batch, extra or [])


def _cases() -> list[OpCase]:
    cs: list[OpCase] = []
    # patchify
    cs.append(one("patchify", {"x": T(U8, (1, 3, 8, 8))}, patch=4))
    cs.append(one("patchify", {"x": T(U8, (1, 1, 6, 9))}, patch=3, batch=2, tag="b2"))
    # linear
    w = _rand((7, 17), -127, 127, 1, I8)
    cs.append(one("linear", {"x": T(I8, (1, 5, 17))}, {"weight": w, "bias": _rand((7,), -(2**29), 2**29, 2)}))
    cs.append(one("linear", {"x": T(I8, (1, 3, 4, 9))}, {"weight": torch.full((5, 9), -128, dtype=I8)},
                  tag="nobias-extreme", batch=2))
    # matmul
    cs.append(one("matmul", {"a": T(I8, (1, 2, 5, 7)), "b": T(I8, (1, 2, 7, 3))}, transpose_b=0))
    cs.append(one("matmul", {"a": T(I8, (1, 2, 5, 7)), "b": T(I8, (1, 2, 4, 7))}, transpose_b=1, tag="tb",
                  batch=2))
    cs.append(one("matmul", {"a": T(U8, (1, 3, 6)), "b": T(I8, (1, 6, 4))}, transpose_b=0, tag="u8"))
    cs.append(one("matmul", {"a": T(I8, (6, 5), None), "b": T(I8, (5, 3), None)}, transpose_b=0, tag="nobatch"))
    # requantize: per tensor / per channel, int32 / int16 / int8 inputs, extreme constants
    cs.append(one("requantize", {"x": T(I32, (1, 4, 6))}, {"mult": _mult((6,), 3), "shift": _rand((6,), 1, 62, 4)},
                  bits=8, tag="pc"))
    cs.append(one("requantize", {"x": T(I32, (1, 4, 6))},
                  {"mult": torch.tensor([2**31 - 1], dtype=I32), "shift": torch.tensor([1], dtype=I32)}, bits=32,
                  tag="max32"))
    cs.append(one("requantize", {"x": T(I32, (1, 4, 6))},
                  {"mult": torch.tensor(-(2**31) + 1, dtype=I32), "shift": torch.tensor(62, dtype=I32)}, bits=16,
                  tag="min-mult"))
    cs.append(one("requantize", {"x": T(I16, (1, 3, 5))}, {"mult": _mult((5,), 5), "shift": _rand((5,), 20, 40, 6)},
                  bits=16, tag="i16"))
    cs.append(one("requantize", {"x": T(I8, (1, 3, 5))}, {"mult": torch.tensor([77], dtype=I32),
                                                           "shift": torch.tensor([3], dtype=I32)}, bits=8,
                  tag="i8-32bit"))
    # add_requantize (each branch within 2**30 by validation)
    cs.append(one("add_requantize", {"a": T(I16, (1, 4, 6)), "b": T(I32, (1, 4, 6))},
                  {"mult_a": torch.tensor([2**31 - 1], dtype=I32), "shift_a": torch.tensor([18], dtype=I32),
                   "mult_b": _mult((6,), 7), "shift_b": _rand((6,), 33, 40, 8)}, bits=16))
    cs.append(one("add_requantize", {"a": T(I8, (1, 2, 3)), "b": T(I8, (1, 2, 3))},
                  {"mult_a": _mult((3,), 9), "shift_a": _rand((3,), 28, 31, 10),
                   "mult_b": torch.tensor([-(2**31) + 1], dtype=I32), "shift_b": torch.tensor([30], dtype=I32)},
                  bits=8, tag="i8", batch=2))
    # add_const
    cs.append(one("add_const", {"x": T(I32, (1, 4, 6), lo=-(2**30), hi=2**30)},
                  {"const": _rand((4, 6), -(2**30), 2**30, 11)}))
    cs.append(one("add_const", {"x": T(I8, (1, 3, 2, 5))}, {"const": _rand((5,), -(2**31) + 200, 2**31 - 200, 12)},
                  tag="i8", batch=2))
    # embed
    cs.append(one("embed", {"x": T(I32, (1, 4, 8))},
                  {"mult": _mult((8,), 13), "shift": _rand((8,), 31, 45, 14), "pos": _rand((4, 8), -3000, 3000, 15),
                   "prefix": _rand((1, 8), -40000, 40000, 16)}, bits=16))
    cs.append(one("embed", {"x": T(I32, (1, 3, 4))},
                  {"mult": torch.tensor([2**31 - 1], dtype=I32), "shift": torch.tensor([1], dtype=I32),
                   "pos": _rand((3, 4), -(2**31) + 1, 2**31 - 1, 17)}, bits=8, tag="noprefix-64bit", batch=2))
    cs.append(one("embed", {"x": T(I32, (1, 2, 4))},
                  {"mult": _mult((4,), 18), "shift": _rand((4,), 30, 34, 19), "pos": _rand((2, 4), -99, 99, 20),
                   "prefix": _rand((3, 4), -200, 200, 21)}, bits=8, tag="prefix3"))
    # layernorm (64-bit, legacy) and layernorm32
    for op in ("layernorm", "layernorm32"):
        for dt, ch, tag in ((I16, 12, "i16"), (I8, 7, "i8"), (I16, 1, "c1"), (I16, 300, "c300")):
            mult = _mult((ch,), 22, lo=1, hi=2**28) if op == "layernorm" else _rand((ch,), -(2**20), 2**20, 22)
            shift = _rand((ch,), 20, 30, 23) if op == "layernorm" else _rand((ch,), 12, 20, 23)
            cs.append(one(op, {"x": T(dt, (1, 5, ch))}, {"mult": mult, "shift": shift,
                                                         "offset": _rand((ch,), -300, 300, 24)}, bits=8, tag=tag))
        cs.append(one(op, {"x": T(I16, (1, 3, 8))},
                      {"mult": torch.tensor([1 << 12], dtype=I32), "shift": torch.tensor([20], dtype=I32),
                       "offset": torch.tensor([5], dtype=I32)}, bits=16, tag="per-tensor-16", batch=2))
    # shiftmax (legacy 64-bit): masks, k_out 8 / 16, int16 / int32 scores
    mask = torch.rand(3, 6, 6, generator=_g(25)) < 0.4
    mask[1, 2] = True  # a fully masked row
    cs.append(one("shiftmax", {"x": T(I16, (1, 2, 5, 7))}, x0=-300, n=15, k_out=8))
    cs.append(one("shiftmax", {"x": T(I32, (3, 2, 6, 6))}, {"mask": mask}, x0=-(2**20), n=20, k_out=16, tag="mask",
                  batch=2))
    cs.append(one("shiftmax", {"x": T(I32, (1, 4, 9))}, x0=-1, n=0, k_out=8, tag="x0=-1"))
    cs.append(one("shiftmax", {"x": T(I16, (1, 3, 5))}, x0=-(2**40), n=19, k_out=8, tag="x0big"))
    # shiftmax_rel: |scores| < 2**24, x0 in [-2**27, -1]
    for dt, x0, tag in ((I8, -20, "i8"), (I16, -1, "x0=-1"), (I32, -(2**27), "x0min"), (I32, -9000, "i32")):
        lim = min(2**24 - 1, ops.qmax(torch.iinfo(dt).bits))
        cs.append(one("shiftmax_rel", {"x": T(dt, (1, 3, 2, 6), lo=-lim, hi=lim)}, x0=x0, tag=tag))
    cs.append(one("shiftmax_rel", {"x": T(I16, (3, 2, 6, 6))}, {"mask": mask}, x0=-700, tag="mask", batch=2))
    # attn_normalize (its acc must be matmul(p, v) of the same p): a two-node graph
    for tag, batch in (("", 1), ("b2", 2)):
        cs.append(OpCase(f"attn_normalize{'-' + tag if tag else ''}",
                         [Node("matmul", ("p", "v"), "acc", {}, {"transpose_b": 0}),
                          Node("attn_normalize", ("acc", "p"), "y", {}, {})],
                         {}, {"p": T(U8, (1, 2, 6, 6)), "v": T(I8, (1, 2, 6, 5))}, batch))
    # shiftgelu (64-bit)
    cs.append(one("shiftgelu", {"x": T(I8, (1, 4, 64))}, x0=-40, n=ops.choose_shiftgelu_n(-40), k_out=16))
    cs.append(one("shiftgelu", {"x": T(I8, (1, 2, 8))}, x0=-1, n=23, k_out=8, tag="x0=-1"))
    cs.append(one("shiftgelu", {"x": T(I8, (1, 2, 8))}, x0=-(2**44), n=1, k_out=16, tag="x0big"))
    # data movement
    x4 = T(I16, (1, 3, 4, 5))
    cs.append(one("slice", {"x": x4}, dim=2, start=1, end=3))
    cs.append(one("slice", {"x": T(I32, (1, 6, 5))}, dim=-1, start=0, end=2, tag="last"))
    cs.append(one("slice", {"x": T(I8, (1, 6, 5))}, dim=1, start=2, end=5, tag="view"))
    cs.append(one("slice", {"x": T(U8, (2, 6, 5), batch_axis=None)}, dim=0, start=1, end=2, tag="nobatch"))
    cs.append(one("select", {"x": T(I8, (1, 5, 4))}, dim=1, index=0, tag="view"))
    cs.append(one("select", {"x": T(I32, (1, 5, 4))}, dim=2, index=-1, batch=2, tag="last"))
    cs.append(one("permute", {"x": x4}, perm=[0, 2, 3, 1]))
    cs.append(one("permute", {"x": T(I8, (1, 3, 1, 5))}, perm=[0, 2, 1, 3], tag="view"))
    cs.append(one("permute", {"x": T(I32, (1, 2, 3, 4, 2))}, perm=[0, 3, 1, 4, 2], batch=2, tag="5d"))
    cs.append(one("roll", {"x": T(I16, (1, 4, 5, 3))}, shifts=[-1, 2], dims=[1, 2]))
    cs.append(one("roll", {"x": T(I8, (1, 4, 6))}, shifts=[13], dims=[-1], batch=2, tag="wrap"))
    cs.append(one("roll", {"x": T(I8, (1, 4, 6))}, shifts=[4], dims=[1], tag="full"))
    cs.append(one("pad", {"x": T(I16, (1, 3, 4, 5))}, pads=[0, 0, 1, 2, 0, 1]))
    cs.append(one("pad", {"x": T(I8, (1, 2, 3))}, pads=[2, 1], batch=2, tag="last"))
    cs.append(one("pad", {"x": T(I32, (1, 2, 3))}, pads=[0, 0], tag="none"))
    cs.append(one("reshape", {"x": T(I16, (1, 3, 4))}, shape=[0, 2, -1]))
    cs.append(OpCase("reshape-chain", [Node("reshape", ("x",), "r", {}, {"shape": [0, 12]}),
                                       Node("permute", ("r",), "y", {}, {"perm": [1, 0]})],
                     {}, {"x": T(I8, (1, 3, 4))}, 1))
    # mean
    cs.append(one("mean", {"x": T(I16, (1, 5, 6))}, dim=1))
    cs.append(one("mean", {"x": T(I32, (1, 3, 7))}, dim=-1, batch=2, tag="i32-64bit"))
    cs.append(one("mean", {"x": T(I8, (1, 2, 3, 4))}, dim=2, tag="i8"))
    # attention (fused): both probability modes, bias, window masks, batch of 2 images
    q = T(I8, (1, 2, 6, 4))
    sm, ss = torch.tensor([1518500250], dtype=I32), torch.tensor([37], dtype=I32)
    bias = _rand((2, 6, 6), -3000, 3000, 26)
    wm = torch.rand(2, 6, 6, generator=_g(27)) < 0.3
    wm[0, 3] = True
    for probs, bits, extra in ((1, 8, {}), (0, 16, {"n": 15})):
        x0 = -40 if probs else -300
        cs.append(one("attention", {"q": q, "k": q, "v": q}, {"score_mult": sm, "score_shift": ss}, score_bits=bits,
                      probs=probs, x0=x0, tag=f"p{probs}", **extra))
        cs.append(one("attention", {"q": T(I8, (2, 2, 6, 4)), "k": T(I8, (2, 2, 6, 4)), "v": T(I8, (2, 2, 6, 4))},
                      {"score_mult": sm, "score_shift": ss, "bias": bias, "mask": wm}, score_bits=bits, probs=probs,
                      x0=x0, batch=2, tag=f"p{probs}-bias-mask", **extra))
    cs.append(one("attention", {"q": q, "k": q, "v": q},
                  {"score_mult": torch.tensor([2**31 - 1], dtype=I32), "score_shift": torch.tensor([1], dtype=I32)},
                  score_bits=24, probs=1, x0=-(2**27), tag="p1-extreme"))
    for probs in (0, 1):  # fewer than four keys / odd head sizes: the remainder loops
        q3 = T(I8, (1, 3, 3, 5))
        cs.append(one("attention", {"q": q3, "k": q3, "v": q3}, {"score_mult": sm, "score_shift": ss},
                      score_bits=16, probs=probs, x0=-50, tag=f"p{probs}-n3-d5", **({} if probs else {"n": 12})))
    q9 = T(I8, (1, 1, 9, 8))
    cs.append(one("attention", {"q": q9, "k": q9, "v": q9}, {"score_mult": sm, "score_shift": ss}, score_bits=12,
                  probs=1, x0=-77, tag="p1-n9-d8"))
    # requantize_table
    cs.append(one("requantize_table", {"x": T(I32, (1, 4, 6))},
                  {"mult": _mult((6,), 28), "shift": _rand((6,), 30, 40, 29),
                   "table": _rand((256,), -128, 127, 30, I8)}))
    cs.append(one("requantize_table", {"x": T(I16, (1, 3, 5))},
                  {"mult": torch.tensor([2**30], dtype=I32), "shift": torch.tensor([20], dtype=I32),
                   "table": torch.arange(-128, 128, dtype=torch.int64).to(I8)}, batch=2, tag="i16"))
    return cs


CASES = _cases()


def _infer(case: OpCase) -> dict[str, TType]:
    types = dict(case.inputs)
    producer: dict[str, Node] = {}
    for i, n in enumerate(case.nodes):
        consts = {c: case.consts[k] for c, k in n.consts.items()}
        chk = Check(f"node {i} ({n.op})", [types[v] for v in n.inputs], consts, n.attrs,
                    [producer.get(v) for v in n.inputs], list(n.inputs))
        types[n.output] = OPSET[n.op].infer(chk)
        producer[n.output] = n
    return types


def _reference(case: OpCase, inputs: dict[str, Tensor]) -> Tensor:
    vals = dict(inputs)
    for n in case.nodes:
        kw = {c: case.consts[k] for c, k in n.consts.items()}
        vals[n.output] = OPSET[n.op].reference(*[vals[v] for v in n.inputs], **kw, **n.attrs)
    return vals[case.nodes[-1].output]


def _trials(case: OpCase, types: dict[str, TType], seed: int) -> list[dict[str, Tensor]]:
    """Random values and extremes of every input's interval: all lo, all hi, alternating, lo/0/hi at random."""
    out: list[dict[str, Tensor]] = []
    shapes = {v: t.concrete(case.batch) for v, t in case.inputs.items()}
    for k in range(7):
        trial = {}
        for j, (v, t) in enumerate(case.inputs.items()):
            shape, s = shapes[v], seed * 100 + k * 10 + j
            if k < 2:
                x = _rand(shape, t.lo, t.hi, s)
            elif k == 2:
                x = torch.full(shape, t.lo)
            elif k == 3:
                x = torch.full(shape, t.hi)
            elif k == 4:
                x = torch.where(torch.arange(int(np.prod(shape))).reshape(shape) % 2 == 0, t.lo, t.hi)
            elif k == 5:
                pick = _rand(shape, 0, 2, s)
                x = torch.where(pick == 0, t.lo, torch.where(pick == 1, t.hi, min(max(0, t.lo), t.hi)))
            else:  # sparse: mostly lo with a few hi (one dominant score, outlier tokens)
                x = torch.where(_rand(shape, 0, 9, s) == 0, t.hi, t.lo)
            trial[v] = x.to(t.dtype)
        out.append(trial)
    return out + case.extra


@dataclass
class Built:
    case: OpCase
    types: dict[str, TType]
    module: c99.CModule
    trials: list[dict[str, Tensor]]
    want: list[Tensor]


def _harness_c(built: list[Built], guard: int = 64) -> str:
    protos, body = [], []
    amax = max(b.module.arena_bytes for b in built)
    imax = max(sum(-(-op.nbytes // 8) * 8 for op in b.module.inputs) for b in built)
    omax = max(b.module.output.nbytes for b in built)
    for ci, b in enumerate(built):
        m = b.module
        params = [f"const {op.ctype} *" for op in m.inputs]
        protos.append(f"int {m.entry}({', '.join(params)}, {m.output.ctype} *, void *);")
        offs, o = [], 0
        for op in m.inputs:
            offs.append(o)
            o += -(-op.nbytes // 8) * 8
        reads = " || ".join(f"!rd(ib + {off}, {op.nbytes})" for off, op in zip(offs, m.inputs, strict=True))
        args = ", ".join(f"(const {op.ctype} *)(ib + {off})" for off, op in zip(offs, m.inputs, strict=True))
        body.append(f"""    /* case {ci}: {b.case.id} */
    for (t = 0; t < {len(b.trials)}; t++) {{
        if ({reads}) return 3;
        memset(ab + {m.arena_bytes}, 0xA5, {guard});
        if ({m.entry}({args}, ({m.output.ctype} *)ob, arena) != 0) return 4;
        for (g = 0; g < {guard}; g++) if (ab[{m.arena_bytes} + g] != 0xA5) return 5;
        if (fwrite(ob, 1, {m.output.nbytes}, stdout) != {m.output.nbytes}) return 6;
    }}""")
    return "\n".join([
        "#include <stdint.h>", "#include <stdio.h>", "#include <string.h>", "", *protos, "",
        f"static uint64_t arena[{amax // 8 + guard // 8 + 1}];", f"static uint64_t inb[{imax // 8 + 1}];",
        f"static uint64_t outb[{omax // 8 + 1}];",
        "static int rd(unsigned char *p, size_t n) { return fread(p, 1, n, stdin) == n; }", "",
        "int main(void) {", "    unsigned char *ib = (unsigned char *)inb, *ab = (unsigned char *)arena;",
        "    void *ob = outb;", "    int t, g;", *body, "    return 0;", "}", ""])


@pytest.fixture(scope="module")
def op_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Built], Path]:
    root = tmp_path_factory.mktemp("c99_ops")
    built = []
    for ci, case in enumerate(CASES):
        types = _infer(case)
        target = c99.MCU.with_prefix(f"t{ci}_")
        ins = list(case.inputs)
        mod = lower_graph(case.nodes, case.consts, types, ins, case.nodes[-1].output, batch=case.batch, target=target,
                          input_params=[f"in_{v}" for v in ins], output_param="result")
        d = root / f"case{ci}"
        d.mkdir()
        for name, text in mod.files.items():
            (d / name).write_text(text)
        trials = _trials(case, types, ci)
        built.append(Built(case, types, mod, trials, [_reference(case, t) for t in trials]))
    (root / "harness.c").write_text(_harness_c(built))
    return built, root


_NP = {"uint8_t": np.uint8, "int8_t": np.int8, "int16_t": np.int16, "int32_t": np.int32}


def _run_ops(built: list[Built], root: Path, flags: list[str], tag: str) -> list[tuple[str, int, str]]:
    assert CC is not None
    objs = []
    for ci in range(len(built)):
        d = root / f"case{ci}"
        hdr = sorted(d.glob("*.h"))
        objs += [compile_c(CC, d / "model.c", flags, hdr), compile_c(CC, d / "model_weights.c", flags, hdr)]
    objs.append(compile_c(CC, root / "harness.c", flags))
    exe = link(CC, objs, root / f"harness_{tag}", [f for f in flags if f.startswith("-fsanitize")])
    stdin = b"".join(t[v].contiguous().numpy().tobytes() for b in built for t in b.trials for v in b.case.inputs)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([str(exe)], input=stdin, capture_output=True, timeout=300, env=env)
    assert r.returncode == 0, f"{tag} harness failed ({r.returncode}): {r.stderr.decode()[-2000:]}"
    data, pos, bad = r.stdout, 0, []
    for b in built:
        for k, want in enumerate(b.want):
            n = b.module.output.nbytes
            np_dt = _NP[b.module.output.ctype]
            got = torch.from_numpy(np.frombuffer(data[pos:pos + n], dtype=np_dt).copy()).reshape(want.shape)
            pos += n
            if not torch.equal(got, want):
                bad.append((b.case.id, k, f"{int((got != want).sum())} of {want.numel()} differ"))
    assert pos == len(data)
    return bad


@needs_cc
def test_every_op_has_a_lowering_and_a_case() -> None:
    assert set(c99.LOWERINGS) == set(OPSET)
    assert {n.op for c in CASES for n in c.nodes} == set(OPSET)
    ex = ivit.export.get_exporter("c")
    assert set(ex.lowerings()) == set(OPSET) and not ex.unsupported()


@needs_cc
def test_ops_bitexact_vs_reference(op_builds: tuple[list[Built], Path]) -> None:
    """Each lowering, compiled with the strict flags, on random and extreme inputs, equals the reference."""
    built, root = op_builds
    bad = _run_ops(built, root, list(HOST_FLAGS), "strict")
    assert not bad, bad
    modes = {int(n.attrs["probs"]) for b in built for n in b.case.nodes if n.op == "attention"}
    assert modes == {0, 1}
    assert sum(len(b.trials) for b in built) >= 7 * len(CASES)


@needs_cc
def test_ops_clean_under_sanitizers(op_builds: tuple[list[Built], Path]) -> None:
    """The same lowerings under ASan + UBSan: no signed overflow, no bad shift, no out-of-bounds access."""
    built, root = op_builds
    probe = root / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    flags = ["-std=c99", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    try:
        link(CC, [compile_c(CC, probe, flags)], root / "probe", flags[-2:])  # type: ignore[arg-type]
    except IvitError:
        pytest.skip("this compiler has no ASan/UBSan runtime")
    bad = _run_ops(built, root, flags, "sanitize")
    assert not bad, bad


def test_views_move_nothing() -> None:
    """Reshapes, contiguous slices/selects and permutes of size-1 axes are views: no kernel, no copy."""
    by_id = {c.id: c for c in CASES}
    for cid in ("slice-view", "select-view", "permute-view", "reshape", "pad-none", "roll-full"):
        c = by_id[cid]
        mod = lower_graph(c.nodes, c.consts, _infer(c), list(c.inputs), "y", batch=c.batch)
        assert mod.views == 1 and mod.kernels == 0, cid


# ---------------------------------------------------------------------------------------------
# The arena plan
# ---------------------------------------------------------------------------------------------

def test_arena_plan_never_overlaps_live_buffers() -> None:
    g = _g(0)
    for trial in range(50):
        n = int(torch.randint(1, 30, (1,), generator=g))
        bufs = []
        for i in range(n):
            first = int(torch.randint(0, 20, (1,), generator=g))
            bufs.append(_Buf(f"b{i}", int(torch.randint(1, 500, (1,), generator=g)), first,
                             first + int(torch.randint(0, 6, (1,), generator=g))))
        arena, peak = plan_arena(bufs)
        assert arena >= peak
        for a in bufs:
            assert a.offset % 8 == 0 and a.offset + a.nbytes <= arena
            for b in bufs:
                if a is not b and a.first <= b.last and b.first <= a.last:
                    assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset, trial


# ---------------------------------------------------------------------------------------------
# Compile flags: the check can fail
# ---------------------------------------------------------------------------------------------

@needs_cc
def test_general_regs_only_rejects_float(tmp_path: Path) -> None:
    if "-mgeneral-regs-only" not in HOST_FLAGS:
        pytest.skip("-mgeneral-regs-only exists on x86-64 and AArch64 only")
    src = tmp_path / "f.c"
    src.write_text("float twice(float x) { return 2.0f * x; }\n")
    with pytest.raises(IvitError, match="cc failed"):
        compile_c(CC, src, HOST_FLAGS, cache=tmp_path)  # type: ignore[arg-type]
    src.write_text("#include <stdint.h>\nint32_t twice(int32_t x) { return 2 * x; }\n")
    compile_c(CC, src, HOST_FLAGS, cache=tmp_path)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Whole models on the host
# ---------------------------------------------------------------------------------------------

_PROGRAMS: dict[str, Program] = {}


def program(key: str) -> Program:
    if key not in _PROGRAMS:
        if key.endswith(".ivit"):
            p = ivit.load_program(Path(__file__).parent.parent / "fixtures" / key)
        else:
            name, _, probs = key.partition(":")
            cfg = ivit.QuantConfig(probs=ivit.Probs(probs)) if probs else None
            p = ivit.freeze(make_qmodel(name, config=cfg))
        _PROGRAMS[key] = p
    return _PROGRAMS[key]


MODELS = ["vit_test", "swin_test", "swin_test:shiftmax8", "vit_digits", "swin_digits", "vit_test_v1.ivit",
          "swin_test_v1.ivit"]


@needs_cc
@pytest.mark.parametrize("key", MODELS)
def test_model_bitexact_on_host(key: str, tmp_path: Path) -> None:
    prog = program(key)
    res = c99.export(prog, tmp_path / "out")
    v = c99.verify(prog, tmp_path / "out", images=6, seed=1)
    assert v.bitexact, v.detail
    assert v.images == 6 + 1 + 1 + 2
    assert "-mgeneral-regs-only" in v.runtime or "-mgeneral-regs-only" not in HOST_FLAGS
    info = json.loads((tmp_path / "out" / c99.MANIFEST).read_text())
    assert info["arena_bytes"] == res.info["arena_bytes"] >= info["peak_live_bytes"]
    assert info["arena_bytes"] <= 1.25 * info["peak_live_bytes"] + 64
    legacy = key.endswith("_v1.ivit")
    assert ("layernorm" in info["ops"]) == legacy and ("layernorm32" in info["ops"]) != legacy
    probs = {int(n.attrs["probs"]) for n in apply_passes(prog, c99.DEFAULT_PASSES).nodes if n.op == "attention"}
    assert probs == ({0} if legacy or key.endswith("shiftmax8") else {1})


def test_generated_code_is_integer_only_c99(tmp_path: Path) -> None:
    files = c99.generate(program("swin_test_v1.ivit"))
    assert set(files) == {"model.h", "model.c", "model_weights.h", "model_weights.c"}
    import re

    for name, text in files.items():
        code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        assert not re.search(r"\b(float|double|malloc|calloc|free|printf|stdio)\b", code), name
        incs = set(re.findall(r"#include\s+[<\"]([^>\"]+)[>\"]", code))
        assert incs <= {"stdint.h", "stddef.h", "string.h", "model.h", "model_weights.h"}, incs
    c = files["model.c"]
    assert "int ivit_run(const uint8_t *pixels, int32_t *logits, void *arena)" in c
    for macro in ("IVIT_IN_CHANNELS 3", "IVIT_IN_HEIGHT 32", "IVIT_IN_WIDTH 32", "IVIT_NUM_CLASSES 10",
                  "IVIT_ARENA_BYTES", "IVIT_CONST_BYTES", "IVIT_BATCH 1"):
        assert f"#define {macro}" in files["model.h"]
    assert "const int8_t ivit_k0[" in files["model_weights.c"]
    # the legacy 64-bit ops use int64 where their specification needs it; layernorm32 stays 32-bit inside
    assert "ivit_isqrt64" in c and "ivit_shiftmax_row" in c
    c32 = c99.generate(program("vit_test"))["model.c"]
    assert "ivit_isqrt64" not in c32 and "ivit_isqrt32" in c32 and "ivit_shiftmax_row" not in c32


@needs_cc
def test_names_and_metadata_from_the_file_stay_comments(tmp_path: Path) -> None:
    """Value and constant names and ``meta.model`` are free-form strings of the file: C in them stays inert."""
    import re

    prog = program("swin_test")
    bad = ivit.load_program(hostile(prog).save(tmp_path / "hostile.ivit"))
    files = c99.generate(bad)
    for name, text in files.items():
        assert "ivit_pwned" not in re.sub(r"/\*.*?\*/", "", text, flags=re.S), name
    c99.export(bad, tmp_path / "out")
    v = c99.verify(bad, tmp_path / "out", images=2)  # compiles under -Wall -Wextra -Werror -pedantic
    assert v.bitexact, v.detail


@needs_cc
def test_batch_of_two_per_call(tmp_path: Path) -> None:
    prog = program("swin_test")
    c99.export(prog, tmp_path / "b2", batch=2)
    assert "#define IVIT_BATCH 2" in (tmp_path / "b2" / "model.h").read_text()
    v = c99.verify(prog, tmp_path / "b2", images=3)
    assert v.bitexact, v.detail


@needs_cc
def test_another_flavour_plugs_in(tmp_path: Path) -> None:
    """A threaded runtime flavour: 64-bit loop counters, an OpenMP pragma on row loops, an overriding
    ``linear`` lowering; the same integers."""
    from ivit.codegen.c.lowerings import LOWERINGS, Kernel
    from ivit.export.c99.host import build_host_harness, run_host_harness

    seen: list[int] = []

    def linear(n: NodeCtx) -> Kernel:
        k = LOWERINGS["linear"](n)
        seen.append(n.index)
        assert isinstance(k, Kernel)
        return Kernel(k.body, "[omp flavour] " + k.formula)

    omp = c99.Target(name="omp", index_type="int64_t", outer_pragma="#pragma omp parallel for",
                     overrides={"linear": linear})
    prog = program("swin_test")
    mod = c99.lower_program(prog, target=omp)
    c = mod.files["model.c"]
    assert "#pragma omp parallel for" in c and "for (int64_t r = 0;" in c and "[omp flavour]" in c
    assert len(seen) == mod.ops["linear"]
    for name, text in mod.files.items():
        (tmp_path / name).write_text(text)
    try:
        exe = build_host_harness(tmp_path, tmp_path / "w", flags=[*HOST_FLAGS, "-fopenmp"], link_flags=["-fopenmp"])
    except IvitError as e:
        pytest.skip(f"no OpenMP here: {e}")
    x = c99.check_images(prog, 3)["random"]
    got = run_host_harness(exe, x, tmp_path / "w")
    assert torch.equal(got, ivit.Engine(prog, backend="reference")(x))


# ---------------------------------------------------------------------------------------------
# Cortex-M3 (ARM tools; CI installs them)
# ---------------------------------------------------------------------------------------------

@needs_arm
def test_arm_build_has_no_soft_float(tmp_path: Path) -> None:
    c99.export(program("swin_test_v1.ivit"), tmp_path / "legacy")  # 64-bit legacy ops: integer helpers only
    c99.export(program("vit_digits"), tmp_path / "vit")
    for d in ("legacy", "vit"):
        objs = cortexm.compile_model(tmp_path / d)
        assert cortexm.soft_float_symbols(objs) == [], d
        undef = cortexm.undefined_symbols(objs)
        assert all(s.startswith(("ivit_k", "mem", "__aeabi_l", "__aeabi_ul", "__aeabi_i", "__aeabi_ui"))
                   for s in undef), undef
    # control: the same check sees a float function
    f = tmp_path / "f.c"
    f.write_text("float scale(float x, int k) { return x * (float)k; }\n")
    obj = compile_c(shutil.which("arm-none-eabi-gcc"), f, [*cortexm.ARM_FLAGS, "-O2"], cache=tmp_path)  # type: ignore[arg-type]
    assert any(s.startswith("__aeabi_f") for s in cortexm.soft_float_symbols([obj]))


@needs_arm
@pytest.mark.parametrize("key", ["vit_digits", "swin_digits"])
def test_cortex_m3_qemu_bitexact(key: str, tmp_path: Path) -> None:
    prog = program(key)
    c99.export(prog, tmp_path / "out")
    sets = c99.check_images(prog, 3, seed=2)
    x = torch.cat(list(sets.values()))
    run = cortexm.run_images(tmp_path / "out", x, tmp_path / "arm", timeout=300)
    want = ivit.Engine(prog, backend="reference")(x)
    assert torch.equal(run.logits, want)
    assert abs(run.calibrated_insns_per_tick - cortexm.INSNS_PER_TICK) < 0.5
    assert all(t > 0 for t in run.ticks)


# ---------------------------------------------------------------------------------------------
# Bad inputs, limits, atomic output
# ---------------------------------------------------------------------------------------------

def test_corrupt_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(__file__).parent.parent / "fixtures" / "vit_test_v1.ivit"
    bad = tmp_path / "bad.ivit"
    data = bytearray(src.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ProgramError) as e:
        ivit.load_program(bad)
    assert "\n" not in str(e.value) and "checksum" in str(e.value)
    run_cli_export = getattr(ivit.export, "run_cli_export", None)
    if run_cli_export is None:
        pytest.skip("ivit.export.run_cli_export (the CLI helper) is not there yet")
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli_export(bad, "c", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checksum" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.ivit"]
    # a size limit through the same helper: refused with the numbers, nothing written
    assert run_cli_export(src, "c", out, max_ram=1024) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-ram 1024" in err and "arena needs" in err and not out.exists()
    assert run_cli_export(src, "c", out, max_flash="1M", verify=True) == 0
    assert (out / "model.c").is_file() and "bit-exact" in capsys.readouterr().out


def test_max_ram_and_max_flash_refusals(tmp_path: Path) -> None:
    prog = program("vit_test")
    mod = c99.lower_program(prog)
    with pytest.raises(IvitError, match=rf"arena needs {mod.arena_bytes} bytes.*--max-ram 4096"):
        c99.export(prog, tmp_path / "a", max_ram=4096)
    with pytest.raises(IvitError, match=rf"constants take {mod.const_bytes} bytes.*--max-flash 10240"):
        c99.export(prog, tmp_path / "b", max_flash="10K")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.iterdir())
    res = c99.export(prog, tmp_path / "c", max_ram=mod.arena_bytes, max_flash=mod.const_bytes)
    assert res.info["arena_bytes"] == mod.arena_bytes
    assert c99.parse_size("1.5M") == 1536 << 10 and c99.parse_size("64KiB") == 65536
    with pytest.raises(IvitError):
        c99.parse_size("lots")


def test_no_partial_directory_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prog = program("vit_test")
    from ivit.export.c99 import host

    def boom(files: object, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.c").write_text("/* half */")
        raise OSError("disk full")

    monkeypatch.setattr(c99, "write_files", boom)
    with pytest.raises(OSError):
        c99.export(prog, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(c99, "write_files", host.write_files)
    # an existing export is replaced whole; a foreign non-empty directory is refused
    c99.export(prog, tmp_path / "out")
    c99.export(prog, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(IvitError, match="not empty"):
        c99.export(prog, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@needs_cc
def test_verify_refuses_another_program(tmp_path: Path) -> None:
    c99.export(program("vit_test"), tmp_path / "out")
    with pytest.raises(IvitError, match="different program"):
        c99.verify(program("vit_test_v1.ivit"), tmp_path / "out")


def test_dispatch_through_the_export_registry(tmp_path: Path) -> None:
    prog = program("vit_test")
    res = ivit.export.export(prog, "c", tmp_path / "out")
    assert (tmp_path / "out" / "model.c").is_file() and res.info["model"] == "vit_test"
    assert "c" in ivit.export.exporter_names()

