"""Shared fixtures: small calibrated integer models built from timm modules."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import ivit
from ivit.models.base import QModel

# Many small integer ops: one thread is faster and steadier than two on a busy 2-core machine.
# (test_kernels.py runs the C kernels with two threads explicitly.)
torch.set_num_threads(1)


def random_pixels(batch: int, size: int | tuple[int, int], seed: int = 0, chans: int = 3) -> torch.Tensor:
    """uint8 images with some spatial structure (smooth blobs + noise), so ranges are realistic."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, chans, max(1, h // 4), max(1, w // 4), generator=g)
    img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    img = img + 0.15 * torch.randn(batch, chans, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def make_qmodel(name: str, calib_batches: int = 2, batch: int = 4, seed: int = 0, **kwargs) -> QModel:
    """A calibrated (eval mode) integer model of timm/custom model ``name`` with random init."""
    torch.manual_seed(seed)
    model = ivit.create_model(name, **kwargs)
    q = ivit.quantize(model)
    size = q.img_size
    ivit.calibrate(q, [random_pixels(batch, size, seed=seed + i) for i in range(calib_batches)])
    return q


@pytest.fixture
def qmodel_factory() -> Callable[..., QModel]:
    return make_qmodel


@pytest.fixture(scope="session")
def tiny_vit() -> QModel:
    """Calibrated ``vit_test`` (32x32 input, patch 8, width 32, depth 2)."""
    return make_qmodel("vit_test")
