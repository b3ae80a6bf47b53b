"""Exactness of the int8 GEMMs of ``ivit.native.gemm`` against the int64 reference ops of ``ivit.ops``.

Every result is compared with ``ops.int_linear`` / ``ops.int_matmul`` by ``torch.equal`` (never a kernel
with itself), on random and saturating operands (all 127, all -128, uint8 255 x -128, mixed extremes).
In this process the default backend (oneDNN on a VNNI CPU) and the C kernel (``backend="native"``)
are checked; subprocesses force every other code path: ``IVIT_GEMM=native|torch``, no C kernels, the C
kernel built for AVX2 without VNNI (``IVIT_NATIVE_MARCH=x86-64-v3``), for plain x86-64 (scalar), for
AVX-VNNI (``alderlake``, where the CPU has it), and oneDNN restricted to pre-VNNI instruction sets
(``ONEDNN_MAX_CPU_ISA=AVX2|AVX512_CORE``), where raw ``torch._int_mm`` saturates and must be refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ivit import native, ops
from ivit.native import gemm

HAS_C = native.available()
FLAGS = native.cpu_flags()
HAS_VNNI = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & FLAGS)
needs_c = pytest.mark.skipif(not HAS_C, reason="no C compiler: the native GEMM is not built")

M_SIZES = (1, 3, 197)
K_SIZES = (1, 3, 64, 65, 384, 3072)
N_SIZES = (1, 17, 64, 1000)
PATTERNS = ("random", "all127", "all-128", "mixed", "u8_255", "u8_random")
LOCAL_BACKENDS = ["default"] + (["native"] if HAS_C else [])


def operands(pattern: str, m: int, k: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``a (m, k)`` (int8, or uint8 for ``u8_*``) and ``w (n, k)`` int8 of one pattern."""
    if pattern == "random":
        return (torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g),
                torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g))
    if pattern == "all127":  # pairs sum to 2 * 127 * 127 > 32767: saturates a 16-bit (vpmaddubsw) path
        return torch.full((m, k), 127, dtype=torch.int8), torch.full((n, k), 127, dtype=torch.int8)
    if pattern == "all-128":
        return torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), -128, dtype=torch.int8)
    if pattern == "mixed":
        ext = torch.tensor([-128, 127, -127, 0], dtype=torch.int8)
        return (ext[torch.randint(0, 4, (m, k), generator=g)], ext[torch.randint(0, 4, (n, k), generator=g)])
    if pattern == "u8_255":
        return torch.full((m, k), 255, dtype=torch.uint8), torch.full((n, k), -128, dtype=torch.int8)
    assert pattern == "u8_random"
    return (torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g),
            torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g))


def reference(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if a.dtype == torch.int8:
        return ops.int_linear(a, w, bias)
    acc = ops.int_matmul(a, w, transpose_b=True)
    return acc if bias is None else (acc.to(torch.int64) + bias.to(torch.int64)).to(torch.int32)


def mm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    return gemm.int8_mm(a, w, bias, backend=None if backend == "default" else backend)


@contextmanager
def threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------
# This process: the default backend and the C kernel of the native build
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_int8_mm_exact_on_grid(pattern: str, backend: str) -> None:
    g = torch.Generator().manual_seed(PATTERNS.index(pattern))
    bad = []
    for m in M_SIZES:
        for k in K_SIZES:
            for n in N_SIZES:
                a, w = operands(pattern, m, k, n, g)
                bias = torch.randint(-2**29, 2**29, (n,), dtype=torch.int32, generator=g)
                for b in (None, bias):
                    if not torch.equal(mm(a, w, b, backend), reference(a, w, b)):
                        bad.append((m, k, n, b is not None))
                if a.dtype == torch.int8:  # the public linear, with a leading batch dim
                    x = a.reshape(1, m, k)
                    if not torch.equal(gemm.linear(x, w, bias), ops.int_linear(x, w, bias)):
                        bad.append(("linear", m, k, n))
    assert not bad, f"{pattern} via {backend} ({gemm.gemm_backend()}): inexact for (M, K, N, bias) {bad}"


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_threads_exact(nthreads: int, backend: str) -> None:
    """Shapes big enough for the parallel split of M and N blocks (and K blocks) on 1 and 2 threads."""
    g = torch.Generator().manual_seed(7)
    bad = []
    with threads(nthreads):
        for pattern in ("random", "all127", "u8_255"):
            for m, k, n in ((197, 384, 1000), (197, 3072, 64), (3, 3072, 1000), (1, 65, 1000), (64, 1, 64)):
                a, w = operands(pattern, m, k, n, g)
                bias = torch.randint(-2**29, 2**29, (n,), dtype=torch.int32, generator=g)
                if not torch.equal(mm(a, w, bias, backend), reference(a, w, bias)):
                    bad.append((pattern, m, k, n))
        q = torch.randint(-128, 128, (8, 6, 197, 64), dtype=torch.int8, generator=g)
        p = torch.randint(0, 256, (8, 6, 197, 197), dtype=torch.uint8, generator=g)
        if not torch.equal(gemm.matmul(q, q, True), ops.int_matmul(q, q, True)):
            bad.append("q @ k^T")
        if not torch.equal(gemm.matmul(p, q), ops.int_matmul(p, q)):
            bad.append("p @ v")
    assert not bad, f"{nthreads} threads via {backend}: inexact {bad}"


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    k, n = 65, 40
    base = torch.randint(-128, 128, (9, 2 * k), dtype=torch.int8, generator=g)
    wbase = torch.randint(-128, 128, (k, 2 * n), dtype=torch.int8, generator=g)
    bias_base = torch.randint(-2**29, 2**29, (2 * n,), dtype=torch.int32, generator=g)
    row = torch.randint(-128, 128, (1, k), dtype=torch.int8, generator=g)
    wrows = torch.randint(-128, 128, (2 * n, k), dtype=torch.int8, generator=g)
    cases = {
        "a strided K": (base[:, ::2], wbase[:, :n].t().contiguous()),
        "a transposed": (base[:, :k].t().contiguous().t(), wbase[:, :n].t().contiguous()),
        "w transposed view": (base[:, :k].contiguous(), wbase[:, :n].t()),
        "w strided rows": (base[:, :k].contiguous(), wrows[::2]),
        "a expanded rows (stride 0)": (row.expand(6, k), wbase[:, :n].t()),
        "a size-1 dim with stride 0": (row.as_strided((1, k), (0, 1)), wbase[:, :n].t().contiguous()),
        "w size-1 dim with stride 0": (base[:, :k], wbase[:, :1].t().contiguous().as_strided((1, k), (0, 1))),
        "a uint8 strided": (base[:, ::2].view(torch.uint8), wbase[:, :n].t()),
    }
    bad = []
    for name, (a, w) in cases.items():
        nn_ = w.shape[0]
        for bias in (None, bias_base[: 2 * nn_ : 2]):
            if not torch.equal(mm(a, w, bias, backend), reference(a, w, bias)):
                bad.append((name, bias is not None))
    x = base[:, :k].reshape(3, 3, k).permute(1, 0, 2)  # non-contiguous (..., K)
    w = wbase[:, :n].t()
    if not torch.equal(gemm.linear(x, w), ops.int_linear(x, w)):
        bad.append("linear permuted x")
    a4 = torch.randint(-128, 128, (2, 3, 17, 65), dtype=torch.int8, generator=g).transpose(0, 1)
    b4 = torch.randint(-128, 128, (2, 3, 65, 19), dtype=torch.int8, generator=g).transpose(0, 1)
    if not torch.equal(gemm.matmul(a4, b4), ops.int_matmul(a4, b4)):
        bad.append("matmul permuted batch")
    if not torch.equal(gemm.matmul(a4, b4.transpose(-1, -2), True), ops.int_matmul(a4, b4.transpose(-1, -2), True)):
        bad.append("matmul transpose_b view")
    assert not bad, f"via {backend}: inexact {bad}"


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("adtype", [torch.int8, torch.uint8])
def test_batched_matmul_exact(adtype: torch.dtype, transpose_b: bool) -> None:
    g = torch.Generator().manual_seed(5)
    lo, hi = (-128, 128) if adtype == torch.int8 else (0, 256)
    bad = []
    for (ba, bb), (m, k, n) in (
            (((2, 3), (2, 3)), (197, 64, 197)), (((2, 3), (2, 3)), (197, 197, 64)), (((4,), (4,)), (5, 3, 17)),
            (((2, 1), (3,)), (1, 65, 3)), (((1,), (2,)), (7, 1, 9)), (((), (3,)), (6, 33, 40)),
            (((2,), ()), (6, 33, 40))):
        bshape = (*bb, n, k) if transpose_b else (*bb, k, n)
        for kind in ("random", "extreme"):
            if kind == "random":
                a = torch.randint(lo, hi, (*ba, m, k), dtype=adtype, generator=g)
                b = torch.randint(-128, 128, bshape, dtype=torch.int8, generator=g)
            else:
                a = torch.full((*ba, m, k), hi - 1 if adtype == torch.uint8 else 127, dtype=adtype)
                b = torch.full(bshape, -128 if adtype == torch.uint8 else 127, dtype=torch.int8)
            got, want = gemm.matmul(a, b, transpose_b), ops.int_matmul(a, b, transpose_b)
            if got.shape != want.shape or not torch.equal(got, want):
                bad.append((ba, bb, m, k, n, kind))
    assert not bad, f"matmul {adtype} transpose_b={transpose_b}: inexact {bad}"


@needs_c
def test_beyond_int32_bound_matches_reference_cast() -> None:
    """Past |acc| < 2**31 (K > 2**17 for all -128) the C kernel still returns the reference's int32:
    the exact sum modulo 2**32 (all its accumulation is modular)."""
    k = 140_000
    a = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.cat([torch.full((1, k), -128, dtype=torch.int8), torch.full((1, k), 127, dtype=torch.int8)])
    want = ops.int_linear(a, w)
    assert int(want[0, 0]) != 128 * 128 * k  # it did wrap
    assert torch.equal(gemm.int8_mm(a, w, backend="native"), want)
    u = torch.full((2, 70_000), 255, dtype=torch.uint8)
    v = torch.full((3, 70_000), -128, dtype=torch.int8)
    assert torch.equal(gemm.int8_mm(u, v, backend="native"), ops.int_matmul(u, v, True))


@pytest.mark.parametrize("backend", LOCAL_BACKENDS + ["torch"])
def test_empty_dims(backend: str) -> None:
    bias = torch.tensor([5, -7, 2**30], dtype=torch.int32)
    for a, w, b in ((torch.zeros(0, 4, dtype=torch.int8), torch.ones(3, 4, dtype=torch.int8), bias),
                    (torch.ones(2, 4, dtype=torch.int8), torch.ones(0, 4, dtype=torch.int8), None),
                    (torch.ones(2, 0, dtype=torch.int8), torch.ones(3, 0, dtype=torch.int8), bias),
                    (torch.ones(2, 0, dtype=torch.uint8), torch.ones(3, 0, dtype=torch.int8), None)):
        got = mm(a, w, b, backend)
        assert got.dtype == torch.int32 and torch.equal(got, reference(a, w, b))
    x = torch.ones(2, 0, 5, dtype=torch.int8)
    assert torch.equal(gemm.linear(x, torch.ones(3, 5, dtype=torch.int8)), torch.zeros(2, 0, 3, dtype=torch.int32))
    a = torch.ones(0, 2, 4, 5, dtype=torch.int8)
    b = torch.ones(0, 2, 5, 3, dtype=torch.int8)
    assert torch.equal(gemm.matmul(a, b), ops.int_matmul(a, b))
    a = torch.ones(2, 4, 0, dtype=torch.uint8)
    b = torch.ones(2, 0, 3, dtype=torch.int8)
    assert torch.equal(gemm.matmul(a, b), ops.int_matmul(a, b))


def test_misuse_raises() -> None:
    a = torch.ones(4, 8, dtype=torch.int8)
    w = torch.ones(3, 8, dtype=torch.int8)
    with pytest.raises(TypeError):
        gemm.int8_mm(a.float(), w)
    with pytest.raises(TypeError):
        gemm.int8_mm(a.to(torch.int16), w)
    with pytest.raises(TypeError):
        gemm.int8_mm(a, w.to(torch.uint8))
    with pytest.raises(ValueError):
        gemm.int8_mm(a.reshape(1, 4, 8), w)
    with pytest.raises(ValueError):
        gemm.int8_mm(a, torch.ones(3, 7, dtype=torch.int8))
    with pytest.raises(TypeError):
        gemm.int8_mm(a, w, torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        gemm.int8_mm(a, w, torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        gemm.int8_mm(a, w, backend="mkl")
    with pytest.raises(TypeError):
        gemm.linear(a.float(), w)
    with pytest.raises(TypeError):
        gemm.linear(a, w.float())
    with pytest.raises(RuntimeError):
        gemm.linear(a, torch.ones(3, 7, dtype=torch.int8))
    with pytest.raises(TypeError):
        gemm.matmul(a.reshape(1, 4, 8).to(torch.int32), w.reshape(1, 3, 8), True)
    with pytest.raises(RuntimeError):
        gemm.matmul(a.reshape(1, 4, 8), w.reshape(1, 3, 8), False)  # K mismatch, as the reference


@needs_c
def test_native_build_is_integer_only() -> None:
    path = native.library_path()
    assert path is not None
    found = {mnem for mnem, _ in _gemm_instructions(path)}
    fp = [ln for ln in native.fp_instructions(path) if _is_gemm_function(ln.split(":")[0])]
    assert not fp, f"floating-point instructions in the GEMM: {fp}"
    assert "vpmaddubsw" not in found and "pmaddubsw" not in found
    if gemm.native_isa() in ("avx512vnni", "avxvnni"):
        assert "vpdpbusd" in found


def test_default_routes_to_onednn_on_vnni() -> None:
    if not HAS_VNNI:
        pytest.skip("the CPU has no avx512_vnni / avx_vnni / amx_int8: oneDNN int8 is not exact here")
    if (os.environ.get("IVIT_GEMM") or "auto") != "auto" or os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("IVIT_GEMM / ONEDNN_MAX_CPU_ISA set in the environment of this run")
    assert gemm.gemm_backend() == "onednn"
    # shapes torch._int_mm gets wrong on CPU even with VNNI never reach it: K = 1 (uninitialized output)
    # and size-1 dims with stride 0 (pytorch/pytorch#195066)
    a = torch.randint(-128, 128, (5, 1), dtype=torch.int8)
    w = torch.randint(-128, 128, (17, 1), dtype=torch.int8)
    assert torch.equal(gemm.linear(a, w), ops.int_linear(a, w))
    row = torch.randint(-128, 128, (1, 64), dtype=torch.int8).as_strided((1, 64), (0, 1))
    w = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    assert torch.equal(gemm.int8_mm(row, w), ops.int_linear(row, w))


# ---------------------------------------------------------------------------------------------------
# Subprocesses: every other code path
# ---------------------------------------------------------------------------------------------------

CHECK = r"""
import json, os, warnings
import torch
from ivit import native, ops
from ivit.native import gemm
out = {"isa": gemm.native_isa(), "lib": str(native.library_path()) if native.available() else None, "modes": {}}
g = torch.Generator().manual_seed(11)
ext = torch.tensor([-128, 127], dtype=torch.int8)
def ops_pair(pattern, m, k, n):
    if pattern == "random":
        return torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g), \
            torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    if pattern == "mixed":
        return ext[torch.randint(0, 2, (m, k), generator=g)], ext[torch.randint(0, 2, (n, k), generator=g)]
    if pattern == "u8_255":
        return torch.full((m, k), 255, dtype=torch.uint8), torch.full((n, k), -128, dtype=torch.int8)
    v = {"all127": 127, "all-128": -128}[pattern]
    return torch.full((m, k), v, dtype=torch.int8), torch.full((n, k), v, dtype=torch.int8)
def battery():
    bad, checked = [], 0
    for nt in (1, 2):
        torch.set_num_threads(nt)
        shapes = ((1, 384, 64), (64, 384, 64), (3, 65, 17), (197, 3072, 64), (5, 1, 17), (2, 3, 1000)) if nt == 1 \
            else ((64, 384, 64), (197, 384, 160))
        for m, k, n in shapes:
            for pattern in ("random", "all127", "all-128", "mixed", "u8_255"):
                a, w = ops_pair(pattern, m, k, n)
                bias = torch.randint(-2**29, 2**29, (n,), dtype=torch.int32, generator=g)
                if a.dtype == torch.int8:
                    x = a.reshape(1, m, k)
                    pairs = [(gemm.linear(x, w, bias), ops.int_linear(x, w, bias)),
                             (gemm.linear(a, w), ops.int_linear(a, w)),
                             (gemm.int8_mm(a, w, bias), ops.int_linear(a, w, bias))]
                else:
                    pairs = [(gemm.int8_mm(a, w), ops.int_matmul(a, w, True))]
                pairs += [(gemm.matmul(a, w, True), ops.int_matmul(a, w, True)),
                          (gemm.matmul(a.expand(2, m, k), w.t().expand(2, k, n)),
                           ops.int_matmul(a.expand(2, m, k), w.t().expand(2, k, n)))]
                for i, (got, want) in enumerate(pairs):
                    checked += 1
                    if got.dtype != torch.int32 or not torch.equal(got, want):
                        bad.append([nt, m, k, n, pattern, i])
        q = torch.randint(-128, 128, (2, 6, 197, 64), dtype=torch.int8, generator=g)
        p = torch.full((2, 6, 197, 197), 255, dtype=torch.uint8)
        v = torch.full((2, 6, 197, 64), -128, dtype=torch.int8)
        for i, (got, want) in enumerate([(gemm.matmul(q, q, True), ops.int_matmul(q, q, True)),
                                         (gemm.matmul(p, v), ops.int_matmul(p, v))]):
            checked += 1
            if not torch.equal(got, want):
                bad.append([nt, "attention", i])
    return bad, checked
for mode in os.environ["IVIT_TEST_MODES"].split(","):  # IVIT_GEMM values, one after the other
    os.environ["IVIT_GEMM"] = mode
    gemm._BACKEND = None  # decide again, from this IVIT_GEMM
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = gemm.gemm_backend()
    bad, checked = battery()
    out["modes"][mode] = {"backend": backend, "bad": bad, "checked": checked,
                          "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}
a = torch.full((64, 384), 127, dtype=torch.int8)
out["raw_int_mm_exact"] = bool(torch.equal(torch._int_mm(a, a.t()), ops.int_linear(a, a)))
print("RESULT " + json.dumps(out))
"""

#: variant -> (environment, IVIT_GEMM modes run in turn in its process, builds its own library in a
#: fresh IVIT_CACHE).  Variants share processes where the environment allows, to save interpreter starts.
VARIANTS: dict[str, tuple[dict[str, str], tuple[str, ...], bool]] = {
    "forced": ({}, ("native", "torch"), False),
    "avx2": ({"IVIT_NATIVE_MARCH": "x86-64-v3"}, ("native",), True),
    "scalar": ({"IVIT_NATIVE_MARCH": "x86-64"}, ("native",), True),
    "avxvnni": ({"IVIT_NATIVE_MARCH": "alderlake"}, ("native",), True),
    "onednn_AVX2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, ("auto", "onednn"), False),
    # AVX512_CORE (Skylake-SP) and, in the same process, no C kernels: an old CPU without a compiler
    "onednn_AVX512_CORE": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "IVIT_NO_CKERNELS": "1"}, ("auto", "onednn"),
                           False),
}
#: test -> the variant of each of its parameter values
SUBPROCESS_TESTS = {
    "test_forced_backends": lambda name: "forced",
    "test_no_ckernels": lambda name: "onednn_AVX512_CORE",
    "test_isa_builds": lambda name: name,
    "test_pre_vnni_onednn_is_refused": lambda name: name,
}
_CLEAR = ("IVIT_GEMM", "IVIT_NATIVE_MARCH", "IVIT_NO_CKERNELS", "ONEDNN_MAX_CPU_ISA", "IVIT_TEST_MODES")


def _skip_reason(name: str) -> str | None:
    env, _, _ = VARIANTS[name]
    if "IVIT_NATIVE_MARCH" in env and not HAS_C:
        return "no C compiler"
    if name == "avx2" and "avx2" not in FLAGS:
        return "the CPU has no AVX2: cannot run an x86-64-v3 build"
    if name == "avxvnni" and not {"avx_vnni", "avx2"} <= FLAGS:
        return "the CPU has no AVX-VNNI: cannot run the avxvnni build"
    if name.startswith("onednn_") and not hasattr(torch, "_int_mm"):
        return "torch._int_mm is not available"
    return None


def _run_variant(name: str, cache: Path | None) -> dict:
    env_extra, modes, _ = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if k not in _CLEAR}
    env.update(env_extra)
    env["IVIT_TEST_MODES"] = ",".join(modes)
    if cache is not None:
        env["IVIT_CACHE"] = str(cache)
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        return {"error": res.stderr[-3000:]}
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module", autouse=True)
def variant_runs(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """The variant subprocesses of the selected tests, started (two at a time) with this module's first
    test so that they overlap the in-process tests."""
    wanted = set()
    for item in request.session.items:
        if getattr(item, "originalname", "") in SUBPROCESS_TESTS and item.path == request.path:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            wanted.add(SUBPROCESS_TESTS[item.originalname](params.get("name")))
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {}
    for name, (_, _, own_cache) in VARIANTS.items():
        if name in wanted and _skip_reason(name) is None:
            cache = tmp_path_factory.mktemp(f"ivit-cache-{name}") if own_cache else None
            futures[name] = pool.submit(_run_variant, name, cache)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _result(variant_runs: dict[str, Future], name: str) -> dict:
    """The variant's output, after asserting that every mode of it was exact."""
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    out = variant_runs[name].result(timeout=600)
    assert "error" not in out, f"{name} subprocess failed:\n{out.get('error')}"
    for mode, r in out["modes"].items():
        assert r["checked"] > 100
        assert not r["bad"], f"{name}, IVIT_GEMM={mode}: inexact results {r['bad'][:10]} (backend {r['backend']})"
    return out


_GEMM_FUNCS = re.compile(r"gemm|ukernel|pack_panel|convert_row|row_sum|word_of")


def _is_gemm_function(name: str) -> bool:
    return bool(_GEMM_FUNCS.search(name))


def _gemm_instructions(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(mnemonic, operands)`` of the GEMM functions' machine code in a built library (skips without objdump)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not found: cannot disassemble the library")
    res = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                         timeout=120, check=True)
    found: list[tuple[str, str]] = []
    func = ""
    for line in res.stdout.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        words = [w for w in parts[1].split() if not w.startswith("{")] if len(parts) >= 2 else []  # {vex} prefix
        if words and _is_gemm_function(func):
            found.append((words[0], " ".join(words[1:])))
    return found


@pytest.mark.parametrize("name", ["native", "torch"])
def test_forced_backends(variant_runs: dict[str, Future], name: str) -> None:
    """``IVIT_GEMM=native`` / ``IVIT_GEMM=torch`` are obeyed (and exact)."""
    r = _result(variant_runs, "forced")["modes"][name]
    if name == "native" and not HAS_C:
        assert r["backend"] == "torch" and r["warnings"], r
    else:
        assert r["backend"] == name
    if name == "native" and HAS_C:
        assert _result(variant_runs, "forced")["isa"] == gemm.native_isa()


def test_no_ckernels(variant_runs: dict[str, Future]) -> None:
    """No C kernels and a pre-VNNI oneDNN: the exact torch int64 GEMM."""
    out = _result(variant_runs, "onednn_AVX512_CORE")
    assert out["isa"] is None and out["lib"] is None
    assert out["modes"]["auto"]["backend"] == "torch"


@pytest.mark.parametrize("name,isa", [("avx2", "avx2"), ("scalar", "scalar"), ("avxvnni", "avxvnni")])
def test_isa_builds(variant_runs: dict[str, Future], name: str, isa: str) -> None:
    out = _result(variant_runs, name)
    assert out["modes"]["native"]["backend"] == "native" and out["isa"] == isa, out
    instructions = _gemm_instructions(out["lib"])
    found = {mnem for mnem, _ in instructions}
    fp = [ln for ln in native.fp_instructions(out["lib"]) if _is_gemm_function(ln.split(":")[0])]
    assert not fp, f"floating-point instructions in the {isa} GEMM: {fp}"
    assert "vpmaddubsw" not in found and "pmaddubsw" not in found  # saturating 16-bit pair sums
    if isa == "avx2":
        assert "vpmaddwd" in found and "vpdpbusd" not in found
    elif isa == "avxvnni":
        dp = [operands for mnem, operands in instructions if mnem == "vpdpbusd"]
        assert dp and not any("zmm" in o for o in dp)  # VEX (ymm) encoding only: no AVX-512


@pytest.mark.parametrize("name", ["onednn_AVX2", "onednn_AVX512_CORE"])
def test_pre_vnni_onednn_is_refused(variant_runs: dict[str, Future], name: str) -> None:
    """oneDNN limited to a pre-VNNI ISA: never chosen, even when forced (with a warning); all exact."""
    out = _result(variant_runs, name)  # linear / matmul exact on all-127 and the other operands
    auto, forced = out["modes"]["auto"], out["modes"]["onednn"]
    assert auto["backend"] != "onednn"
    assert auto["backend"] == ("native" if out["lib"] else "torch")
    assert forced["backend"] == auto["backend"]
    assert any("IVIT_GEMM=onednn refused" in w for w in forced["warnings"]), forced["warnings"]
    if out["raw_int_mm_exact"]:
        pytest.skip(f"raw torch._int_mm is exact under {name} on this machine: the hazard is not reproduced")
    assert not out["raw_int_mm_exact"]  # the guard above is what keeps linear/matmul exact here
