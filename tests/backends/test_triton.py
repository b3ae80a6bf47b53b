"""The ``triton`` backend: every kernel equals its op's reference (``OPSET[op].reference``) exactly.

Each kernel is built the way the engine builds it, through the backend's factory for one program node (constants,
attributes, validated static types), and compared with ``torch.equal`` on random and extreme values: int32 at the
validated limits, multipliers ``+-(2**31 - 1)``, shifts 1 and 62, saturating int8 GEMM operands, constant rows,
fully masked rows.  The fused GEMM epilogues (ops the op set may gain) are compared with the composition of the
reference ops.  Then every node of real frozen ViT and Swin programs (both ``probs`` modes, both LayerNorm
variants) is checked against the reference run of the same program.

Two ways to run the same kernels:

* default: Triton's CPU interpreter (``TRITON_INTERPRET=1`` while ``kernels`` is first imported), CPU tensors,
  small shapes;
* ``-m gpu``: compiled for the GPU, CUDA tensors; plus CUDA-graph capture, DeiT-sized attention, QAT on CUDA with
  freeze -> bit-exact engines, and ``torchrun`` over NCCL with two GPUs.  Run it in its own process: one process
  holds the kernels in one mode.

Without a GPU the code generation is still checked: every kernel variant compiles for sm_90 (LLVM + ptxas) and its
PTX has no floating-point instruction.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor

import ivit
from conftest import make_qmodel, random_pixels
from ivit import ops
from ivit.errors import IvitError
from ivit.ir import OPSET, Node, TType
from ivit.ir.interpret import plan, run
from ivit.ir.opset import PROBS_REL8, PROBS_SHIFTMAX8, Check

pytest.importorskip("triton")
import ivit.backends.triton as tb  # noqa: E402  (registers the backend; does not import triton)

HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
_KERNELS = "ivit.backends.triton.kernels"


def _interpreter_ready() -> bool:
    """Triton's CPU interpreter works in this process only if ``TRITON_INTERPRET=1`` was set before triton was first
    imported (``import ivit`` imports it through torch), so that triton's own library functions are interpreted."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(tl.sum, InterpretedFunction)


def _kernels(interpreted: bool) -> ModuleType:
    if interpreted and not _interpreter_ready():
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported: run by test_kernels_under_the_interpreter")
    if not interpreted and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the GPU kernels run in a process without it")
    mod = sys.modules.get(_KERNELS) or tb.load_kernels()
    if mod.INTERPRETED != interpreted:
        pytest.skip("this process holds the kernels in the other mode")
    return mod


def test_kernels_under_the_interpreter() -> None:
    """The default run: every interpreter test of this file in a fresh process with ``TRITON_INTERPRET=1`` set
    before anything imports triton (``TRITON_INTERPRET=1 pytest tests/backends/test_triton.py`` runs them here,
    one by one)."""
    if _interpreter_ready():
        pytest.skip("this process runs the interpreter tests itself")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve()),
           "-m", "not gpu and not slow", "-k", "interpret and not under_the_interpreter"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=False)
    tail = res.stdout[-6000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


@pytest.fixture(params=[pytest.param("cpu", id="interpret"),
                        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """Where the kernels run: CPU tensors under the interpreter, or CUDA tensors (``-m gpu``)."""
    if request.param == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA GPU")
    _kernels(request.param == "cpu")
    return request.param


@pytest.fixture
def kern(device: str) -> ModuleType:
    return _kernels(device == "cpu")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
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
    lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
    return TType.of(x.dtype, (per_image, *x.shape[1:]), 0, lo, hi)


def check(op: str, device: str, inputs: Sequence[Tensor], consts: Mapping[str, Tensor], attrs: Mapping[str, object],
          types: Sequence[TType] | None = None, producers: Sequence[Node | None] | None = None,
          names: Sequence[str] | None = None) -> Tensor:
    """Build ``op``'s triton kernel from its factory for one node (static types inferred by the op set) on ``device``
    and require its output to equal the reference (computed on the CPU) exactly."""
    spec = OPSET[op]
    names = list(names or [f"in{i}" for i in range(len(inputs))])
    types = list(types or [ttype(x) for x in inputs])
    chk = Check(f"test node ({op})", types, consts, dict(attrs), list(producers or [None] * len(inputs)), names)
    out_t = spec.infer(chk)
    node = Node(op, tuple(names), "out", {k: k for k in consts}, dict(attrs))
    fn = tb.triton_kernels()[op](node, {k: v.to(device) for k, v in consts.items()}, types, out_t)
    want = spec.reference(*inputs, **consts, **attrs)
    got = fn(*[x.to(device) for x in inputs]).cpu()
    assert got.dtype == want.dtype == out_t.dtype and got.shape == want.shape
    assert torch.equal(got, want), op
    if got.numel():
        assert out_t.lo <= int(got.min()) and int(got.max()) <= out_t.hi  # the inferred interval holds
    return got


# ---------------------------------------------------------------------------------------------------------------
# Registration, lazy import, availability
# ---------------------------------------------------------------------------------------------------------------

def test_registered_lazily_and_unavailable_without_triton() -> None:
    """``import ivit.backends.triton`` and its kernel table load no kernels (and work without triton installed:
    here triton is made unimportable); the backend is then unavailable and the engine says so."""
    code = """
import json, sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTriton())
import ivit
import ivit.backends.triton as tb
from ivit.backends import get_backend
b = get_backend("triton")
table = b.kernels()
out = {"kernels_loaded": "ivit.backends.triton.kernels" in sys.modules, "ops": sorted(table),
       "passes": list(b.passes), "available": b.available()}
try:
    ivit.Engine(ivit.load_program(sys.argv[1]), backend="triton")
    out["engine"] = "ok"
except ivit.IvitError as e:
    out["engine"] = str(e)
print(json.dumps(out))
"""
    fixture = ROOT / "tests" / "fixtures" / "vit_test_v1.ivit"
    res = subprocess.run([sys.executable, "-c", code, str(fixture)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kernels_loaded"] is False and out["available"] is False
    assert set(out["ops"]) <= set(OPSET) and {"linear", "attention", "layernorm32"} <= set(out["ops"])
    assert out["passes"] == ["fold_gelu_table", "fuse_attention"]
    assert "not available" in out["engine"]


def test_cpu_tensors_need_the_interpreter(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if device != "cpu":
        pytest.skip("interpreter mode only")
    k = _kernels(True)
    x = _randint(-1000, 1000, (2, 8), torch.int32, 0)
    consts = {"mult": torch.tensor(3, dtype=torch.int32), "shift": torch.tensor(2, dtype=torch.int32)}
    monkeypatch.setattr(k, "INTERPRETED", False)
    with pytest.raises(IvitError, match="CUDA tensors"):
        check("requantize", device, [x], consts, {"bits": 8})


def test_factories_refuse_operands_that_do_not_match_the_static_type(device: str) -> None:
    x = _randint(-1000, 1000, (4, 8), torch.int32, 0)
    consts = {"mult": torch.tensor(3, dtype=torch.int32), "shift": torch.tensor(2, dtype=torch.int32)}
    t = ttype(x)
    fn = tb.triton_kernels()["requantize"](Node("requantize", ("x",), "y", {"mult": "m", "shift": "s"}, {"bits": 8}),
                                          {k: v.to(device) for k, v in consts.items()}, [t],
                                          OPSET["requantize"].infer(Check("n", [t], consts, {"bits": 8})))
    fn(x.to(device))
    for bad in (x[:, :4], x.to(torch.int16), x.reshape(2, 2, 8)):
        with pytest.raises(RuntimeError, match="does not match"):
            fn(bad.to(device))


# ---------------------------------------------------------------------------------------------------------------
# GEMMs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 17, 40), (1, 70, 64), (3, 5, 100)])
def test_linear(device: str, shape: tuple[int, ...]) -> None:
    x = _extreme(-128, 127, shape, torch.int8, 0)
    w = _extreme(-127, 127, (33, shape[-1]), torch.int8, 1)
    b = _randint(-(2**30), 2**30, (33,), torch.int32, 2)
    check("linear", device, [x], {"weight": w, "bias": b}, {})
    check("linear", device, [x], {"weight": w}, {})


def test_linear_saturating_operands(device: str) -> None:
    x = torch.full((1, 20, 2048), -128, dtype=torch.int8)  # |acc| = 2048 * 128 * 127 + |b| < 2**31
    w = torch.full((16, 2048), -127, dtype=torch.int8)
    w[1::2] = 127
    b = torch.full((16,), 2**30, dtype=torch.int32)
    b[::3] = -(2**30)
    check("linear", device, [x], {"weight": w, "bias": b}, {})


@pytest.mark.parametrize("transpose_b", [0, 1])
@pytest.mark.parametrize("a_dtype", [torch.int8, torch.uint8])
def test_matmul(device: str, transpose_b: int, a_dtype: torch.dtype) -> None:
    lo, hi = (0, 255) if a_dtype == torch.uint8 else (-128, 127)
    a = _extreme(lo, hi, (2, 3, 17, 40), a_dtype, 3)
    b = _extreme(-128, 127, (2, 3, 9, 40) if transpose_b else (2, 3, 40, 9), torch.int8, 4)
    check("matmul", device, [a, b], {}, {"transpose_b": transpose_b})


def test_matmul_strided_views(device: str, kern: ModuleType) -> None:
    qkv = _extreme(-128, 127, (2, 17, 3, 2, 16), torch.int8, 5).to(device)  # (B, N, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided (B, H, N, d) views, as in attention
    assert torch.equal(kern.matmul(q, k, True).cpu(), ops.int_matmul(q.cpu(), k.cpu(), True))
    p = torch.full((2, 2, 17, 17), 255, dtype=torch.uint8, device=device)
    v_min = torch.full_like(v, -128)
    assert torch.equal(kern.matmul(p, v_min).cpu(), ops.int_matmul(p.cpu(), v_min.cpu()))
    a = _randint(-128, 127, (1, 3, 20, 24), torch.int8, 6).to(device)
    b = _randint(-128, 127, (2, 1, 24, 12), torch.int8, 7).to(device)
    assert torch.equal(kern.matmul(a, b).cpu(), ops.int_matmul(a.cpu(), b.cpu()))


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 17, 40), (1, 70, 96)])
def test_fused_gemm_epilogues_equal_the_composition(kern: ModuleType, device: str, shape: tuple[int, ...]) -> None:
    """``linear_requantize``, ``linear_add_requantize``, ``linear_requantize_table`` (proposed ops) equal the
    reference ops they fuse."""
    n = 24
    x = _extreme(-128, 127, shape, torch.int8, 8)
    w = _extreme(-127, 127, (n, shape[-1]), torch.int8, 9)
    b = _randint(-(2**20), 2**20, (n,), torch.int32, 10)
    m, s = _dyadic(n, 11, -12.0, -2.0, signed=True)
    ma, sa = _dyadic(1, 12, -1.0, 0.5)
    res = _extreme(-32767, 32767, (*shape[:-1], n), torch.int16, 13)
    table = _randint(-128, 127, (256,), torch.int8, 14)
    d = {"device": device}
    acc = ops.int_linear(x, w, b)
    for bias in (b, None):
        a = acc if bias is not None else ops.int_linear(x, w)
        for bits in (8, 16):
            got = kern.linear_requantize(x.to(**d), w.to(**d), m.to(**d), s.to(**d), bits,
                                         bias=None if bias is None else bias.to(**d))
            assert torch.equal(got.cpu(), ops.requantize(a, m, s, bits))
        got = kern.linear_add_requantize(x.to(**d), res.to(**d), w.to(**d), ma.to(**d), sa.to(**d), m.to(**d),
                                         s.to(**d), 16, bias=None if bias is None else bias.to(**d))
        assert torch.equal(got.cpu(), ops.add_requantize(res, a, ma, sa, m, s, 16))
        got = kern.linear_requantize_table(x.to(**d), w.to(**d), m.to(**d), s.to(**d), table.to(**d),
                                           bias=None if bias is None else bias.to(**d))
        assert torch.equal(got.cpu(), OPSET["requantize_table"].reference(a, m, s, table))


def test_proposed_fused_gemm_factories(device: str) -> None:
    """The factories of the proposed ops widen per-tensor constants to the output channels (weight rows)."""
    x = _extreme(-128, 127, (2, 9, 40), torch.int8, 15)
    w = _extreme(-127, 127, (24, 40), torch.int8, 16)
    b = _randint(-(2**20), 2**20, (24,), torch.int32, 17)
    res = _extreme(-32767, 32767, (2, 9, 24), torch.int16, 18)
    m, s = (t.reshape(()) for t in _dyadic(1, 19, -12.0, -2.0))
    acc = ops.int_linear(x, w, b)
    cases = {
        "linear_requantize": ([x], {"mult": m, "shift": s}, {"bits": 8}, ops.requantize(acc, m, s, 8)),
        "linear_add_requantize": ([x, res], {"mult_a": m, "shift_a": s, "mult_b": m, "shift_b": s}, {"bits": 16},
                                  ops.add_requantize(res, acc, m, s, m, s, 16)),
    }
    for op, (ins, consts, attrs, want) in cases.items():
        consts = {"weight": w, "bias": b, **consts}
        node = Node(op, tuple(f"in{i}" for i in range(len(ins))), "out", {k: k for k in consts}, attrs)
        fn = tb.proposed_kernels()[op](node, {k: v.to(device) for k, v in consts.items()}, [ttype(t) for t in ins],
                                       None)
        assert torch.equal(fn(*[t.to(device) for t in ins]).cpu(), want), op


# ---------------------------------------------------------------------------------------------------------------
# Requantize, residual add, tables
# ---------------------------------------------------------------------------------------------------------------

_LIMITS = {torch.int8: 127, torch.int16: 32767, torch.int32: 2**31 - 1}


@pytest.mark.parametrize("in_dtype,bits", [(torch.int32, 8), (torch.int32, 16), (torch.int32, 32), (torch.int16, 8),
                                           (torch.int8, 16)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize(device: str, in_dtype: torch.dtype, bits: int, per_channel: bool) -> None:
    lim = _LIMITS[in_dtype]
    x = _extreme(-lim, lim, (3, 9, 40), in_dtype, 0)
    m, s = _dyadic(40 if per_channel else 1, 1, -25.0, 2.0, signed=True)
    if not per_channel:
        m, s = m.reshape(()), s.reshape(())
    check("requantize", device, [x], {"mult": m, "shift": s}, {"bits": bits})


def test_requantize_limits_and_column_slices(device: str) -> None:
    x = _extreme(-(2**31 - 1), 2**31 - 1, (2, 5, 96), torch.int32, 2)
    m = torch.tensor([2**31 - 1, -(2**31 - 1), 1, -1] * 8, dtype=torch.int32)
    s = torch.tensor([1, 62, 31, 2] * 8, dtype=torch.int32)
    for start in (0, 32, 64):  # the q/k/v slices of a qkv accumulator (row stride 96)
        xs = x.to(device)[..., start:start + 32]
        t = ttype(x[..., start:start + 32])
        out_t = OPSET["requantize"].infer(Check("n", [t], {"mult": m, "shift": s}, {"bits": 32}))
        fn = tb.triton_kernels()["requantize"](Node("requantize", ("x",), "y", {"mult": "m", "shift": "s"},
                                                    {"bits": 32}), {"mult": m.to(device), "shift": s.to(device)},
                                               [t], out_t)
        assert torch.equal(fn(xs).cpu(), ops.requantize(x[..., start:start + 32], m, s, 32))


@pytest.mark.parametrize("dtypes,bits", [((torch.int16, torch.int32), 16), ((torch.int8, torch.int8), 8),
                                         ((torch.int32, torch.int16), 16)])
def test_add_requantize(device: str, dtypes: tuple[torch.dtype, torch.dtype], bits: int) -> None:
    a = _extreme(-_LIMITS[dtypes[0]] // 2, _LIMITS[dtypes[0]] // 2, (2, 9, 40), dtypes[0], 3)
    b = _extreme(-_LIMITS[dtypes[1]] // 2, _LIMITS[dtypes[1]] // 2, (2, 9, 40), dtypes[1], 4)
    ma, sa = _dyadic(1, 5, -1.0, 0.0)
    mb, sb = _dyadic(40, 6, -31.0, -10.0, signed=True)
    check("add_requantize", device, [a, b], {"mult_a": ma.reshape(()), "shift_a": sa.reshape(()), "mult_b": mb,
                                             "shift_b": sb}, {"bits": bits})


@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize_table_and_shiftgelu(device: str, per_channel: bool) -> None:
    x = _extreme(-(2**20), 2**20, (2, 9, 40), torch.int32, 7)
    m, s = _dyadic(40 if per_channel else 1, 8, -14.0, -9.0)
    table = _randint(-128, 127, (256,), torch.int8, 9)
    check("requantize_table", device, [x], {"mult": m, "shift": s, "table": table}, {})
    v = torch.arange(-128, 128, dtype=torch.int8).reshape(4, 64)
    for x0 in (-186, -1, -20000):
        check("shiftgelu", device, [v], {}, {"x0": x0, "n": ops.choose_shiftgelu_n(x0), "k_out": 16})


# ---------------------------------------------------------------------------------------------------------------
# I-LayerNorm
# ---------------------------------------------------------------------------------------------------------------

def _ln_inputs(c: int, dtype: torch.dtype, seed: int) -> Tensor:
    lim = _LIMITS[dtype]
    x = _extreme(-lim, lim, (2, 6, c), dtype, seed)
    x[0, 0] = 7  # a constant token: std = 0
    x[0, 1] = torch.where(torch.arange(c) % 2 == 0, lim, -lim).to(dtype)  # the widest spread
    x[0, 2] = 0
    x[0, 2, 0] = lim  # one outlier
    x[1, 0] = _randint(-3, 3, (c,), dtype, seed + 1)  # tiny deviations (k = 0)
    return x


@pytest.mark.parametrize("op", ["layernorm32", "layernorm"])
@pytest.mark.parametrize("c", [1, 7, 64, 100])
def test_layernorm(device: str, op: str, c: int) -> None:
    for dtype, bits in ((torch.int16, 8), (torch.int8, 16)):
        x = _ln_inputs(c, dtype, c)
        m, s = _dyadic(c, 1, -16.0, -4.0, signed=True)
        off = _randint(-60, 60, (c,), torch.int32, 2)
        check(op, device, [x], {"mult": m, "shift": s, "offset": off}, {"bits": bits})
        check(op, device, [x], {"mult": m[:1].reshape(()), "shift": s[:1].reshape(()), "offset": off}, {"bits": bits})


# ---------------------------------------------------------------------------------------------------------------
# Shiftmax, attn_normalize
# ---------------------------------------------------------------------------------------------------------------

def _window_mask(n_win: int, n: int, seed: int) -> Tensor:
    mask = torch.rand(n_win, n, n, generator=_g(seed)) < 0.4
    mask[0, 1] = True  # a fully masked row
    mask[-1, :, 0] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("x0", [-1, -737653, -(2**21), -(2**27)])
def test_shiftmax_rel(device: str, dtype: torch.dtype, x0: int) -> None:
    lim = min(_LIMITS[dtype], 2**24 - 1)
    x = _extreme(-lim, lim, (4, 2, 13, 13), dtype, 0)
    check("shiftmax_rel", device, [x], {}, {"x0": x0})
    check("shiftmax_rel", device, [x], {"mask": _window_mask(2, 13, 1)}, {"x0": x0}, types=[ttype(x, 2)])


@pytest.mark.parametrize("k_out", [8, 16])
def test_shiftmax_legacy(device: str, k_out: int) -> None:
    for dtype, x0 in ((torch.int16, -300), (torch.int32, -(2**30))):
        x = _extreme(-_LIMITS[dtype], _LIMITS[dtype], (4, 2, 13, 13), dtype, 2)
        n = ops.choose_shiftmax_n(x0, 13)
        check("shiftmax", device, [x], {}, {"x0": x0, "n": n, "k_out": k_out})
        check("shiftmax", device, [x], {"mask": _window_mask(2, 13, 3)}, {"x0": x0, "n": n, "k_out": k_out},
              types=[ttype(x, 2)])


def test_attn_normalize(device: str) -> None:
    p = _extreme(0, 255, (2, 3, 13, 13), torch.uint8, 4)
    p[0, 0, 0] = 0  # an all-zero row: P = max(0, 1)
    v = _extreme(-128, 127, (2, 3, 13, 8), torch.int8, 5)
    acc = ops.int_matmul(p, v)
    mm = Node("matmul", ("p", "v"), "acc", {}, {"transpose_b": 0})
    check("attn_normalize", device, [acc, p], {}, {}, producers=[mm, None], names=["acc", "p"])


# ---------------------------------------------------------------------------------------------------------------
# Fused attention
# ---------------------------------------------------------------------------------------------------------------

def _attention_consts(h: int, n: int, bias: bool, mask: int, seed: int, mult: int = 1 << 22, shift: int = 24
                      ) -> dict[str, Tensor]:
    consts = {"score_mult": torch.tensor(mult, dtype=torch.int32),
              "score_shift": torch.tensor(shift, dtype=torch.int32)}
    if bias:
        consts["bias"] = _randint(-5000, 5000, (h, n, n), torch.int32, seed)
    if mask:
        consts["mask"] = _window_mask(mask, n, seed + 1)
    return consts


@pytest.mark.parametrize("probs", [PROBS_REL8, PROBS_SHIFTMAX8])
@pytest.mark.parametrize("shape,bias,mask", [((2, 2, 13, 16), False, 0), ((4, 2, 16, 8), True, 2),
                                              ((2, 3, 17, 32), True, 0), ((2, 1, 9, 16), False, 2)])
def test_fused_attention(device: str, probs: int, shape: tuple[int, ...], bias: bool, mask: int) -> None:
    b, h, n, d = shape
    qkv = _extreme(-128, 127, (b, n, 3, h, d), torch.int8, 6)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as the programs make them
    consts = _attention_consts(h, n, bias, mask, 7)
    attrs = {"score_bits": 16, "probs": probs, "x0": -737653 if probs == PROBS_REL8 else -300}
    if probs == PROBS_SHIFTMAX8:
        attrs["n"] = ops.choose_shiftmax_n(-300, n)
    per = mask or 1
    check("attention", device, [q, k, v], consts, attrs, types=[ttype(t, per) for t in (q, k, v)])


@pytest.mark.parametrize("probs", [PROBS_REL8, PROBS_SHIFTMAX8])
def test_fused_attention_extremes(device: str, probs: int) -> None:
    """Saturated scores (every q, k at +-127/-128 and a multiplier that clamps), huge |x0|, and a long-row
    configuration through the unfused fallback."""
    n, d = 16, 32
    q = torch.full((2, 2, n, d), 127, dtype=torch.int8)
    q[:, :, ::2] = -128
    k = _extreme(-128, 127, (2, 2, n, d), torch.int8, 8)
    v = torch.full((2, 2, n, d), -128, dtype=torch.int8)
    v[..., 1::2] = 127
    x0 = -(2**27) if probs == PROBS_REL8 else -(2**20)
    attrs = {"score_bits": 24 if probs == PROBS_REL8 else 32, "probs": probs, "x0": x0}
    if probs == PROBS_SHIFTMAX8:
        attrs["n"] = ops.choose_shiftmax_n(x0, n)
    consts = _attention_consts(2, n, True, 2, 9, mult=2**31 - 1, shift=10)
    if probs == PROBS_REL8:
        consts = _attention_consts(2, n, True, 2, 9, mult=2**31 - 1, shift=18)
    check("attention", device, [q, k, v], consts, attrs, types=[ttype(t, 2) for t in (q, k, v)])


def test_fused_attention_long_rows_use_the_unfused_kernels(kern: ModuleType, device: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kern, "MAX_ATTENTION_TOKENS", 8)
    q, k, v = (_extreme(-128, 127, (2, 2, 13, 16), torch.int8, s) for s in (10, 11, 12))
    consts = _attention_consts(2, 13, True, 2, 13)
    for probs, attrs in ((PROBS_REL8, {}), (PROBS_SHIFTMAX8, {"n": ops.choose_shiftmax_n(-300, 13)})):
        attrs = {"score_bits": 16, "probs": probs, "x0": -737653 if probs == PROBS_REL8 else -300, **attrs}
        check("attention", device, [q, k, v], consts, attrs, types=[ttype(t, 2) for t in (q, k, v)])


# ---------------------------------------------------------------------------------------------------------------
# Whole programs
# ---------------------------------------------------------------------------------------------------------------

def _programs() -> list:
    return [pytest.param(name, probs, ln, id=f"{name}-{probs.value}-{ln.value}")
            for name, probs, ln in (("vit_test", ivit.Probs.REL8, ivit.LayerNormImpl.INT32),
                                    ("vit_test", ivit.Probs.SHIFTMAX8, ivit.LayerNormImpl.INT64),
                                    ("swin_test", ivit.Probs.REL8, ivit.LayerNormImpl.INT32),
                                    ("swin_test", ivit.Probs.SHIFTMAX8, ivit.LayerNormImpl.INT64))]


@pytest.mark.parametrize("name,probs,ln", _programs())
def test_every_node_of_real_programs_matches_the_reference(device: str, name: str, probs: ivit.Probs,
                                                           ln: ivit.LayerNormImpl) -> None:
    prog = ivit.freeze(make_qmodel(name, config=ivit.QuantConfig(probs=probs, layernorm=ln)))
    eng = ivit.Engine(prog, backend="triton", device=device)
    ops_run = {n.op for n in eng.executed.nodes}
    assert {"attention", "layernorm32" if ln == ivit.LayerNormImpl.INT32 else "layernorm"} <= ops_run
    pixels = random_pixels(2, (32, 32), seed=11)
    ref_steps = plan(eng.executed, eng.info.types, eng.executed.consts, {})
    want: dict[int, Tensor] = {}
    final = run(eng.executed, ref_steps, pixels, lambda i, t: want.__setitem__(i, t.clone()))
    got: dict[int, Tensor] = {}
    out = eng.run(pixels.to(device), lambda i, t: got.__setitem__(i, t.cpu()))
    for i, node in enumerate(eng.executed.nodes):
        assert torch.equal(got[i], want[i]), f"node {i} ({node.op})"
    assert torch.equal(out.cpu(), final)
    assert torch.equal(out.cpu(), ivit.Engine(prog, backend="cpu")(pixels))


# ---------------------------------------------------------------------------------------------------------------
# Code generation for the GPU without a GPU
# ---------------------------------------------------------------------------------------------------------------

_COMPILE = """
import json, sys
from ivit.backends.triton import kernels, ptx
assert not kernels.INTERPRETED
name, _, want = sys.argv[1].partition("/")  # "" (all), "kernel" or "kernel/CONSTEXPR=value"
rows = []
for launch in ptx.sample_launches():
    if name and (launch.name != name or (want and f"{want.split('=')[0]}={launch.constexprs.get(want.split('=')[0])}"
                                         != want)):
        continue
    k = ptx.compile_launch(launch, arch=90)
    code = k.asm["ptx"]
    rows.append({"kernel": launch.name, "constexprs": {a: str(b) for a, b in launch.constexprs.items()},
                 "fp": ptx.fp_instructions(code)[:5], "mma": sum("mma" in line for line in code.splitlines()),
                 "usage": ptx.ptxas_usage(code, 90)})
print(json.dumps(rows))
"""


def _compile(names: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE, names], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900, check=False)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr):
        pytest.skip("no ptxas for sm_90")
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        assert r["fp"] == [], f"{r['kernel']} {r['constexprs']}: floating point in the PTX: {r['fp']}"
        if r["kernel"] in ("_gemm_kernel", "_bmm_kernel", "_attention_kernel"):
            assert r["mma"] > 0, f"{r['kernel']} does not use the tensor cores"
        if r["usage"] is not None and r["kernel"] == "_gemm_kernel":
            assert r["usage"]["spill_bytes"] == 0, r


def test_gpu_code_of_the_main_kernels_is_integer_only() -> None:
    """The fused attention compiles for sm_90 (LLVM + ptxas), on tensor cores, with no floating-point instruction.
    (Every kernel variant: the ``slow`` test below.)"""
    from ivit.backends.triton import ptx

    assert ptx.fp_instructions("\tadd.rn.f32 %f3, %f1, %f2;\n\tcvt.rn.f32.s32 %f1, %r1;\n\t.reg .f32 %f<4>;") == [
        "add.rn.f32 %f3, %f1, %f2;", "cvt.rn.f32.s32 %f1, %r1;"]  # the scan sees float instructions
    assert ptx.fp_instructions("\tmul.wide.s32 %rd1, %r1, %r2;\n\tshr.s64 %rd2, %rd1, 3;") == []
    _check_rows(_compile("_attention_kernel/REL=True"))


@pytest.mark.slow
def test_gpu_code_of_every_kernel_is_integer_only() -> None:
    _check_rows(_compile(""))


# ---------------------------------------------------------------------------------------------------------------
# On a GPU only
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def cuda_gemms(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The quantized modules' int8 GEMMs on CUDA through ``ivit.native.cuda_gemm`` (what ``native.gemm`` routes CUDA
    tensors to; patched here so these tests do not depend on that routing being in place)."""
    from ivit.native import cuda_gemm
    from ivit.native.kernels import EAGER

    lin, mm = EAGER["linear"], EAGER["matmul"]
    monkeypatch.setitem(EAGER, "linear", lambda x, weight, bias=None: cuda_gemm.linear(x, weight, bias)
                        if x.is_cuda else lin(x, weight, bias))
    monkeypatch.setitem(EAGER, "matmul", lambda a, b, transpose_b: cuda_gemm.matmul(a, b, bool(transpose_b))
                        if a.is_cuda else mm(a, b, transpose_b))
    yield


@pytest.mark.slow
def test_full_size_program_under_the_interpreter(device: str) -> None:
    """DeiT-Tiny at 224x224 (197 tokens, d = 64: the attention tile of the DeiT models) in the interpreter
    (about 90 s on 2 cores; on a GPU, the test below)."""
    if device != "cpu":
        pytest.skip("the GPU runs test_full_size_programs_on_cuda_equal_the_cpu_engine")
    qm = make_qmodel("deit_tiny_patch16_224", calib_batches=1, batch=2)
    prog = ivit.freeze(qm, self_check=False)
    pixels = random_pixels(1, qm.img_size, seed=12)
    assert torch.equal(ivit.Engine(prog, backend="triton", device="cpu")(pixels), ivit.Engine(prog)(pixels))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize("batch", [1, 5])
def test_full_size_programs_on_cuda_equal_the_cpu_engine(name: str, batch: int) -> None:
    """Real shapes (197 tokens and d = 64; 49-token windows with masks): the tiles the benchmark runs."""
    _kernels(False)
    qm = make_qmodel(name, calib_batches=1, batch=2)
    prog = ivit.freeze(qm, self_check=False)
    pixels = random_pixels(batch, qm.img_size, seed=12)
    want = ivit.Engine(prog, backend="cpu")(pixels)
    got = ivit.Engine(prog, backend="triton", device="cuda")(pixels.cuda())
    assert torch.equal(got.cpu(), want)
    from ivit.backends.triton import ptx

    ran = ptx.loaded_ptx()
    assert {"_gemm_kernel", "_attention_kernel", "_layernorm_kernel"} <= {name for name, _ in ran}
    assert all(ptx.fp_instructions(code) == [] for _, code in ran)  # the code that ran is integer-only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("batch", [1, 8])
def test_engine_runs_in_a_cuda_graph(batch: int) -> None:
    _kernels(False)
    prog = ivit.freeze(make_qmodel("swin_test"))
    eng = ivit.Engine(prog, backend="triton", device="cuda")
    static = random_pixels(batch, (32, 32), seed=13).cuda()
    want = ivit.Engine(prog, backend="cpu")(static.cpu())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            eng(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = eng(static)
    for seed in (14, 15):
        new = random_pixels(batch, (32, 32), seed=seed)
        static.copy_(new.cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), ivit.Engine(prog, backend="cpu")(new))
    assert want.shape == out.shape


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["vit_test", "swin_test"])
def test_qat_on_cuda_then_freeze_is_bit_exact(name: str, cuda_gemms: None) -> None:
    """A few QAT steps on CUDA; the CUDA model, the same model on CPU, the CPU engine and the triton engine give the
    same integers."""
    _kernels(False)
    torch.manual_seed(0)
    qm = make_qmodel(name).cuda().train()
    opt = torch.optim.AdamW(qm.parameters(), lr=1e-4)
    for step in range(3):
        px = random_pixels(8, qm.img_size, seed=20 + step).cuda()
        y = torch.randint(0, qm.num_classes, (8,), device="cuda")
        loss = torch.nn.functional.cross_entropy(qm(px).value.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    prog = ivit.freeze(qm)  # its self-check compares the CPU reference run with the CUDA model's logits
    px = random_pixels(4, qm.img_size, seed=30)
    cuda_logits = qm.logits(px.cuda()).cpu()
    assert torch.equal(copy.deepcopy(qm).cpu().logits(px), cuda_logits)
    assert torch.equal(ivit.Engine(prog, backend="cpu")(px), cuda_logits)
    assert torch.equal(ivit.Engine(prog, backend="triton", device="cuda")(px.cuda()).cpu(), cuda_logits)


_NCCL_MAIN = """
import sys
from ivit.native import cuda_gemm
from ivit.native.kernels import EAGER
lin, mm = EAGER["linear"], EAGER["matmul"]
EAGER["linear"] = lambda x, weight, bias=None: cuda_gemm.linear(x, weight, bias) if x.is_cuda else lin(x, weight, bias)
EAGER["matmul"] = lambda a, b, t: cuda_gemm.matmul(a, b, bool(t)) if a.is_cuda else mm(a, b, t)
from ivit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_torchrun_two_gpus_nccl(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    script = tmp_path / "main.py"
    script.write_text(_NCCL_MAIN)
    out = tmp_path / "run"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), "qat", "vit_test", "--data", "digits",
           "--epochs", "1", "--limit-train", "128", "--limit-eval", "32", "--batch", "16", "--calib-images", "32",
           "--out", str(out), "--no-progress", "--device", "cuda"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert recs[-1]["world_size"] == 2 and recs[-1]["ranks_in_sync"] is True
