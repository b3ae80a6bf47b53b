"""Tests for ``ivit.ir.program``: the frozen program, its static validation (``ivit.ir.validate``) and the
``.ivit`` file format (version 2; version 1 still reads).

The file format must round-trip exactly, and every damaged file (truncated at any byte, a flipped
byte in the header or in the tensor data, a wrong version, a pickle in disguise, a random file)
must raise one ``ProgramError`` line: loading never executes anything and never returns a wrong
program.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

import ivit
from ivit.ir import OPSET, Node, Program, ProgramError, load_program, save_program, validate
from ivit.ir import program as program_mod
from ivit.ir.program import FORMAT_VERSION, READABLE_VERSIONS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def tiny_program(seed: int = 0) -> Program:
    """pixels (B, 3, 8, 8) -> 4 patches of 48 -> int8 linear to 5 -> mean over patches: int32 (B, 5)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (5, 48), dtype=torch.int8, generator=g)
    b = torch.randint(-1000, 1000, (5,), dtype=torch.int32, generator=g)
    nodes = [
        Node("patchify", ("pixels",), "p", {}, {"patch": 4}),
        Node("linear", ("p",), "acc", {"weight": "w", "bias": "b"}, {}),
        Node("mean", ("acc",), "logits", {}, {"dim": 1}),
    ]
    meta = {
        "family": "test",
        "model": "tiny",
        "input_shape": [3, 8, 8],
        "num_classes": 5,
        "logit_scale": 0.25,
    }
    return Program(nodes, {"w": w, "b": b}, "pixels", "logits", meta)


def assert_programs_equal(a: Program, b: Program) -> None:
    assert a.nodes == b.nodes
    assert a.input == b.input and a.output == b.output and a.meta == b.meta
    assert set(a.consts) == set(b.consts)
    for k, v in a.consts.items():
        assert b.consts[k].dtype == v.dtype, k
        assert torch.equal(b.consts[k], v), k


def write_raw(path: Path, consts: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path.write_bytes(st_save(consts, metadata=metadata))
    return path


def valid_metadata(graph: str, consts: dict[str, torch.Tensor], **override: str) -> dict[str, str]:
    md = {
        "format": "ivit",
        "format_version": str(FORMAT_VERSION),
        "program": graph,
        "checksum": program_mod._checksum(graph, consts),
    }
    md.update(override)
    return md


@pytest.fixture(scope="module")
def small_real_program() -> Program:
    """A real frozen program, kept small (one block of width 16) so byte-level sweeps stay fast."""
    from conftest import make_qmodel

    return ivit.freeze(make_qmodel("vit_test", embed_dim=16, depth=1))


@pytest.fixture(scope="module")
def swin_program() -> Program:
    """A real Swin program: bool mask constants, roll / pad / add_const nodes."""
    from conftest import make_qmodel

    return ivit.freeze(make_qmodel("swin_test", depths=(2, 1), num_heads=(2, 2)))


# ---------------------------------------------------------------------------------------------
# Round trips


def test_node_json_round_trip() -> None:
    n = Node("matmul", ("a", "b"), "c", {}, {"transpose_b": True})
    assert Node.from_json(json.loads(json.dumps(n.to_json()))) == n
    n2 = Node("requantize", ("x",), "y", {"mult": "m", "shift": "s"}, {"bits": 8})
    assert Node.from_json(n2.to_json()) == n2


def test_save_load_round_trip(tmp_path: Path) -> None:
    prog = tiny_program()
    path = save_program(prog, tmp_path / "t.ivit")
    assert path == tmp_path / "t.ivit"
    assert_programs_equal(prog, load_program(path))
    assert prog.num_parameters() == 5 * 48 + 5 and prog.nbytes() == 5 * 48 + 5 * 4


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_real_program_round_trip(tmp_path: Path, small_real_program: Program, swin_program: Program,
                                 which: str) -> None:
    prog = small_real_program if which == "vit" else swin_program
    loaded = load_program(prog.save(tmp_path / "m.ivit"))
    assert_programs_equal(prog, loaded)
    assert loaded.graph_json() == prog.graph_json() and loaded.format_version == FORMAT_VERSION
    if which == "swin":
        assert any(t.dtype == torch.bool for t in loaded.consts.values())
    from conftest import random_pixels

    x = random_pixels(3, 32, seed=4)
    for backend in ("reference", "cpu"):
        assert torch.equal(ivit.Engine(loaded, backend=backend)(x), ivit.Engine(prog, backend="reference")(x))


def test_file_is_safetensors_with_versioned_program(tmp_path: Path) -> None:
    prog = tiny_program()
    path = prog.save(tmp_path / "t.ivit")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        assert set(f.keys()) == {"w", "b"}
        assert f.get_tensor("w").dtype == torch.int8
    assert md["format"] == "ivit" and md["format_version"] == str(FORMAT_VERSION) == "2"
    assert len(md["checksum"]) == 64 and int(md["checksum"], 16) >= 0
    graph = json.loads(md["program"])
    assert [n["op"] for n in graph["nodes"]] == ["patchify", "linear", "mean"]
    assert graph["meta"]["input_shape"] == [3, 8, 8] and graph["input"] == "pixels"


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "t.ivit"
    path.write_bytes(b"old contents")
    tiny_program().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.ivit"]
    assert_programs_equal(tiny_program(), load_program(path))
    tiny_program(seed=1).save(path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.ivit"]
    assert_programs_equal(tiny_program(seed=1), load_program(path))


def test_failed_save_leaves_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between writing and renaming (here: the rename fails) never leaves a partial file."""
    path = tmp_path / "t.ivit"
    path.write_bytes(b"old contents")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(program_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        tiny_program().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.ivit"]
    assert path.read_bytes() == b"old contents"


def test_save_to_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ivit.IvitError, match="does not exist"):
        tiny_program().save(tmp_path / "nope" / "t.ivit")
    assert not (tmp_path / "nope").exists()


def test_save_refuses_invalid_program(tmp_path: Path) -> None:
    prog = tiny_program()
    prog.consts["w"] = prog.consts["w"].to(torch.float32)
    with pytest.raises(ivit.IvitError, match="non-integer"):
        prog.save(tmp_path / "t.ivit")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Static validation


def _mutated(fn) -> Program:  # noqa: ANN001
    prog = tiny_program()
    fn(prog)
    return prog


CHECK_CASES = {
    "unknown_op": (
        lambda p: p.nodes.__setitem__(2, Node("softmax", ("acc",), "logits", {}, {})),
        "unknown op",
    ),
    "arity": (
        lambda p: p.nodes.__setitem__(1, Node("linear", ("p", "p"), "acc", {"weight": "w"}, {})),
        "expected 1 inputs",
    ),
    "undefined_input": (
        lambda p: p.nodes.__setitem__(1, Node("linear", ("q",), "acc", {"weight": "w"}, {})),
        "not defined",
    ),
    "use_before_def": (lambda p: p.nodes.reverse(), "not defined"),
    "missing_const": (
        lambda p: p.nodes.__setitem__(1, Node("linear", ("p",), "acc", {}, {})),
        "missing constant",
    ),
    "unexpected_const": (
        lambda p: p.nodes.__setitem__(1, Node("linear", ("p",), "acc", {"weight": "w", "scale": "b"}, {})),
        "unexpected constant",
    ),
    "const_not_in_file": (lambda p: p.consts.pop("b"), "missing from the file"),
    "float32_const": (
        lambda p: p.consts.__setitem__("b", p.consts["b"].to(torch.float32)),
        "non-integer dtype",
    ),
    "float16_const": (
        lambda p: p.consts.__setitem__("w", p.consts["w"].to(torch.float16)),
        "non-integer dtype",
    ),
    "float_unused_const": (lambda p: p.consts.__setitem__("scale", torch.tensor(0.5)), "non-integer dtype"),
    "missing_attr": (
        lambda p: p.nodes.__setitem__(0, Node("patchify", ("pixels",), "p", {}, {})),
        "missing attribute",
    ),
    "float_attr": (
        lambda p: p.nodes.__setitem__(0, Node("patchify", ("pixels",), "p", {}, {"patch": 4.0})),
        "not integer",
    ),
    "str_attr": (
        lambda p: p.nodes.__setitem__(2, Node("mean", ("acc",), "logits", {}, {"dim": "1"})),
        "not integer",
    ),
    "float_in_list_attr": (
        lambda p: p.nodes.insert(2, Node("reshape", ("acc",), "r", {}, {"shape": [0, 2.5]})),
        "not integer",
    ),
    "output_never_computed": (lambda p: setattr(p, "output", "nothing"), "never computed"),
    "no_input_shape": (lambda p: p.meta.pop("input_shape"), "input_shape"),
    "bad_input_shape": (lambda p: p.meta.__setitem__("input_shape", [3, 8]), "input_shape"),
    "empty": (lambda p: p.nodes.clear(), "no nodes"),
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_validate_rejects(case: str) -> None:
    """Each defect of an in-memory program is refused by ``validate`` with one line saying what is wrong."""
    fn, match = CHECK_CASES[case]
    with pytest.raises(ProgramError, match=match) as e:
        validate(_mutated(fn))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_damaged_programs_are_never_loaded(tmp_path: Path, case: str) -> None:
    """The same defects in a file (with a valid checksum) are refused by ``load_program``, each in one line."""
    fn, _ = CHECK_CASES[case]
    prog = _mutated(fn)
    graph = prog.graph_json()
    consts = {k: v.contiguous() for k, v in prog.consts.items()}
    path = write_raw(tmp_path / "bad.ivit", consts, valid_metadata(graph, consts))
    with pytest.raises(ProgramError) as e:
        load_program(path)
    assert "\n" not in str(e.value)


def test_validate_accepts_valid_and_real(small_real_program: Program, swin_program: Program) -> None:
    info = validate(tiny_program())
    assert info.output.describe() == "int32(B, 5)" and info.types["p"].describe() == "int8(B, 4, 48)"
    for prog in (small_real_program, swin_program):
        validate(prog)
        assert {n.op for n in prog.nodes} <= set(OPSET)


# ---------------------------------------------------------------------------------------------
# Format 1 (ivit 0.1)


def test_format1_fixtures_load_with_their_version() -> None:
    assert READABLE_VERSIONS == (1, 2)
    for name in ("vit_test", "swin_test"):
        prog = load_program(FIXTURES / f"{name}_v1.ivit")
        assert prog.format_version == 1 and prog.meta["family"] == name.split("_")[0]
        validate(prog)


def test_format1_file_with_a_format2_op_is_refused(tmp_path: Path, small_real_program: Program) -> None:
    """A version-1 file may hold only the ops of version 1 (``layernorm32``, ``shiftmax_rel``, ``attn_normalize``
    came with version 2)."""
    graph = small_real_program.graph_json()
    consts = {k: v.contiguous() for k, v in small_real_program.consts.items()}
    assert {"layernorm32", "shiftmax_rel"} <= {n.op for n in small_real_program.nodes}
    path = write_raw(tmp_path / "v1.ivit", consts, valid_metadata(graph, consts, format_version="1"))
    with pytest.raises(ProgramError, match="format-1"):
        load_program(path)


# ---------------------------------------------------------------------------------------------
# Damaged and hostile files


def test_truncation_at_every_byte_raises(tmp_path: Path, small_real_program: Program) -> None:
    path = small_real_program.save(tmp_path / "m.ivit")
    size = path.stat().st_size
    hlen = int.from_bytes(path.read_bytes()[:8], "little")
    assert 8 + hlen < size  # the sweep crosses the header and the tensor data
    accepted = []
    for off in range(size - 1, -1, -1):  # shrinking truncate: one syscall per offset
        os.truncate(path, off)
        try:
            load_program(path)
            accepted.append(off)
        except ivit.IvitError as e:
            assert "\n" not in str(e)
    assert accepted == []


def _flip_sweep(path: Path, offsets: range) -> list[tuple[int, str]]:
    """Flip the low bit of each byte in ``offsets`` in place (then restore); return accepted offsets
    and the error messages seen."""
    accepted: list[tuple[int, str]] = []
    messages: set[str] = set()
    fd = os.open(path, os.O_RDWR)
    try:
        for off in offsets:
            orig = os.pread(fd, 1, off)
            os.pwrite(fd, bytes([orig[0] ^ 1]), off)
            try:
                load_program(path)
                accepted.append((off, "accepted"))
            except ivit.IvitError as e:
                assert "\n" not in str(e)
                messages.add(str(e).replace(str(path), "<path>"))
            os.pwrite(fd, orig, off)
    finally:
        os.close(fd)
    return accepted + [(-1, m) for m in sorted(messages)]


def test_flipped_header_byte_raises(tmp_path: Path, small_real_program: Program) -> None:
    path = small_real_program.save(tmp_path / "m.ivit")
    hlen = int.from_bytes(path.read_bytes()[:8], "little")
    results = _flip_sweep(path, range(0, 8 + hlen, 3))
    assert [r for r in results if r[0] >= 0] == []
    assert any("checksum" in m for _, m in results)  # flips inside the program JSON string
    load_program(path)  # restored file is fine


def test_flipped_tensor_byte_raises_checksum_error(tmp_path: Path, small_real_program: Program) -> None:
    path = small_real_program.save(tmp_path / "m.ivit")
    data = path.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    results = _flip_sweep(path, range(8 + hlen, len(data), 17))
    assert [r for r in results if r[0] >= 0] == []
    assert [m for _, m in results] == ["corrupt .ivit file (checksum mismatch): <path>"]


def test_corrupt_header_json(tmp_path: Path) -> None:
    data = bytearray(tiny_program().save(tmp_path / "t.ivit").read_bytes())
    data[8] = ord("[")  # header JSON starts with '{'
    (tmp_path / "bad.ivit").write_bytes(bytes(data))
    with pytest.raises(ivit.IvitError, match="not an .ivit file"):
        load_program(tmp_path / "bad.ivit")


@pytest.mark.parametrize("hlen", [0, 2**63 - 1, 2**64 - 1, 10**6])
def test_bad_header_length(tmp_path: Path, hlen: int) -> None:
    data = bytearray(tiny_program().save(tmp_path / "t.ivit").read_bytes())
    data[:8] = hlen.to_bytes(8, "little")
    (tmp_path / "bad.ivit").write_bytes(bytes(data))
    with pytest.raises(ivit.IvitError, match="header"):
        load_program(tmp_path / "bad.ivit")


def test_wrong_format_version(tmp_path: Path) -> None:
    prog = tiny_program()
    graph = prog.graph_json()
    for version in ("0", "3", "1.0", "", "02", " 2"):
        path = write_raw(
            tmp_path / "v.ivit", prog.consts, valid_metadata(graph, prog.consts, format_version=version)
        )
        with pytest.raises(ivit.IvitError, match="unsupported .ivit format version"):
            load_program(path)


def test_not_an_ivit_safetensors_file(tmp_path: Path) -> None:
    prog = tiny_program()
    with pytest.raises(ivit.IvitError, match="no ivit header"):
        load_program(write_raw(tmp_path / "plain.ivit", prog.consts, {}))
    md = valid_metadata(prog.graph_json(), prog.consts, format="onnx")
    with pytest.raises(ivit.IvitError, match="no ivit header"):
        load_program(write_raw(tmp_path / "other.ivit", prog.consts, md))


def test_checksum_missing_or_wrong(tmp_path: Path) -> None:
    prog = tiny_program()
    md = valid_metadata(prog.graph_json(), prog.consts)
    del md["checksum"]
    with pytest.raises(ivit.IvitError, match="checksum"):
        load_program(write_raw(tmp_path / "a.ivit", prog.consts, md))
    other = {**prog.consts, "w": prog.consts["w"].flip(0).contiguous()}
    md = valid_metadata(prog.graph_json(), prog.consts)  # checksum of the original tensors
    with pytest.raises(ivit.IvitError, match="checksum"):
        load_program(write_raw(tmp_path / "b.ivit", other, md))


@pytest.mark.parametrize(
    "graph",
    [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"nodes": [], "input": "pixels"}),
        json.dumps({"nodes": [1], "input": "pixels", "output": "x", "meta": {}}),
        json.dumps({"nodes": [{"op": "mean"}], "input": "pixels", "output": "x", "meta": {}}),
        json.dumps(
            {
                "nodes": [{"op": "mean", "inputs": ["pixels"], "output": "x", "attrs": {"dim": 1}}],
                "input": "pixels",
                "output": "x",
                "meta": {"input_shape": [3, 8]},
            }
        ),
    ],
)
def test_valid_checksum_but_malformed_program(tmp_path: Path, graph: str) -> None:
    """A hand-crafted file with a correct checksum still goes through full validation."""
    consts = tiny_program().consts
    path = write_raw(tmp_path / "m.ivit", consts, valid_metadata(graph, consts))
    with pytest.raises(ivit.IvitError):
        load_program(path)


def test_valid_checksum_but_float_constant(tmp_path: Path) -> None:
    prog = tiny_program()
    consts = {**prog.consts, "b": prog.consts["b"].to(torch.float32)}
    path = write_raw(tmp_path / "f.ivit", consts, valid_metadata(prog.graph_json(), consts))
    with pytest.raises(ivit.IvitError, match="non-integer dtype"):
        load_program(path)


class _Payload:
    """Unpickling this object creates a marker file: proof that something was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_pickle_files_are_rejected_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    (tmp_path / "plain.ivit").write_bytes(pickle.dumps({"program": _Payload(marker)}))
    torch.save({"program": _Payload(marker)}, tmp_path / "zip.ivit")
    for name in ("plain.ivit", "zip.ivit"):
        with pytest.raises(ivit.IvitError):
            load_program(tmp_path / name)
    assert not marker.exists()
    # the payload is real: unpickling it does create the marker
    pickle.loads((tmp_path / "plain.ivit").read_bytes())
    assert marker.exists()


def test_loader_source_has_no_pickle_path() -> None:
    import ivit.backends.engine
    import ivit.ir.validate

    for mod in (program_mod, ivit.backends.engine, sys.modules["ivit.ir.validate"]):
        src = inspect.getsource(mod)
        assert "import pickle" not in src and "torch.load(" not in src and "eval(" not in src


@pytest.mark.parametrize(
    "content", [b"", b"\x00" * 7, b"ivit", b"\x89PNG\r\n\x1a\n" + bytes(200), os.urandom(4096)]
)
def test_non_ivit_files_raise(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.ivit"
    path.write_bytes(content)
    with pytest.raises(ivit.IvitError) as e:
        load_program(path)
    assert "\n" not in str(e.value)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ivit.IvitError, match="no such file"):
        load_program(tmp_path / "missing.ivit")
    with pytest.raises(ivit.IvitError, match="not a file"):
        load_program(tmp_path)
