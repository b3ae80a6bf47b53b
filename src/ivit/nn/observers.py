"""Activation range observers: running min/max (EMA), frozen after calibration or QAT."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["RangeObserver", "NotCalibratedError"]


class NotCalibratedError(RuntimeError):
    """A quantized module was run in eval mode before any calibration data reached it."""


class RangeObserver(nn.Module):
    """Running min/max of a float signal; scale ``max(|min|, |max|) / (2**(bits-1) - 1)``.

    First observation sets the range; later ones update ``r <- m * r + (1 - m) * batch``
    (``m = momentum``).  Observes only when ``self.training`` and not ``frozen``.
    """

    def __init__(self, bits: int, momentum: float = 0.95) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("running_min", torch.zeros((), dtype=torch.float64))
        self.register_buffer("running_max", torch.zeros((), dtype=torch.float64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        #: Fixed clipping amax set by PTQ search (overrides the running range when > 0).
        self.register_buffer("clip", torch.zeros((), dtype=torch.float64))

    @property
    def observing(self) -> bool:
        return self.training and not bool(self.frozen)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        if not self.observing:
            return
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError("non-finite activation seen during calibration")
        mn, mx = x.min().to(torch.float64), x.max().to(torch.float64)
        if bool(self.initialized):
            m = self.momentum
            self.running_min.mul_(m).add_((1 - m) * mn)
            self.running_max.mul_(m).add_((1 - m) * mx)
        else:
            self.running_min.copy_(mn)
            self.running_max.copy_(mx)
            self.initialized.fill_(True)

    def amax(self) -> Tensor:
        if not bool(self.initialized):
            raise NotCalibratedError("quantized model used before calibration; run ivit.calibrate first")
        if float(self.clip) > 0:
            return self.clip.clone()
        return torch.maximum(self.running_min.abs(), self.running_max.abs()).clamp(min=1e-8)

    def scale(self) -> Tensor:
        """Output scale (float64 scalar)."""
        return self.amax() / ops.qmax(self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"
