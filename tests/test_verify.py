"""Tests for ``ivit.verify``: the integer-only proof covers the backend that runs, with three checks.

Each check is shown to fail when it should: a backend with one floating-point aten kernel fails the
aten check; a kernel library with one floating-point instruction fails the native check (found by
disassembly); a program with a float constant fails the static check.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ivit
from conftest import make_qmodel
from ivit import native
from ivit.backends import BACKENDS, Backend, get_backend, register_backend
from ivit.ir.opset import OPSET
from ivit.verify import verify_integer_only

needs_c = pytest.mark.skipif(not native.available(), reason="no C compiler")
needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")


@pytest.fixture(scope="module")
def program() -> ivit.Program:
    return ivit.freeze(make_qmodel("vit_test", depth=1))


@needs_c
@needs_objdump
@pytest.mark.parametrize("backend", [None, "cpu"], ids=["default", "cpu"])
def test_native_backend_proof_has_three_passing_checks(program: ivit.Program, backend: str | None) -> None:
    proof = verify_integer_only(ivit.Engine(program, backend=backend))
    assert proof.backend == (backend or get_backend("fast").name)
    assert proof.ok, proof.summary()
    lines = proof.lines()
    assert lines[0].startswith("static: yes")
    assert lines[1].startswith(f"aten ({proof.backend} backend): yes")
    assert lines[2].startswith("native: yes") and proof.native_used
    assert proof.summary().startswith("integer-only: yes")


def test_reference_backend_proof_runs_no_native_code(program: ivit.Program) -> None:
    proof = verify_integer_only(ivit.Engine(program, backend="reference"))
    assert proof.ok and not proof.native_used
    assert proof.lines()[2].startswith("native: none")
    assert sum(proof.aten_ops.values()) > 50


def _float_gelu_factory(node, consts, ins, out):  # noqa: ANN001, ANN202 - a deliberately wrong kernel
    def fn(x: torch.Tensor) -> torch.Tensor:
        ref = OPSET["shiftgelu"].reference(x, **node.attrs)
        y = torch.nn.functional.gelu(x.to(torch.float32))  # one float op, result thrown away
        return ref + (y * 0).to(torch.int32)
    return fn


def test_a_float_aten_kernel_fails_the_aten_check(program: ivit.Program) -> None:
    b = register_backend(Backend("float-test", ("cpu",), lambda: True, lambda: {"shiftgelu": _float_gelu_factory}))
    try:
        proof = verify_integer_only(ivit.Engine(program, backend=b.name))
    finally:
        BACKENDS.pop(b.name)
    assert not proof.ok and not proof.aten_ok and proof.static_ok
    assert "gelu" in proof.float_ops
    assert "aten (float-test backend): NO" in proof.summary()


def test_a_float_constant_fails_the_static_check(program: ivit.Program) -> None:
    prog = ivit.Program(list(program.nodes), dict(program.consts), program.input, program.output, dict(program.meta))
    eng = ivit.Engine(prog, backend="reference")
    assert eng.executed is prog  # no passes on the reference backend: the proof sees this very program
    key = next(iter(eng.executed.consts))
    eng.executed.consts[key] = eng.executed.consts[key].to(torch.float32)
    proof = verify_integer_only(eng)
    assert not proof.static_ok and not proof.ok
    assert "float32" in proof.summary()


def _build(tmp: Path, code: str) -> Path:
    src = tmp / "k.c"
    src.write_text(code)
    out = tmp / "k.so"
    subprocess.run(["cc", "-O2", "-fPIC", "-shared", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


@needs_objdump
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_disassembly_finds_one_float_operation(tmp_path: Path) -> None:
    clean = _build(tmp_path, "#include <stdint.h>\nint32_t f(int32_t x) { return x * 3 + (x >> 1); }\n")
    assert native.fp_instructions(clean) == []
    dirty = _build(tmp_path, "int f(int x) { return (int)(x * 1.5f); }\n")
    found = native.fp_instructions(dirty)
    assert any(f.startswith("f: ") and ("mulss" in f or "cvt" in f) for f in found), found


@needs_c
@needs_objdump
def test_a_float_instruction_in_the_kernel_library_fails_the_native_check(
        program: ivit.Program, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel library built with one extra float function is rejected by the proof."""
    extra = tmp_path / "zz_float.c"
    extra.write_text("double ivit_bad_kernel(int x) { return x * 0.5; }\n")
    monkeypatch.setenv("IVIT_CACHE", str(tmp_path / "cache"))
    path = native.build_library([*sorted(native.CSRC.glob("*.c")), extra], native._flags(), "ivit_kernels_bad")
    monkeypatch.setattr(native, "library_path", functools.partial(lambda p: p, path))
    proof = verify_integer_only(ivit.Engine(program))
    assert proof.native_used and not proof.native_ok and not proof.ok
    assert any(f.startswith("ivit_bad_kernel:") for f in proof.native_fp), proof.native_fp
    assert "native: NO" in proof.summary()
