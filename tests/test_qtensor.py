"""Tests for ``ivit.qtensor``: the straight-through carrier and the data-movement methods (the same integers as
torch's movement ops, the float carrier moved alike, scales kept, per-channel axes protected, and every move
recorded as a program node while tracing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ivit.ir.trace import Tracer
from ivit.qtensor import QTensor, carry


def qt(shape: tuple[int, ...], per_channel: bool = False, track: bool = False, seed: int = 0) -> QTensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, shape, generator=g, dtype=torch.int64).to(torch.int8)
    scale = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5 if per_channel
             else torch.tensor(0.02, dtype=torch.float64))
    value = None
    if track:
        value = (q.to(torch.float32) * scale.to(torch.float32)).requires_grad_(True)
    return QTensor(q, scale, 8, value)


def test_carry_forward_is_exact_and_gradient_is_surrogate() -> None:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(1000, generator=g) * 1e3).requires_grad_(True)
    q = torch.randint(-(2**15), 2**15, (1000,), generator=g, dtype=torch.int32)
    scale = torch.tensor(3.7e-5, dtype=torch.float64)
    out = carry(s * 2.0, q, scale)
    assert torch.equal(out, q.to(torch.float32) * scale.to(torch.float32))
    out.sum().backward()
    assert torch.equal(s.grad, torch.full_like(s, 2.0))


def test_dequantize_per_tensor_and_per_channel() -> None:
    for pc in (False, True):
        x = qt((2, 3, 5), per_channel=pc)
        assert x.per_tensor is not pc
        assert torch.equal(x.dequantize(), x.q.to(torch.float32) * x.scale.to(torch.float32))


MOVES = {
    "reshape_copy_and_infer": (lambda t: t.reshape(0, 3, -1), lambda x: x.reshape(x.shape[0], 3, -1)),
    "reshape_infer_batch": (lambda t: t.reshape(-1, 4, 5), lambda x: x.reshape(-1, 4, 5)),
    "permute": (lambda t: t.permute(0, 2, 1, 3), lambda x: x.permute(0, 2, 1, 3)),
    "roll": (lambda t: t.roll((-1, 2), (1, 2)), lambda x: torch.roll(x, (-1, 2), (1, 2))),
    "pad": (lambda t: t.pad((0, 0, 1, 2, 0, 1)), lambda x: torch.nn.functional.pad(x, (0, 0, 1, 2, 0, 1))),
    "slice": (lambda t: t.slice(2, 1, 3), lambda x: x[:, :, 1:3]),
    "slice_last": (lambda t: t.slice(-1, 2, 4), lambda x: x[..., 2:4]),
    "select": (lambda t: t.select(1, 2), lambda x: x[:, 2]),
}


@pytest.mark.parametrize("name", sorted(MOVES))
def test_moves_equal_torch_on_integers_and_carrier(name: str) -> None:
    move, ref = MOVES[name]
    x = qt((2, 3, 4, 5), track=True)
    out = move(x)
    assert out.q.dtype == torch.int8 and out.bits == 8 and torch.equal(out.scale, x.scale)
    assert torch.equal(out.q, ref(x.q))
    assert torch.equal(out.value, ref(x.value))
    assert out.name is None  # not tracing
    out.value.sum().backward()
    assert x.value.grad is not None and bool((x.value.grad != 0).any())


def test_per_channel_tensors_refuse_moves_of_the_channel_axis() -> None:
    x = qt((2, 3, 6), per_channel=True)
    assert torch.equal(x.reshape(0, 3, 6).q, x.q)  # last axis kept
    assert torch.equal(x.permute(1, 0, 2).q, x.q.permute(1, 0, 2))
    assert torch.equal(x.select(1, 0).q, x.q[:, 0])
    out = x.slice(-1, 2, 5)  # slicing the channel axis slices the scale too
    assert torch.equal(out.q, x.q[..., 2:5]) and torch.equal(out.scale, x.scale[2:5])
    for bad in (lambda t: t.reshape(0, -1), lambda t: t.permute(0, 2, 1), lambda t: t.roll((1,), (-1,)),
                lambda t: t.pad((1, 0)), lambda t: t.select(-1, 0)):
        with pytest.raises(ValueError, match="channel"):
            bad(x)


def test_moves_are_recorded_while_tracing() -> None:
    x = qt((2, 3, 4, 5))
    with Tracer(nn.Identity()) as tracer:
        x.name = "pixels"
        y = x.reshape(0, 12, 5).slice(1, 2, 10).permute(0, 2, 1)
    assert [n.op for n in tracer.nodes] == ["reshape", "slice", "permute"]
    assert tracer.nodes[0].inputs == ("pixels",) and tracer.nodes[0].attrs == {"shape": [0, 12, 5]}
    assert tracer.nodes[1].attrs == {"dim": 1, "start": 2, "end": 10}
    assert tracer.nodes[2].inputs == (tracer.nodes[1].output,) and y.name == tracer.nodes[2].output
    assert tracer.consts == {}
    assert torch.equal(y.q, x.q.reshape(2, 12, 5)[:, 2:10].permute(0, 2, 1))


def test_tracing_an_untraced_input_is_an_error() -> None:
    x = qt((2, 3))
    with Tracer(nn.Identity()), pytest.raises(RuntimeError, match="outside the traced ops"):
        x.reshape(0, 3)
