"""Quantized linear layers: int8 weights x int8 activations -> int32 accumulators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..qtensor import QTensor, carry
from ._run import run

__all__ = ["QLinear", "QPatchEmbed"]


class QLinear(nn.Module):
    """int8 weights (symmetric, per output channel or per tensor) x int8 input -> int32 accumulator.

    ``S_w = max|w| / 127`` (per channel), ``W_int = round(w / S_w)`` (half to even) in
    ``[-127, 127]``; ``bias_int = round(b / (S_w * S_in))`` clamped to ``|b| <= 2**30``.
    Output: ``QTensor(int32 acc, scale S_w * S_in, bits=32)``.  The product runs through the exact
    int8 GEMM of ``ivit.native.gemm`` (same integers as ``ops.int_linear``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 per_channel: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.per_channel = per_channel
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.trunc_normal_(self.weight, std=0.02)

    @classmethod
    def from_float(cls, lin: nn.Linear, per_channel: bool = True) -> QLinear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, per_channel)
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m

    def effective(self) -> tuple[Tensor, Tensor | None]:
        """The float weight and bias this layer quantizes (subclasses reparametrize)."""
        return self.weight, self.bias

    def weight_scale(self) -> Tensor:
        """float64 ``(out,)`` (per channel) or ``()`` weight scale."""
        w = self.effective()[0].detach().to(torch.float64).abs()
        amax = w.amax(dim=1) if self.per_channel else w.max()
        return amax.clamp(min=1e-12) / ops.qmax(8)

    def int_weight(self) -> tuple[Tensor, Tensor]:
        """``(W_int int8 (out, in), S_w)``."""
        s = self.weight_scale()
        sw = s.unsqueeze(1) if self.per_channel else s
        return ops.quantize_symmetric(self.effective()[0].detach(), sw, 8), s

    def int_bias(self, acc_scale: Tensor) -> Tensor | None:
        bias = self.effective()[1]
        if bias is None:
            return None
        b = torch.round(bias.detach().to(torch.float64) / acc_scale.to(bias.device))
        return b.clamp(-(2**30), 2**30).to(torch.int32)

    def forward(self, x: QTensor) -> QTensor:
        if x.bits > 8 or not x.per_tensor:
            raise ValueError("QLinear needs an 8-bit per-tensor input; put a QAct before it")
        w_int, s_w = self.int_weight()
        scale = s_w * x.scale.to(torch.float64)
        b_int = self.int_bias(scale)
        acc, name = run("linear", [x], {"weight": w_int, "bias": b_int})
        value = None
        if x.value is not None:
            w, bias = self.effective()
            sw = (s_w.unsqueeze(1) if self.per_channel else s_w).to(w.device)
            w_fq = carry(w, w_int.to(w.device), sw)
            b_fq = None if bias is None else carry(bias, b_int.to(bias.device), scale.to(bias.device))
            value = carry(F.linear(x.value, w_fq, b_fq), acc, scale.to(acc.device))
        return QTensor(acc, scale, 32, value, name)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, per_channel={self.per_channel}"


class QPatchEmbed(QLinear):
    """Patch embedding on int8 patches ``p - 128`` with the input normalization folded in.

    Keeps the timm conv weight ``w`` (flattened to ``(out, C*p*p)``) as the trainable parameter
    and folds on the fly: ``w' = w / (255 std_c)``, ``b' = b - w @ (mean_c / std_c) + 128 * sum(w')``,
    so that ``linear(p - 128, w', b') == conv((p / 255 - mean) / std)`` in exact arithmetic.
    (Training the folded weights directly would make Adam's steps ~100x too large for them.)
    """

    def __init__(self, in_chans: int, patch: int, out_features: int, mean: tuple[float, ...],
                 std: tuple[float, ...], per_channel: bool = True) -> None:
        super().__init__(in_chans * patch * patch, out_features, True, per_channel)
        self.patch = patch
        mean_t = torch.tensor(mean, dtype=torch.float32).repeat_interleave(patch * patch)
        std_t = torch.tensor(std, dtype=torch.float32).repeat_interleave(patch * patch)
        self.register_buffer("col_scale", 1.0 / (255.0 * std_t))  # (C*p*p,)
        self.register_buffer("col_offset", mean_t / std_t)  # (C*p*p,)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mean: tuple[float, ...], std: tuple[float, ...],
                  per_channel: bool = True) -> QPatchEmbed:
        if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1:
            raise ValueError("patch embedding must be a square conv with stride == kernel size")
        if conv.padding not in ((0, 0), 0, "valid") or conv.dilation != (1, 1):
            raise ValueError("patch embedding conv must have no padding and no dilation")
        m = cls(conv.in_channels, conv.kernel_size[0], conv.out_channels, mean, std, per_channel)
        with torch.no_grad():
            m.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            m.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
        return m

    def effective(self) -> tuple[Tensor, Tensor | None]:
        w = self.weight * self.col_scale
        b = self.bias - self.weight @ self.col_offset + 128.0 * w.sum(dim=1)
        return w, b

    def patchify(self, pixels: QTensor) -> QTensor:
        """uint8 pixels ``(B, C, H, W)`` -> int8 patches ``(B, L, C*p*p)`` (``ops.patchify``), scale 1."""
        q, name = run("patchify", [pixels], attrs={"patch": self.patch})
        track = pixels.value is not None
        return QTensor(q, pixels.scale, 8, q.to(torch.float32) if track else None, name)
