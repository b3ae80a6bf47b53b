"""Shared fixtures and helpers: small calibrated integer models built from timm modules, synthetic images,
and quantized test tensors.  Importable from every test folder as ``from conftest import ...``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import ivit
from ivit import ops
from ivit.models.base import QModel
from ivit.qtensor import QTensor

# Many small integer ops: one thread is faster and steadier than two on a busy 2-core machine.
# (tests/backends/test_cpu.py runs the C kernels with two threads explicitly.)
torch.set_num_threads(1)


def random_pixels(batch: int, size: int | tuple[int, int], seed: int = 0, chans: int = 3) -> torch.Tensor:
    """uint8 images with some spatial structure (smooth blobs + noise), so ranges are realistic."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, chans, max(1, h // 4), max(1, w // 4), generator=g)
    img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    img = img + 0.15 * torch.randn(batch, chans, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def make_qmodel(name: str, calib_batches: int = 2, batch: int = 4, seed: int = 0,
                config: ivit.QuantConfig | None = None, **kwargs) -> QModel:
    """A calibrated (eval mode) integer model of timm/custom model ``name`` with random init.

    ``config`` is the ``QuantConfig`` (default ``QuantConfig()``); other keyword arguments go to
    ``ivit.create_model``."""
    torch.manual_seed(seed)
    model = ivit.create_model(name, **kwargs)
    q = ivit.quantize(model, config)
    size = q.img_size
    ivit.calibrate(q, [random_pixels(batch, size, seed=seed + i) for i in range(calib_batches)])
    return q


def quant(x: Tensor, bits: int, track: bool = False) -> QTensor:
    """Symmetric per-tensor quantization of a float tensor (with an STE leaf carrier if ``track``)."""
    scale = x.detach().abs().max().to(torch.float64) / ops.qmax(bits)
    q = ops.quantize_symmetric(x.detach(), scale, bits)
    value = None
    if track:
        value = (q.to(torch.float32) * scale.to(torch.float32)).requires_grad_(True)
    return QTensor(q, scale, bits, value)


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``ref`` in dB."""
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean().clamp(min=1e-30)))


def exact_value(out: QTensor) -> Tensor:
    """``q * scale`` in float32: what the STE carrier's forward value must be."""
    return out.q.to(torch.float32) * out.scale.to(torch.float32)


@pytest.fixture
def qmodel_factory() -> Callable[..., QModel]:
    return make_qmodel


@pytest.fixture(scope="session")
def tiny_vit() -> QModel:
    """Calibrated ``vit_test`` (32x32 input, patch 8, width 32, depth 2)."""
    return make_qmodel("vit_test")


PAYLOAD = "x */ int ivit_pwned(void) { return 42; } /* \\\n??/"


def hostile(prog: ivit.Program) -> ivit.Program:
    """``prog`` with C code in its model name, a constant's name and every value name (all free-form strings
    of a file): generated code must keep them inert (comments), never compile them."""
    names = {n.output: f"{n.output} {PAYLOAD}" for n in prog.nodes}
    cname = {k: f"{k} {PAYLOAD}" for k in prog.consts}
    nodes = [dataclasses.replace(n, output=names[n.output], inputs=tuple(names.get(i, i) for i in n.inputs),
                                 consts={k: cname[v] for k, v in n.consts.items()}) for n in prog.nodes]
    return dataclasses.replace(prog, nodes=nodes, consts={cname[k]: v for k, v in prog.consts.items()},
                               output=names[prog.output], meta={**prog.meta, "model": PAYLOAD, "family": PAYLOAD})
