"""Shared pieces of the quantized models: the model base class and the folded patch embedding."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..config import QuantConfig
from ..errors import IvitError
from ..qtensor import QTensor

__all__ = ["QModel", "check_pixels"]


def check_pixels(pixels: Tensor, in_chans: int, img_size: tuple[int, int]) -> None:
    """Reject anything that is not a uint8 ``(B, in_chans, H, W)`` batch of the model's size."""
    if not isinstance(pixels, Tensor):
        raise IvitError(f"expected a torch.Tensor of uint8 pixels, got {type(pixels).__name__}")
    if pixels.dtype != torch.uint8:
        raise IvitError(f"expected uint8 pixels (0..255), got dtype {pixels.dtype}")
    if pixels.dim() != 4 or pixels.shape[1] != in_chans or tuple(pixels.shape[2:]) != tuple(img_size):
        raise IvitError(
            f"expected pixels of shape (B, {in_chans}, {img_size[0]}, {img_size[1]}), got {tuple(pixels.shape)}"
        )
    if pixels.shape[0] == 0:
        raise IvitError("empty batch")


class QModel(nn.Module):
    """Base class of the integer models: ``forward(uint8 pixels) -> QTensor`` of int32 logits.

    Subclasses set ``arch`` (family), ``meta`` (JSON-able description used by ``freeze``),
    ``img_size``, ``in_chans``, ``patch_size`` and ``config``.
    """

    family: str = ""

    def __init__(self, config: QuantConfig, img_size: tuple[int, int], in_chans: int, patch_size: int,
                 num_classes: int, meta: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.img_size = tuple(img_size)
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.meta = meta

    def input_qtensor(self, pixels: Tensor) -> QTensor:
        """Validate pixels and return the int8 patch tensor ``(B, L, C*p*p)`` at scale 1."""
        check_pixels(pixels, self.in_chans, self.img_size)
        x = ops.patchify(pixels, self.patch_size)
        track = self.training and torch.is_grad_enabled()
        one = torch.ones((), dtype=torch.float64)
        return QTensor(x, one, 8, x.to(torch.float32) if track else None)

    def logits(self, pixels: Tensor) -> Tensor:
        """int32 logits ``(B, num_classes)`` from the pure integer path (no STE carrier)."""
        with torch.no_grad():
            return self(pixels).q
