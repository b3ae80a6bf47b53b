"""Shared pieces of the quantized models: the model base class."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..ir import trace
from ..ir.interpret import check_pixels
from ..qtensor import QTensor

__all__ = ["QModel", "check_pixels", "INPUT_NAME"]

#: program value name of the input pixels
INPUT_NAME = "pixels"


class QModel(nn.Module):
    """Base class of the integer models: ``forward(uint8 pixels) -> QTensor`` of int32 logits.

    Subclasses set ``family``, ``meta`` (JSON-able description used by ``freeze``), ``img_size``,
    ``in_chans``, ``patch_size`` and ``config``.  Their ``forward`` is the only description of the
    model: ``ivit.freeze`` traces it into the integer program.
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
        """Validate pixels and wrap them: uint8 ``(B, C, H, W)`` at scale 1 (the program's input value)."""
        check_pixels(pixels, self.in_chans, self.img_size)
        track = self.training and torch.is_grad_enabled()
        one = torch.ones((), dtype=torch.float64)
        name = INPUT_NAME if trace.active() is not None else None
        return QTensor(pixels, one, 8, pixels.to(torch.float32) if track else None, name)

    def logits(self, pixels: Tensor) -> Tensor:
        """int32 logits ``(B, num_classes)`` from the pure integer path (no STE carrier)."""
        with torch.no_grad():
            return self(pixels).q
