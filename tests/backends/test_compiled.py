"""The ``compiled`` backend (one native function per model) against the reference backend.

Every program is compiled once per session into a temporary ``IVIT_CACHE``.  The integers must be
``torch.equal`` to ``ivit.Engine(prog, backend="reference")`` for ViT and Swin in both probability modes
(and the 64-bit LayerNorm of format-1 programs), at batch sizes 1, 2, 3, 5 and 8, per image and batched,
on 1 and 2 threads, for random and extreme inputs (all-0 / all-255 / checkerboard pixels, +-127
weights); in subprocesses the AVX2 (``IVIT_NATIVE_MARCH=x86-64-v3``, ``vpmaddwd``, no VNNI) and portable
(``x86-64``) builds, and oneDNN restricted to AVX2, must give the same integers.  The generated library
holds no floating-point instruction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ivit
from conftest import hostile, make_qmodel, random_pixels
from ivit import native
from ivit.backends import compiled as cb
from ivit.backends.compiled import build
from ivit.nn import QLinear

pytestmark = pytest.mark.skipif(not build.available(), reason="no C compiler with OpenMP")

VARIANTS = [("vit_test", "rel8", "int32"), ("vit_test", "shiftmax8", "int32"), ("swin_test", "rel8", "int32"),
            ("swin_test", "shiftmax8", "int32"), ("vit_test", "rel8", "int64")]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    old = os.environ.get("IVIT_CACHE")
    os.environ["IVIT_CACHE"] = str(tmp_path_factory.mktemp("ivit_cache"))
    yield
    if old is None:
        os.environ.pop("IVIT_CACHE", None)
    else:
        os.environ["IVIT_CACHE"] = old


_PROGS: dict[tuple[str, ...], ivit.Program] = {}
_ENGINES: dict[tuple[str, ...], tuple[ivit.Engine, ivit.Engine]] = {}


def _program(name: str, probs: str, layernorm: str = "int32", extreme: bool = False) -> ivit.Program:
    key = (name, probs, layernorm, str(extreme))
    if key not in _PROGS:
        cfg = ivit.QuantConfig(probs=probs, layernorm=layernorm)
        if extreme:  # every int8 weight +-127, calibrated on all-255 images too (16-bit pair sums would saturate)
            torch.manual_seed(0)
            q = ivit.quantize(ivit.create_model(name), cfg)
            with torch.no_grad():
                for m in q.modules():
                    if isinstance(m, QLinear):
                        m.weight.copy_(torch.where(m.weight >= 0, 1.0, -1.0) * 0.02)
            size = q.img_size
            ivit.calibrate(q, [torch.full((2, 3, *size), 255, dtype=torch.uint8), random_pixels(4, size, seed=1)])
            _PROGS[key] = ivit.freeze(q, self_check=False)
        else:
            _PROGS[key] = ivit.freeze(make_qmodel(name, config=cfg))
    return _PROGS[key]


def _engines(*key: str, extreme: bool = False) -> tuple[ivit.Engine, ivit.Engine]:
    k = (*key, str(extreme))
    if k not in _ENGINES:
        prog = _program(*key, extreme=extreme)
        _ENGINES[k] = (ivit.Engine(prog, backend="compiled"), ivit.Engine(prog, backend="reference"))
    return _ENGINES[k]


def _extreme_pixels(prog: ivit.Program) -> torch.Tensor:
    c, h, w = prog.input_shape
    board = (torch.arange(h * w).reshape(h, w) % 2 * 255).to(torch.uint8).expand(c, h, w)
    return torch.stack([torch.zeros(c, h, w, dtype=torch.uint8), torch.full((c, h, w), 255, dtype=torch.uint8),
                        board, 255 - board])


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> int:
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def test_registered_and_compiled_once() -> None:
    assert "compiled" in ivit.backends.backend_names()
    fast, _ = _engines("vit_test", "rel8", "int32")
    info = fast.compiled.info
    assert "fallback" not in info, info
    assert info["isa"] == build.ISA_NAMES[build.detect_isa()]
    # the q/k/v split, GELU table, residual adds, LayerNorm prologues and attention epilogue are all fused
    assert {"gemm+requantize", "gemm+requantize_table", "gemm+add_requantize", "layernorm->gemm prologue",
            "attention+requantize", "gemm+embed"} <= set(info["fusions"])
    again = ivit.Engine(fast.program, backend="compiled")  # the cache: same library, no second build
    assert again.compiled.libraries == fast.compiled.libraries


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(v) for v in VARIANTS])
def test_equals_reference_at_every_batch_size(variant: tuple[str, str, str], threads: int) -> None:
    fast, ref = _engines(*variant)
    prog = fast.program
    size = prog.input_shape[1:]
    for b in (1, 2, 3, 5, 8):
        x = random_pixels(b, size, seed=10 + b)
        want = ref(x)
        got = fast(x)
        assert got.dtype == want.dtype and torch.equal(got, want), (variant, b, threads)
    x = random_pixels(5, size, seed=99)
    batched = fast(x)
    for i in range(5):  # per image = batched
        assert torch.equal(fast(x[i:i + 1]), batched[i:i + 1])
    ext = _extreme_pixels(prog)
    assert torch.equal(fast(ext), ref(ext))


@pytest.mark.parametrize("name", ["vit_test", "swin_test"])
@pytest.mark.parametrize("probs", ["rel8", "shiftmax8"])
def test_extreme_weights_and_pixels(name: str, probs: str, threads: int) -> None:
    fast, ref = _engines(name, probs, "int32", extreme=True)
    prog = fast.program
    x = torch.cat([_extreme_pixels(prog), random_pixels(3, prog.input_shape[1:], seed=2)])
    assert torch.equal(fast(x), ref(x))


def test_no_floating_point_instruction_in_the_library() -> None:
    fast, _ = _engines("swin_test", "rel8", "int32")
    for lib in fast.compiled.libraries:
        assert native.fp_instructions(lib) == []
    from ivit.verify import verify_integer_only

    proof = verify_integer_only(fast, batch=2)
    assert proof.ok, proof.summary()


def test_fallback_when_the_planner_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    prog = _program("vit_test", "rel8")

    def refuse(*a: object, **k: object) -> None:
        raise cb.Unsupported("test")

    monkeypatch.setattr(cb, "plan_program", refuse)
    eng = ivit.Engine(prog, backend="compiled")
    assert eng.compiled.info["fallback"] == "test"
    x = random_pixels(3, prog.input_shape[1:], seed=5)
    assert torch.equal(eng(x), ivit.Engine(prog, backend="reference")(x))


def test_profile_reports_every_step() -> None:
    fast, _ = _engines("vit_test", "rel8", "int32")
    model = fast.compiled.info["model"]
    pixels = random_pixels(2, fast.program.input_shape[1:])
    rows = cb.profile(model, pixels, runs=2, warmup=2)
    assert len(rows) == len(model.plan.steps)
    assert any(r["kind"] == "gemm" and r["macs"] > 0 for r in rows)
    assert all(r["ns"] > 0 for r in rows if r["kind"] == "gemm")
    with pytest.raises(ValueError, match="runs >= 1"):
        cb.profile(model, pixels, runs=0)


SCRIPT = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import hostile, make_qmodel, random_pixels
import ivit
from ivit.nn import QLinear
torch.set_num_threads(2)
out = {}
for name, probs in (("vit_test", "rel8"), ("swin_test", "shiftmax8")):
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model(name), ivit.QuantConfig(probs=probs))
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, QLinear):
                m.weight.copy_(torch.where(m.weight >= 0, 1.0, -1.0) * 0.02)
    size = q.img_size
    ivit.calibrate(q, [torch.full((2, 3, *size), 255, dtype=torch.uint8), random_pixels(4, size, seed=1)])
    prog = ivit.freeze(q, self_check=False)
    x = torch.cat([torch.full((2, 3, *size), 255, dtype=torch.uint8), random_pixels(3, size, seed=2)])
    fast = ivit.Engine(prog, backend="compiled")
    ref = ivit.Engine(prog, backend="reference")
    out[name + "/" + probs] = {"isa": fast.compiled.info.get("isa"), "fallback": fast.compiled.info.get("fallback"),
                               "exact": bool(torch.equal(fast(x), ref(x)))}
print("RESULT " + json.dumps(out))
'''


@pytest.mark.parametrize("env,isa", [({"IVIT_NATIVE_MARCH": "x86-64-v3"}, "avx2"),
                                     ({"IVIT_NATIVE_MARCH": "x86-64"}, "portable"),
                                     ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, None)],
                         ids=["avx2-build", "portable-build", "onednn-avx2"])
def test_other_code_paths_are_exact(env: dict[str, str], isa: str | None, tmp_path: Path) -> None:
    if isa is not None and os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("x86 code paths")
    full = {k: v for k, v in os.environ.items() if k not in ("IVIT_NATIVE_MARCH", "ONEDNN_MAX_CPU_ISA")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).resolve().parents[1])], env=full,
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    for key, r in results.items():
        assert r["fallback"] is None, (key, r)
        assert r["exact"], (key, r)
        if isa is not None:
            assert r["isa"] == isa, (key, r)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "swin_tiny_patch4_window7_224"])
def test_full_size_models(name: str) -> None:
    torch.set_num_threads(2)
    q = make_qmodel(name, calib_batches=1, batch=2)
    prog = ivit.freeze(q, self_check=False)
    fast = ivit.Engine(prog, backend="compiled")
    ref = ivit.Engine(prog, backend="reference")
    x = random_pixels(3, q.img_size, seed=3)
    assert torch.equal(fast(x), ref(x))
    assert torch.equal(fast(x[1:2]), ref(x[1:2]))



def test_names_and_metadata_from_the_file_never_become_code(tmp_path: Path) -> None:
    prog = _program("swin_test", "rel8")
    bad = ivit.load_program(hostile(prog).save(tmp_path / "hostile.ivit"))  # a valid file
    fast = ivit.Engine(bad, backend="compiled")
    assert "fallback" not in fast.compiled.info
    lib = build.load(fast.compiled.libraries[0])
    assert not hasattr(lib, "ivit_pwned")
    x = random_pixels(2, prog.input_shape[1:], seed=4)
    assert torch.equal(fast(x), ivit.Engine(prog, backend="reference")(x))


def test_fallback_when_the_compiler_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    prog = _program("swin_test", "rel8")

    def fail(*a: object, **k: object) -> None:
        raise RuntimeError("compiled backend: cc failed on model.c: unsupported option '-fopenmp'\nmore")

    monkeypatch.setattr(build, "build", fail)
    eng = ivit.Engine(prog, backend="compiled")
    assert eng.compiled.info["fallback"].startswith("the C compiler failed: compiled backend: cc failed")
    x = random_pixels(2, prog.input_shape[1:], seed=6)
    assert torch.equal(eng(x), ivit.Engine(prog, backend="reference")(x))
