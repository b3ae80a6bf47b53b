"""Tests for ``ivit.ir.validate``: every defect found by hand-editing programs is refused statically.

Each case edits a real frozen ViT or Swin program (and keeps the file's checksum valid, as an editor
would), then checks that ``load_program`` refuses it with one ``ProgramError`` line naming the node,
and that nothing ran.  The untouched programs validate and run with the same integers on every backend.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ivit
from conftest import make_qmodel, random_pixels
from ivit.ir import Limits, Node, Program, ProgramError, load_program, validate
from ivit.ir import program as program_mod


@pytest.fixture(scope="module")
def vit_prog() -> Program:
    return ivit.freeze(make_qmodel("vit_test", depth=1))


@pytest.fixture(scope="module")
def swin_prog() -> Program:
    return ivit.freeze(make_qmodel("swin_test", depths=(2, 1), num_heads=(2, 2)))


def clone(p: Program) -> Program:
    return Program([replace(n, consts=dict(n.consts), attrs=copy.deepcopy(n.attrs)) for n in p.nodes],
                   {k: v.clone() for k, v in p.consts.items()}, p.input, p.output, copy.deepcopy(p.meta))


def first(p: Program, op: str, const: str | None = None) -> int:
    """Index of the first ``op`` node (holding constant ``const``, if given)."""
    return next(i for i, n in enumerate(p.nodes) if n.op == op and (const is None or const in n.consts))


def set_attr(p: Program, op: str, name: str, value: object) -> Program:
    q = clone(p)
    i = first(q, op)
    q.nodes[i] = replace(q.nodes[i], attrs={**q.nodes[i].attrs, name: value})
    return q


def set_const(p: Program, op: str, cname: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Program:
    q = clone(p)
    key = q.nodes[first(q, op, cname)].consts[cname]
    q.consts[key] = fn(q.consts[key])
    return q


def write_signed(prog: Program, path: Path) -> Path:
    """Write ``prog`` as a file with a *valid* checksum, without validating it (a hand edit)."""
    from safetensors.torch import save

    graph = prog.graph_json()
    consts = {k: v.contiguous() for k, v in prog.consts.items()}
    md = {"format": "ivit", "format_version": "2", "program": graph, "checksum": program_mod._checksum(graph, consts)}
    path.write_bytes(save(consts, metadata=md))
    return path


def refused(prog: Program, tmp_path: Path, *words: str) -> str:
    path = write_signed(prog, tmp_path / "edited.ivit")
    with pytest.raises(ProgramError) as e:
        load_program(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("invalid program in")
    for w in words:
        assert w in msg, msg
    return msg


def test_real_programs_validate_and_agree_on_every_backend(vit_prog: Program, swin_prog: Program) -> None:
    for prog, size in ((vit_prog, 32), (swin_prog, 32)):
        info = validate(prog)
        assert info.output.describe() == f"int32(B, {prog.meta['num_classes']})"
        x = random_pixels(3, size, seed=5)
        ref = ivit.Engine(prog, backend="reference")(x)
        assert torch.equal(ivit.Engine(prog, backend="cpu")(x), ref)


# the defects of issue 10, one by one ---------------------------------------------------------

def test_shiftmax_x0_zero_is_refused(swin_prog: Program, tmp_path: Path) -> None:
    refused(set_attr(swin_prog, "shiftmax_rel", "x0", 0), tmp_path, "shiftmax_rel", "x0")


def test_legacy_shiftmax_x0_zero_is_refused(tmp_path: Path) -> None:
    q = ivit.quantize(ivit.create_model("vit_test", depth=1), ivit.QuantConfig(probs="shiftmax8"))
    prog = ivit.freeze(ivit.calibrate(q, [random_pixels(4, 32)]))
    refused(set_attr(prog, "shiftmax", "x0", 0), tmp_path, "(shiftmax)", "x0")
    refused(set_attr(prog, "shiftmax", "n", 10**6), tmp_path, "(shiftmax)", "n")


def test_broadcast_bias_after_scores_is_refused(swin_prog: Program, tmp_path: Path) -> None:
    refused(set_const(swin_prog, "add_const", "const", lambda t: t[:1, :1, :1].clone()), tmp_path, "add_const",
            "shape")


def test_per_channel_mult_with_scalar_shift_is_refused(vit_prog: Program, tmp_path: Path) -> None:
    q = clone(vit_prog)
    i = first(q, "add_requantize")
    n = q.nodes[i]
    c = q.consts[n.consts["mult_b"]].numel()
    q.consts[n.consts["mult_b"]] = q.consts[n.consts["mult_b"]].reshape(-1)[:1].expand(c).contiguous()
    q.consts[n.consts["shift_b"]] = q.consts[n.consts["shift_b"]].reshape(-1)[:1].clone()
    refused(q, tmp_path, "add_requantize", "same shape")


def test_requantize_with_mismatched_constants_is_refused(vit_prog: Program, tmp_path: Path) -> None:
    q = clone(vit_prog)
    i = next(i for i, n in enumerate(q.nodes) if n.op == "requantize" and q.consts[n.consts["mult"]].numel() > 1)
    q.consts[q.nodes[i].consts["shift"]] = q.consts[q.nodes[i].consts["shift"]][:1].clone()
    refused(q, tmp_path, "requantize")


def test_small_mask_is_refused(swin_prog: Program, tmp_path: Path) -> None:
    refused(set_const(swin_prog, "shiftmax_rel", "mask", lambda t: t[:1, :1, :1].clone()), tmp_path, "mask")


def test_int64_constants_are_refused_not_narrowed(vit_prog: Program, tmp_path: Path) -> None:
    refused(set_const(vit_prog, "linear", "bias", lambda t: t.to(torch.int64) + 2**40), tmp_path, "bias", "int32")


def test_column_constants_are_refused(vit_prog: Program, tmp_path: Path) -> None:
    q = clone(vit_prog)
    i = first(q, "layernorm32")
    key = q.nodes[i].consts["offset"]
    q.consts[key] = q.consts[key].reshape(-1, 1).clone()
    refused(q, tmp_path, "offset", "shape")


@pytest.mark.parametrize("shift", [0, -3, 63])
def test_bad_shifts_are_refused(vit_prog: Program, tmp_path: Path, shift: int) -> None:
    refused(set_const(vit_prog, "requantize", "shift", lambda t: torch.full_like(t, shift)), tmp_path, "shift")


def test_patch_zero_and_bad_reshape_are_refused(vit_prog: Program, tmp_path: Path) -> None:
    refused(set_attr(vit_prog, "patchify", "patch", 0), tmp_path, "patch")
    refused(set_attr(vit_prog, "patchify", "patch", 5), tmp_path, "multiple")
    refused(set_attr(vit_prog, "reshape", "shape", [0, 7, 3, 5]), tmp_path, "reshape")
    refused(set_attr(vit_prog, "reshape", "shape", [2, -1, 2, 8]), tmp_path, "batch")


def test_deep_json_and_duplicate_keys_are_refused(vit_prog: Program, tmp_path: Path) -> None:
    q = clone(vit_prog)
    q.meta["deep"] = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
    refused(q, tmp_path, "nested")
    path = write_signed(vit_prog, tmp_path / "dup.ivit")
    graph = vit_prog.graph_json().replace('"attrs": {"patch": 8}', '"attrs": {"patch": 8, "patch": 4}', 1)
    assert '"patch": 4' in graph
    from safetensors.torch import save

    consts = {k: v.contiguous() for k, v in vit_prog.consts.items()}
    md = {"format": "ivit", "format_version": "2", "program": graph, "checksum": program_mod._checksum(graph, consts)}
    path.write_bytes(save(consts, metadata=md))
    with pytest.raises(ProgramError, match="duplicated"):
        load_program(path)


def test_wrong_weight_dtype_is_refused(vit_prog: Program, tmp_path: Path) -> None:
    refused(set_const(vit_prog, "linear", "weight", lambda t: t.to(torch.int16)), tmp_path, "weight", "int8")


def test_output_equal_to_input_and_dead_nodes_are_refused(vit_prog: Program, tmp_path: Path) -> None:
    q = clone(vit_prog)
    q.output = q.input
    refused(q, tmp_path)
    q = clone(vit_prog)
    rq = q.nodes[first(q, "requantize")]
    q.nodes.insert(2, Node("requantize", (q.nodes[1].output,), "dead", dict(rq.consts), {"bits": 8}))
    refused(q, tmp_path, "never used")


@pytest.mark.parametrize("edit", ["pad", "weight", "input", "classes"])
def test_huge_allocations_are_refused(vit_prog: Program, tmp_path: Path, edit: str) -> None:
    if edit == "pad":
        refused(_with_pad(vit_prog, 10**7), tmp_path, "pad")
    elif edit == "weight":
        refused(set_const(vit_prog, "linear", "weight", lambda t: torch.zeros(10**10, 0, dtype=torch.int8)),
                tmp_path, "weight")
    elif edit == "input":
        q = clone(vit_prog)
        q.meta["input_shape"] = [3, 10**5, 10**5]
        refused(q, tmp_path, "limits")
    else:
        q = clone(vit_prog)
        q.meta["num_classes"] = 10**9
        refused(q, tmp_path, "num_classes")


def _with_pad(p: Program, amount: int) -> Program:
    q = clone(p)
    i = first(q, "layernorm32")
    pad = Node("pad", (q.nodes[i].output,), "padded", {}, {"pads": [0, 0, 0, amount]})
    q.nodes.insert(i + 1, pad)
    nxt = q.nodes[i + 2]
    q.nodes[i + 2] = replace(nxt, inputs=tuple("padded" if v == q.nodes[i].output else v for v in nxt.inputs))
    return q


def test_activation_limit_is_checked_and_can_be_raised(vit_prog: Program) -> None:
    info = validate(vit_prog)
    with pytest.raises(ProgramError, match="bytes per image"):
        validate(vit_prog, Limits(max_activation_bytes=info.peak_bytes_per_image - 1))
    validate(vit_prog, Limits(max_activation_bytes=info.peak_bytes_per_image))
    eng = ivit.Engine(vit_prog, limits=Limits(max_run_bytes=2 * info.peak_bytes_per_image))
    eng(random_pixels(2, 32))
    with pytest.raises(ivit.IvitError, match="max_run_bytes"):
        eng(random_pixels(3, 32))


def test_limits_overrides() -> None:
    lim = Limits().with_overrides(["max_nodes=10", "max_const_bytes=8e9"])
    assert lim.max_nodes == 10 and lim.max_const_bytes == 8 * 10**9
    for bad in ["nodes=3", "max_nodes", "max_nodes=x", "max_nodes=0", "max_nodes=inf"]:
        with pytest.raises(ProgramError):
            Limits().with_overrides([bad])


def test_engine_device_and_input_errors_are_ivit_errors(vit_prog: Program) -> None:
    with pytest.raises(ivit.IvitError):
        ivit.Engine(vit_prog, device="nonsense")
    with pytest.raises(ivit.IvitError):
        ivit.Engine(vit_prog, backend="nonsense")
    with pytest.raises(ivit.IvitError):
        ivit.Engine(vit_prog)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device="meta"))
