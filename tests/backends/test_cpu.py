"""The ``cpu`` backend: every kernel equals the op set's reference (``OPSET[op].reference``) exactly.

Each kernel is built the way the engine builds it, through the backend's kernel factory for one program node
(its constants, attributes and validated static types), and compared with ``torch.equal`` on random and
extreme values (all -128 / 127 / -127, uint8 255, int16 +-32767, int32 at the validated limits), at realistic
sizes (197 tokens, rows of 64 / 768 / 3072), with 1 and 2 threads.  A spy on the native module's reference
fallback proves the C kernel ran (not the reference compared with itself).  Then every node of real frozen ViT
and Swin programs (both ``probs`` modes, both LayerNorm impls) is checked on the reference run's actual
intermediate values, and the whole backend is checked without a C compiler (``IVIT_NO_CKERNELS=1`` and a
failing ``CC``, in subprocesses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

import ivit
from conftest import make_qmodel, random_pixels
from ivit import native, ops
from ivit.backends import get_backend
from ivit.ir import OPSET, Node, TType
from ivit.ir.interpret import plan, run
from ivit.ir.opset import PROBS_REL8, PROBS_SHIFTMAX8, Check
from ivit.native import kernels as native_kernels

CPU = get_backend("cpu")
TESTS = Path(__file__).resolve().parents[1]
needs_c = pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernels")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    """Uniform integers in ``[lo, hi]``."""
    return torch.randint(lo, hi + 1, shape, generator=_g(seed), dtype=torch.int64).to(dtype)


def _extreme(lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    """A third ``lo``, a third ``hi``, a third uniform in between."""
    g = _g(seed)
    pick = torch.randint(0, 3, shape, generator=g)
    rnd = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64)
    return torch.where(pick == 0, lo, torch.where(pick == 1, hi, rnd)).to(dtype)


def _dyadic(n: int, seed: int, lo: float = -20.0, hi: float = 3.0, signed: bool = False) -> tuple[Tensor, Tensor]:
    """int32 multipliers/shifts as ``dyadic`` makes them, for ratios ``exp(U(lo, hi))``."""
    g = _g(seed)
    ratio = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=g))
    if signed:
        ratio = ratio * torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0).to(torch.float64)
    m, s = ops.dyadic(ratio)
    return m.to(torch.int32), s.to(torch.int32)


def ttype(x: Tensor, per_image: int = 1) -> TType:
    """Static type of a batched value ``x``: batch axis 0 holding ``per_image`` rows per image, and its range."""
    assert x.shape[0] % per_image == 0
    lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
    return TType.of(x.dtype, (per_image, *x.shape[1:]), 0, lo, hi)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ops for which ``ivit.native.kernels`` fell back to the reference during the test."""
    seen: list[str] = []
    real = native_kernels._ref

    def spy(op: str):  # noqa: ANN202
        seen.append(op)
        return real(op)

    monkeypatch.setattr(native_kernels, "_ref", spy)
    return seen


def check_cpu(op: str, inputs: Sequence[Tensor], consts: Mapping[str, Tensor], attrs: Mapping[str, object],
              types: Sequence[TType] | None = None, producers: Sequence[Node | None] | None = None,
              names: Sequence[str] | None = None) -> Tensor:
    """Build ``op``'s cpu kernel from its factory for one node (static types inferred by the op set, as the
    engine does) and require its output to equal the reference exactly.  Returns the output."""
    spec = OPSET[op]
    names = list(names or [f"in{i}" for i in range(len(inputs))])
    types = list(types or [ttype(x) for x in inputs])
    chk = Check(f"test node ({op})", types, consts, dict(attrs), list(producers or [None] * len(inputs)), names)
    out_t = spec.infer(chk)
    node = Node(op, tuple(names), "out", {k: k for k in consts}, dict(attrs))
    fn = CPU.kernels()[op](node, dict(consts), types, out_t)
    want = spec.reference(*inputs, **consts, **attrs)
    got = fn(*inputs)
    assert got.dtype == want.dtype == out_t.dtype and got.shape == want.shape
    assert torch.equal(got, want), op
    assert out_t.lo <= int(got.min()) and int(got.max()) <= out_t.hi  # the inferred interval holds
    return got


def no_fallback(fallbacks: list[str]) -> None:
    if native.available():
        assert fallbacks == [], f"the C kernel was not used: {fallbacks}"


# ---------------------------------------------------------------------------------------------
# GEMMs (ivit.native.gemm through the cpu factories)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 197, 768), (3, 17, 96), (2, 5, 3, 8)])
def test_linear(threads: int, shape: tuple[int, ...]) -> None:
    x = _extreme(-128, 127, shape, torch.int8, 0)
    w = _extreme(-127, 127, (48, shape[-1]), torch.int8, 1)
    b = _randint(-(2**30), 2**30, (48,), torch.int32, 2)
    check_cpu("linear", [x], {"weight": w, "bias": b}, {})
    check_cpu("linear", [x], {"weight": w}, {})


def test_linear_extremes_3072(threads: int) -> None:
    x = torch.full((2, 197, 3072), -128, dtype=torch.int8)
    w = torch.full((16, 3072), -127, dtype=torch.int8)
    w[1::2] = 127
    b = torch.full((16,), 2**30, dtype=torch.int32)
    out = check_cpu("linear", [x], {"weight": w, "bias": b}, {})
    assert int(out[0, 0, 0]) == 3072 * 128 * 127 + 2**30


@pytest.mark.parametrize("transpose_b", [0, 1])
@pytest.mark.parametrize("a_dtype", [torch.int8, torch.uint8])
def test_matmul(threads: int, transpose_b: int, a_dtype: torch.dtype) -> None:
    """q k^T (transpose_b) and p v shapes at 197 tokens, int8 or uint8 (probabilities) on the left."""
    lo, hi = (0, 255) if a_dtype == torch.uint8 else (-128, 127)
    a = _extreme(lo, hi, (2, 3, 197, 64 if transpose_b else 197), a_dtype, 3)
    b = _extreme(-128, 127, (2, 3, 197, 64), torch.int8, 4)
    check_cpu("matmul", [a, b], {}, {"transpose_b": transpose_b})
    # non-contiguous operands, as the program's permutes make them
    at = a.transpose(-1, -2).contiguous().transpose(-1, -2)
    check_cpu("matmul", [at, b], {}, {"transpose_b": transpose_b})


def test_matmul_uint8_255_against_minus_128(threads: int) -> None:
    p = torch.full((1, 2, 577, 577), 255, dtype=torch.uint8)
    v = torch.full((1, 2, 577, 64), -128, dtype=torch.int8)
    out = check_cpu("matmul", [p, v], {}, {"transpose_b": 0})
    assert int(out.min()) == -577 * 255 * 128


# ---------------------------------------------------------------------------------------------
# requantize, add_requantize, requantize_table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dtype,bits", [(torch.int32, 8), (torch.int32, 16), (torch.int16, 8), (torch.int16, 16)])
@pytest.mark.parametrize("cols", [64, 768, 3072])
@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize(threads: int, fallbacks: list[str], in_dtype: torch.dtype, bits: int, cols: int,
                    per_channel: bool) -> None:
    info = torch.iinfo(in_dtype)
    x = _extreme(info.min, info.max, (2, 197, cols), in_dtype, 5)
    m, s = _dyadic(cols if per_channel else 1, 6, signed=True)
    if per_channel:  # the extreme constants the op set validates: |mult| = 2**31 - 1, shift 1 and 62
        m[:3], s[:3] = torch.tensor([2**31 - 1, -(2**31) + 1, 2**31 - 1]), torch.tensor([62, 1, 1])
    else:
        m, s = m.reshape(()), s.reshape(())
    check_cpu("requantize", [x], {"mult": m, "shift": s}, {"bits": bits})
    no_fallback(fallbacks)


def test_requantize_reads_a_column_slice_through_its_row_stride(threads: int, fallbacks: list[str]) -> None:
    """The q/k/v split of the qkv accumulator: a last-dim chunk of a wider tensor, no copy."""
    acc = _extreme(-(2**24), 2**24, (2, 197, 3 * 768), torch.int32, 7)
    chunk = acc[..., 768:1536]
    m, s = _dyadic(768, 8)
    check_cpu("requantize", [chunk], {"mult": m, "shift": s}, {"bits": 8})
    no_fallback(fallbacks)


@pytest.mark.parametrize("per_channel_a", [False, True])
@pytest.mark.parametrize("cols", [64, 768])
def test_add_requantize(threads: int, fallbacks: list[str], per_channel_a: bool, cols: int) -> None:
    a = _extreme(-32767, 32767, (2, 197, cols), torch.int16, 9)
    b = _extreme(-(2**31) + 1, 2**31 - 1, (2, 197, cols), torch.int32, 10)
    ma, sa = _dyadic(cols if per_channel_a else 1, 11, lo=-3.0, hi=0.5)
    mb, sb = _dyadic(cols, 12, lo=-25.0, hi=-6.0, signed=True)  # |b * ratio| stays below 2**30 (validated)
    if not per_channel_a:
        ma, sa = ma.reshape(()), sa.reshape(())
    check_cpu("add_requantize", [a, b], {"mult_a": ma, "shift_a": sa, "mult_b": mb, "shift_b": sb}, {"bits": 16})
    no_fallback(fallbacks)


@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize_table(threads: int, fallbacks: list[str], per_channel: bool) -> None:
    x = _extreme(-(2**31) + 1, 2**31 - 1, (2, 197, 3072), torch.int32, 13)
    x[0, 0, :4] = torch.tensor([0, 1, -1, 2**31 - 1], dtype=torch.int32)
    m, s = _dyadic(3072 if per_channel else 1, 14, lo=-22.0, hi=-14.0)  # requantized values span all of int8
    if not per_channel:
        m, s = m.reshape(()), s.reshape(())
    table = _randint(-128, 127, (256,), torch.int8, 15)
    table[0], table[255] = -128, 127
    check_cpu("requantize_table", [x], {"mult": m, "shift": s, "table": table}, {})
    no_fallback(fallbacks)


# ---------------------------------------------------------------------------------------------
# I-LayerNorm (format-1 64-bit and the 32-bit default)
# ---------------------------------------------------------------------------------------------


def _ln_consts(c: int, seed: int) -> dict[str, Tensor]:
    g = torch.empty(c, dtype=torch.float64).uniform_(-2, 2, generator=_g(seed))
    m, s = ops.dyadic(g * c**0.5 / 2**ops.LN_Z_BITS / 0.02)
    m[:2], s[:2] = torch.tensor([2**31 - 1, -(2**31) + 1]), torch.tensor([31, 40])  # extremes (|ratio| <= 1)
    off = _randint(-200, 200, (c,), torch.int32, seed + 1)
    off[0], off[1] = 2**30, -(2**30)  # the largest offsets layernorm32 validates
    return {"mult": m.to(torch.int32), "shift": s.to(torch.int32), "offset": off}


def _ln_input(c: int, seed: int) -> Tensor:
    x = _randint(-32767, 32767, (2, 197, c), torch.int16, seed)
    x[0, 0] = 1234  # constant token: std = 0
    x[0, 1] = 32767
    x[0, 1, 0] = -32767  # one element differs
    x[0, 2] = torch.where(torch.arange(c) % 2 == 0, 32767, -32767).to(torch.int16)  # largest variance
    x[0, 3] = -32768  # the int16 minimum (reachable by the dtype, not by a requantizer)
    x[1, :10] = (x[1, :10] // 64)  # small deviations (no shift in layernorm32)
    x[1, 10:20, :3] = 32767  # three outlier channels
    return x


@pytest.mark.parametrize("op", ["layernorm", "layernorm32"])
@pytest.mark.parametrize("c", [64, 768, 3072])
def test_layernorm(threads: int, fallbacks: list[str], op: str, c: int) -> None:
    check_cpu(op, [_ln_input(c, 16)], _ln_consts(c, 17), {"bits": 8})
    no_fallback(fallbacks)


def test_layernorm32_at_8192_channels(threads: int, fallbacks: list[str]) -> None:
    x = _extreme(-32767, 32767, (1, 4, 8192), torch.int16, 18)
    check_cpu("layernorm32", [x], _ln_consts(8192, 19), {"bits": 8})
    no_fallback(fallbacks)


# ---------------------------------------------------------------------------------------------
# Shiftmax (legacy), Shiftmax-rel, attn_normalize
# ---------------------------------------------------------------------------------------------


def _scores(dtype: torch.dtype, shape: tuple[int, ...], seed: int, limit: int | None = None) -> Tensor:
    hi = limit if limit is not None else torch.iinfo(dtype).max
    x = _extreme(-hi, hi, shape, dtype, seed)
    x[0, 0, 0] = hi  # all equal
    return x


def _window_mask(nw: int, n_tok: int, seed: int) -> Tensor:
    mask = torch.rand(nw, n_tok, n_tok, generator=_g(seed)) < 0.4
    mask[0, 0] = True  # a fully masked row
    mask[-1, -1] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("scale", [2.0, 0.3, 1e-3, 3e-5, 1e-9])
@pytest.mark.parametrize("n_tok", [1, 49, 197])
def test_shiftmax(threads: int, fallbacks: list[str], dtype: torch.dtype, scale: float, n_tok: int) -> None:
    x = _scores(dtype, (2, 3, n_tok, n_tok), 20)
    x0 = ops.shift_exp_x0(scale)
    n = ops.choose_shiftmax_n(x0, n_tok)
    check_cpu("shiftmax", [x], {}, {"x0": x0, "n": n, "k_out": 8})
    no_fallback(fallbacks)


@pytest.mark.parametrize("op", ["shiftmax", "shiftmax_rel"])
def test_softmax_with_window_mask(threads: int, fallbacks: list[str], op: str) -> None:
    """Batch-major windows: scores (B*nW, H, N, N), the (nW, N, N) mask repeating over the batch."""
    b, nw, h, n_tok = 3, 4, 3, 49
    x = _scores(torch.int16, (b * nw, h, n_tok, n_tok), 21)
    mask = _window_mask(nw, n_tok, 22)
    x0 = ops.shift_exp_x0(1e-3)
    attrs = {"x0": x0} if op == "shiftmax_rel" else {"x0": x0, "n": ops.choose_shiftmax_n(x0, n_tok), "k_out": 8}
    out = check_cpu(op, [x], {"mask": mask}, attrs, types=[ttype(x, nw)])
    full = mask.repeat(b, 1, 1).unsqueeze(1).expand(-1, h, -1, -1)
    assert int(out[full].abs().sum()) == 0 and out[0, :, 0].abs().sum() == 0
    no_fallback(fallbacks)


@pytest.mark.parametrize("dtype,limit", [(torch.int16, None), (torch.int32, 2**24 - 1)])
@pytest.mark.parametrize("x0", [-1, -3, -1311, -(2**21), -(2**27)])
@pytest.mark.parametrize("n_tok", [1, 8, 197, 577])
def test_shiftmax_rel(threads: int, fallbacks: list[str], dtype: torch.dtype, limit: int | None, x0: int,
                      n_tok: int) -> None:
    rows = 2 if n_tok == 577 else 6
    x = _scores(dtype, (1, rows, n_tok, n_tok), 23, limit)
    out = check_cpu("shiftmax_rel", [x], {}, {"x0": x0})
    assert bool((out.amax(-1) >= 224).all())  # every row has its maximum (see test_ops for the exact value)
    no_fallback(fallbacks)


@pytest.mark.parametrize("n_tok,d", [(1, 64), (49, 32), (197, 64), (577, 64)])
def test_attn_normalize(threads: int, fallbacks: list[str], n_tok: int, d: int) -> None:
    p = _extreme(0, 255, (2, 3, n_tok, n_tok), torch.uint8, 24)
    p[0, 0, 0] = 0  # fully masked row: P = 0
    p[0, 1] = 255  # all 255
    v = _extreme(-128, 127, (2, 3, n_tok, d), torch.int8, 25)
    v[0, 1] = -128
    acc = ops.int_matmul(p, v)
    matmul = Node("matmul", ("p", "v"), "acc", {}, {"transpose_b": 0})
    check_cpu("attn_normalize", [acc, p], {}, {}, producers=[matmul, None], names=["acc", "p"])
    no_fallback(fallbacks)


# ---------------------------------------------------------------------------------------------
# ShiftGELU (a table of the reference op)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0, 0.05, 1e-3])
def test_shiftgelu(threads: int, fallbacks: list[str], scale: float) -> None:
    x0 = ops.shift_exp_x0(1.702 * scale)
    n = ops.choose_shiftgelu_n(x0)
    native_kernels.gelu_table(x0, n, 16)  # built once from the reference (that call is not a fallback)
    fallbacks.clear()
    x = torch.arange(-128, 128, dtype=torch.int8).repeat(2, 197, 12)  # every int8 value, (2, 197, 3072)
    check_cpu("shiftgelu", [x], {}, {"x0": x0, "n": n, "k_out": 16})
    no_fallback(fallbacks)


# ---------------------------------------------------------------------------------------------
# Fused attention (both probability modes, Swin bias and window mask)
# ---------------------------------------------------------------------------------------------


def _qkv(b: int, h: int, n_tok: int, d: int, seed: int, extreme: str | None = None) -> tuple[Tensor, ...]:
    """q, k, v as the program makes them: non-contiguous (B, H, N, d) views of one (B, N, 3, H, d) tensor."""
    qkv = _extreme(-128, 127, (b, n_tok, 3, h, d), torch.int8, seed)
    if extreme == "max":
        qkv[:, :, :2] = 127
    elif extreme == "min":
        qkv[:, :, :2] = -128
        qkv[:, :, 2] = -128
    elif extreme == "minus127":
        qkv.fill_(-127)
    return tuple(qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))


ATTN_SHAPES = [(1, 2, 17, 16), (3, 3, 49, 32), (2, 6, 197, 64), (1, 1, 5, 4), (1, 2, 577, 64)]


@pytest.mark.parametrize("probs", [PROBS_REL8, PROBS_SHIFTMAX8], ids=["rel8", "shiftmax8"])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("swin", [False, True], ids=["plain", "bias_mask"])
def test_fused_attention(threads: int, fallbacks: list[str], probs: int, shape: tuple[int, ...], swin: bool) -> None:
    """The fused kernel equals matmul -> [add bias] -> requantize -> (shiftmax_rel -> p v -> attn_normalize |
    shiftmax -> p v)."""
    b, h, n_tok, d = shape
    q, k, v = _qkv(b, h, n_tok, d, 26)
    m, s = ops.dyadic(torch.tensor(3e-3, dtype=torch.float64))
    x0 = ops.shift_exp_x0(0.004)
    consts: dict[str, Tensor] = {"score_mult": m.to(torch.int32), "score_shift": s.to(torch.int32)}
    attrs: dict[str, int] = {"score_bits": 16, "probs": probs, "x0": x0}
    if probs == PROBS_SHIFTMAX8:
        attrs["n"] = ops.choose_shiftmax_n(x0, n_tok)
    nw = 1
    if swin:
        consts["bias"] = _randint(-3000, 3000, (h, n_tok, n_tok), torch.int32, 27)
        nw = b
        consts["mask"] = _window_mask(nw, n_tok, 28)
    check_cpu("attention", [q, k, v], consts, attrs, types=[ttype(t, nw) for t in (q, k, v)])
    no_fallback(fallbacks)


@pytest.mark.parametrize("probs", [PROBS_REL8, PROBS_SHIFTMAX8], ids=["rel8", "shiftmax8"])
@pytest.mark.parametrize("extreme", ["max", "min", "minus127"])
def test_fused_attention_extremes(threads: int, fallbacks: list[str], probs: int, extreme: str) -> None:
    """All-127 / all -128 / all -127 q, k (and v): the largest scores d * 128**2 and contexts 128 * P."""
    b, h, n_tok, d = 2, 2, 197, 64
    q, k, v = _qkv(b, h, n_tok, d, 29, extreme)
    m, s = ops.dyadic(torch.tensor(32767 / (d * 128 * 128), dtype=torch.float64))  # scores fill int16
    x0 = ops.shift_exp_x0(0.01)
    attrs: dict[str, int] = {"score_bits": 16, "probs": probs, "x0": x0}
    if probs == PROBS_SHIFTMAX8:
        attrs["n"] = ops.choose_shiftmax_n(x0, n_tok)
    consts = {"score_mult": m.to(torch.int32), "score_shift": s.to(torch.int32),
              "bias": torch.full((h, n_tok, n_tok), -(2**20), dtype=torch.int32)}
    check_cpu("attention", [q, k, v], consts, attrs)
    no_fallback(fallbacks)


def test_fused_attention_head_dim_not_a_multiple_of_4_uses_the_reference(fallbacks: list[str]) -> None:
    q, k, v = _qkv(2, 2, 9, 6, 30)
    m, s = ops.dyadic(torch.tensor(3e-3, dtype=torch.float64))
    check_cpu("attention", [q, k, v], {"score_mult": m.to(torch.int32), "score_shift": s.to(torch.int32)},
              {"score_bits": 16, "probs": PROBS_REL8, "x0": ops.shift_exp_x0(0.004)})
    assert fallbacks == ["attention"]


# ---------------------------------------------------------------------------------------------
# The factories check operands against the validated types before anything reaches C
# ---------------------------------------------------------------------------------------------


def test_factories_refuse_operands_that_do_not_match_the_static_type() -> None:
    x = _randint(-1000, 1000, (2, 5, 16), torch.int32, 31)
    m, s = _dyadic(16, 32)
    t = ttype(x)
    node = Node("requantize", ("x",), "y", {"mult": "mult", "shift": "shift"}, {"bits": 8})
    consts = {"mult": m, "shift": s}
    out_t = OPSET["requantize"].infer(Check("t", [t], consts, node.attrs))
    fn = CPU.kernels()["requantize"](node, consts, [t], out_t)
    assert torch.equal(fn(x), OPSET["requantize"].reference(x, m, s, 8))
    assert torch.equal(fn(x[:1]), OPSET["requantize"].reference(x[:1], m, s, 8))  # any batch size
    for bad in (x[..., :8], x.to(torch.int16), x.unsqueeze(0), x.reshape(2, 80)):
        with pytest.raises(RuntimeError, match="does not match"):
            fn(bad)


# ---------------------------------------------------------------------------------------------
# Every node of real programs, on the reference run's own intermediate values
# ---------------------------------------------------------------------------------------------

MODES = [("rel8", "int32"), ("shiftmax8", "int64"), ("rel8", "int64"), ("shiftmax8", "int32")]


@pytest.fixture(scope="module", params=[(m, p, ln) for m in ("vit_test", "swin_test") for p, ln in MODES],
                ids=lambda p: "-".join(p))
def frozen(request: pytest.FixtureRequest) -> ivit.Program:
    name, probs, layernorm = request.param
    return ivit.freeze(make_qmodel(name, config=ivit.QuantConfig(probs=probs, layernorm=layernorm)))


def test_every_node_of_real_programs_matches_the_reference(threads: int, fallbacks: list[str],
                                                           frozen: ivit.Program) -> None:
    """The cpu engine's executed program (after its passes) is run by the reference interpreter, recording every
    value; each cpu step, fed those exact inputs, must give exactly the recorded output."""
    eng = ivit.Engine(frozen, backend="cpu")
    prog = eng.executed
    ref_steps = plan(prog, eng.info.types, eng.consts, {})
    x = random_pixels(3, frozen.input_shape[1:], seed=33)
    values: dict[str, Tensor] = {prog.input: x}
    run(prog, ref_steps, x, trace=lambda i, out: values.__setitem__(prog.nodes[i].output, out))
    seen_ops = set()
    for step in eng.steps:
        node = prog.nodes[step.index]
        got = step.fn(*[values[v] for v in step.inputs])
        want = values[step.output]
        assert got.dtype == want.dtype and torch.equal(got, want), f"node {step.index} ({node.op})"
        seen_ops.add(node.op)
    assert {"attention", "requantize_table", "linear", "add_requantize"} <= seen_ops
    cfg = ivit.QuantConfig.from_json(frozen.meta["config"])
    assert ("layernorm32" if cfg.layernorm.value == "int32" else "layernorm") in seen_ops
    assert torch.equal(eng(x), values[prog.output])
    if native.available():  # C everywhere, except Swin's 16-bit patch_norm (the C LayerNorm writes int8 only)
        uncovered = {n.op for n in prog.nodes if n.op in ("layernorm", "layernorm32") and n.attrs["bits"] != 8}
        assert set(fallbacks) == uncovered
        assert bool(uncovered) == (frozen.meta["family"] == "swin")


# ---------------------------------------------------------------------------------------------
# Without a C compiler: every op falls back to an exact path
# ---------------------------------------------------------------------------------------------

_NO_C_SCRIPT = """
import json, sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    import ivit
    from ivit import native
    from conftest import make_qmodel, random_pixels
    out = {{"available": native.available(), "library": native.library() is not None, "exact": []}}
    for name, probs in {cases!r}:
        q = make_qmodel(name, config=ivit.QuantConfig(probs=probs))
        prog = ivit.freeze(q)
        x = random_pixels(3, 32, seed=5)
        cpu = ivit.Engine(prog, backend="cpu")(x)
        ref = ivit.Engine(prog, backend="reference")(x)
        out["exact"].append(bool(torch.equal(cpu, ref) and torch.equal(cpu, q.logits(x))))
out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("how", ["IVIT_NO_CKERNELS", "no_compiler"])
def test_cpu_backend_without_c_kernels_is_exact(tmp_path: Path, how: str) -> None:
    env = dict(os.environ)
    if how == "IVIT_NO_CKERNELS":
        env["IVIT_NO_CKERNELS"] = "1"
        cases = [("vit_test", "rel8"), ("vit_test", "shiftmax8"), ("swin_test", "rel8"), ("swin_test", "shiftmax8")]
    else:  # a compiler that does not exist and an empty cache: the build fails, the backend degrades
        env.pop("IVIT_NO_CKERNELS", None)
        env["CC"] = str(tmp_path / "no-such-cc")
        env["IVIT_CACHE"] = str(tmp_path / "cache")
        cases = [("swin_test", "rel8")]
    script = _NO_C_SCRIPT.format(tests=str(TESTS), cases=cases)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["available"] is False and out["library"] is False
    assert out["exact"] == [True] * len(cases)
    unavailable = [w for w in out["warnings"] if "C kernels unavailable" in w]
    assert bool(unavailable) == (how == "no_compiler"), out["warnings"]


@pytest.mark.skipif(os.environ.get("IVIT_TEST_INNER") != "1", reason="runs inside the non-VNNI run only")
def test_inner_run_uses_the_kernels_without_vnni() -> None:
    assert os.environ.get("IVIT_NATIVE_MARCH") == "x86-64-v3"
    assert native.available() and native.library().ivit_has_vnni() == 0


@needs_c
@pytest.mark.skipif(os.environ.get("IVIT_TEST_INNER") == "1", reason="already inside the non-VNNI run")
def test_kernels_built_without_vnni_are_exact(tmp_path: Path) -> None:
    """The C kernels' AVX2 paths (what a CPU without AVX-512 VNNI runs; this machine may have it): the library
    built with ``IVIT_NATIVE_MARCH=x86-64-v3`` passes this file's kernel tests too (one thread)."""
    env = {**os.environ, "IVIT_NATIVE_MARCH": "x86-64-v3", "IVIT_CACHE": str(tmp_path / "cache"),
           "IVIT_TEST_INNER": "1"}
    env.pop("IVIT_NO_CKERNELS", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m",
                          "not slow and not gpu", "-k", "not real_programs and not without_c_kernels and not 2threads"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=str(TESTS.parent))
    assert res.returncode == 0, res.stdout[-3000:]
    assert " passed" in res.stdout and " failed" not in res.stdout
