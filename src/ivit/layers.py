"""Quantized building blocks: modules whose forward computes the exact integer ops of ``ivit.ops``.

Every module takes and returns ``QTensor`` s.  The integer path is the same in training and in
eval; in training (grad enabled) each output also carries a float value whose gradient is the
float surrogate's (straight-through estimator, ``qtensor.carry``).

Each module exposes the integer constants its forward uses (``consts``-style methods) so that
``ivit.freeze`` emits exactly the same numbers into the frozen program.

Activation ranges come from ``RangeObserver`` (running min/max, EMA momentum 0.95), which
updates only in training mode (calibration and QAT) and never once ``frozen``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .qtensor import QTensor, carry

__all__ = [
    "RangeObserver",
    "QAct",
    "QLinear",
    "QPatchEmbed",
    "QLayerNorm",
    "QShiftmax",
    "QShiftGELU",
    "QResidualAdd",
    "QEmbed",
    "NotCalibratedError",
]


def int_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``ops.int_linear`` through the int8 GEMM kernel on CPU (identical integers, much faster for QAT)."""
    if x.device.type == "cpu":
        from .kernels import int_linear_fast

        return int_linear_fast(x, weight, bias)
    return ops.int_linear(x, weight, bias)


def int_matmul(a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
    """``ops.int_matmul`` through the int8 GEMM kernel on CPU (identical integers)."""
    if a.device.type == "cpu":
        from .kernels import int_matmul_fast

        return int_matmul_fast(a, b, transpose_b)
    return ops.int_matmul(a, b, transpose_b)


class NotCalibratedError(RuntimeError):
    """A quantized module was run in eval mode before any calibration data reached it."""


def _f64(x: Tensor | float) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


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


class QAct(nn.Module):
    """Requantize to ``bits`` at an observed scale: ``I_out = requantize(I_in, dyadic(S_in/S_out))``."""

    def __init__(self, bits: int = 8, momentum: float = 0.95) -> None:
        super().__init__()
        self.bits = bits
        self.observer = RangeObserver(bits, momentum)

    def consts(self, in_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mult, shift, out_scale)`` with ``mult / 2**shift ~= in_scale / out_scale``."""
        out_scale = self.observer.scale()
        mult, shift = ops.dyadic(in_scale / out_scale)
        return mult, shift, out_scale

    def forward(self, x: QTensor) -> QTensor:
        self.observer.observe(x.dequantize())
        mult, shift, s = self.consts(x.scale)
        q = ops.requantize(x.q, mult.to(x.q.device), shift.to(x.q.device), self.bits)
        return QTensor(q, s, self.bits, None if x.value is None else carry(x.value, q, s))


class QLinear(nn.Module):
    """int8 weights (symmetric, per output channel or per tensor) x int8 input -> int32 accumulator.

    ``S_w = max|w| / 127`` (per channel), ``W_int = round(w / S_w)`` (half to even) in
    ``[-127, 127]``; ``bias_int = round(b / (S_w * S_in))`` clamped to ``|b| <= 2**30``.
    Output: ``QTensor(int32 acc, scale S_w * S_in, bits=32)``.
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
        b = torch.round(bias.detach().to(torch.float64) / acc_scale)
        return b.clamp(-(2**30), 2**30).to(torch.int32)

    def forward(self, x: QTensor) -> QTensor:
        if x.bits > 8 or not x.per_tensor:
            raise ValueError("QLinear needs an 8-bit per-tensor input; put a QAct before it")
        w_int, s_w = self.int_weight()
        scale = s_w * x.scale.to(torch.float64)
        b_int = self.int_bias(scale)
        acc = int_linear(x.q, w_int.to(x.q.device), None if b_int is None else b_int.to(x.q.device))
        value = None
        if x.value is not None:
            w, bias = self.effective()
            sw = (s_w.unsqueeze(1) if self.per_channel else s_w).to(w.device)
            w_fq = carry(w, w_int.to(w.device), sw)
            b_fq = None if bias is None else carry(bias, b_int.to(bias.device), scale.to(bias.device))
            value = carry(F.linear(x.value, w_fq, b_fq), acc, scale.to(acc.device))
        return QTensor(acc, scale, 32, value)

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
        mean_t = torch.tensor(mean, dtype=torch.float32).repeat_interleave(patch * patch)
        std_t = torch.tensor(std, dtype=torch.float32).repeat_interleave(patch * patch)
        self.register_buffer("col_scale", 1.0 / (255.0 * std_t))  # (C*p*p,)
        self.register_buffer("col_offset", mean_t / std_t)  # (C*p*p,)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mean: tuple[float, ...], std: tuple[float, ...],
                  per_channel: bool = True) -> QPatchEmbed:
        if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1:
            raise ValueError("patch embedding must be a square conv with stride == kernel size")
        m = cls(conv.in_channels, conv.kernel_size[0], conv.out_channels, mean, std, per_channel)
        with torch.no_grad():
            m.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            m.bias.copy_(conv.bias if conv.bias is not None else torch.zeros(conv.out_channels))
        return m

    def effective(self) -> tuple[Tensor, Tensor | None]:
        w = self.weight * self.col_scale
        b = self.bias - self.weight @ self.col_offset + 128.0 * w.sum(dim=1)
        return w, b


class QLayerNorm(nn.Module):
    """I-LayerNorm with gamma/beta folded into per-channel dyadic multipliers, output ``bits`` wide.

    ``b[c] / 2**c[c] ~= gamma[c] * sqrt(C) / 2**20 / S_out``, ``offset[c] = round(beta[c] / S_out)``
    (see ``ops.ilayernorm``).  Input scale does not matter (LayerNorm is scale invariant).
    """

    def __init__(self, dim: int, bits: int = 8, momentum: float = 0.95, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.bits = bits
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.observer = RangeObserver(bits, momentum)

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, bits: int = 8, momentum: float = 0.95) -> QLayerNorm:
        m = cls(ln.normalized_shape[0], bits, momentum, ln.eps)
        with torch.no_grad():
            m.weight.copy_(ln.weight)
            m.bias.copy_(ln.bias)
        return m

    def consts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(mult (C,), shift (C,), offset (C,) int64, out_scale)``."""
        s = self.observer.scale()
        g = self.weight.detach().to(torch.float64).cpu()
        mult, shift = ops.dyadic(g * math.sqrt(self.dim) / 2**ops.LN_Z_BITS / s)
        offset = torch.round(self.bias.detach().to(torch.float64).cpu() / s).to(torch.int64)
        return mult, shift, offset, s

    def forward(self, x: QTensor) -> QTensor:
        if self.observer.observing:
            with torch.no_grad():
                self.observer.observe(F.layer_norm(x.dequantize(), (self.dim,), self.weight, self.bias, self.eps))
        mult, shift, offset, s = self.consts()
        dev = x.q.device
        q = ops.ilayernorm(x.q, mult.to(dev), shift.to(dev), offset.to(dev), self.bits)
        value = None
        if x.value is not None:
            value = carry(F.layer_norm(x.value, (self.dim,), self.weight, self.bias, self.eps), q, s)
        return QTensor(q, s, self.bits, value)


class QShiftmax(nn.Module):
    """Shiftmax over the last dim: input at scale ``S`` (16-bit), output int8 at scale ``2**-(k_out-1)``.

    ``x0 = floor(-1/S)``; ``n`` = the largest shift ``<= n_max`` that bounds the row sum for this
    row length (``ops.choose_shiftmax_n``).
    """

    def __init__(self, k_out: int = 8, n_max: int = 15) -> None:
        super().__init__()
        self.k_out = k_out
        self.n_max = n_max

    def consts(self, in_scale: Tensor, length: int) -> tuple[int, int, Tensor]:
        x0 = ops.shift_exp_x0(float(in_scale))
        n = ops.choose_shiftmax_n(x0, length, self.n_max)
        return x0, n, _f64(2.0 ** -(self.k_out - 1))

    def forward(self, x: QTensor, mask: Tensor | None = None) -> QTensor:
        x0, n, s = self.consts(x.scale, x.q.shape[-1])
        q = ops.shiftmax(x.q, x0, n, self.k_out, mask)
        value = None
        if x.value is not None:
            v = x.value if mask is None else x.value.masked_fill(mask, float("-inf"))
            value = carry(torch.softmax(v, dim=-1), q, s)
        return QTensor(q, s, self.k_out, value)


class QShiftGELU(nn.Module):
    """ShiftGELU ``x * sigmoid(1.702 x)``: 8-bit input at ``S``, int32 output at ``S * 2**-(k-1)``."""

    def __init__(self, k_sig: int = 16, n_max: int = 23) -> None:
        super().__init__()
        self.k_sig = k_sig
        self.n_max = n_max

    def consts(self, in_scale: Tensor) -> tuple[int, int, Tensor]:
        x0 = ops.shift_exp_x0(1.702 * float(in_scale))
        n = ops.choose_shiftgelu_n(x0, self.n_max)
        return x0, n, in_scale.to(torch.float64) * 2.0 ** -(self.k_sig - 1)

    def forward(self, x: QTensor) -> QTensor:
        if not x.per_tensor:
            raise ValueError("QShiftGELU needs a per-tensor input scale")
        x0, n, s = self.consts(x.scale)
        q = ops.shiftgelu(x.q, x0, n, self.k_sig)
        value = None
        if x.value is not None:
            value = carry(x.value * torch.sigmoid(1.702 * x.value), q, s)
        return QTensor(q, s, 32, value)


class QResidualAdd(nn.Module):
    """``a + b`` on the residual stream: both requantized to the observed output scale, ``bits`` wide."""

    def __init__(self, bits: int = 16, momentum: float = 0.95) -> None:
        super().__init__()
        self.bits = bits
        self.observer = RangeObserver(bits, momentum)

    def consts(self, scale_a: Tensor, scale_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        s = self.observer.scale()
        ma, sa = ops.dyadic(scale_a / s)
        mb, sb = ops.dyadic(scale_b / s)
        return ma, sa, mb, sb, s

    def forward(self, a: QTensor, b: QTensor) -> QTensor:
        if self.observer.observing:
            self.observer.observe(a.dequantize() + b.dequantize())
        ma, sa, mb, sb, s = self.consts(a.scale, b.scale)
        dev = a.q.device
        q = ops.add_requantize(a.q, b.q, ma.to(dev), sa.to(dev), mb.to(dev), sb.to(dev), self.bits)
        value = None
        if a.value is not None and b.value is not None:
            value = carry(a.value + b.value, q, s)
        return QTensor(q, s, self.bits, value)


class QEmbed(nn.Module):
    """Patch tokens + optional prefix (class) token + position embedding, on the residual scale.

    Integer constants: ``prefix_int = round((cls + pos[:P]) / S_r)``, ``pos_int = round(pos[P:] / S_r)``,
    ``mult/shift = dyadic(S_acc / S_r)`` (per channel); see ``ops.embed_tokens``.
    """

    def __init__(self, dim: int, num_patches: int, num_prefix: int = 1, bits: int = 16,
                 momentum: float = 0.95) -> None:
        super().__init__()
        self.bits = bits
        self.num_prefix = num_prefix
        self.cls_token = nn.Parameter(torch.zeros(1, num_prefix, dim)) if num_prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix + num_patches, dim))
        self.observer = RangeObserver(bits, momentum)

    def _float_prefix(self) -> Tensor | None:
        if self.cls_token is None:
            return None
        return self.cls_token[0] + self.pos_embed[0, : self.num_prefix]  # (P, C)

    def consts(self, acc_scale: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        s = self.observer.scale()
        m = ops.qmax(self.bits)
        mult, shift = ops.dyadic(acc_scale / s)
        pos = torch.round(self.pos_embed.detach()[0, self.num_prefix:].to(torch.float64).cpu() / s)
        pos = pos.clamp(-m, m).to(torch.int32)
        prefix = None
        fp = self._float_prefix()
        if fp is not None:
            prefix = torch.round(fp.detach().to(torch.float64).cpu() / s).clamp(-m, m).to(torch.int32)
        return mult, shift, prefix, pos, s

    def _float_tokens(self, patches: Tensor) -> Tensor:
        x = patches + self.pos_embed[:, self.num_prefix:]
        fp = self._float_prefix()
        if fp is not None:
            x = torch.cat([fp.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def forward(self, acc: QTensor) -> QTensor:
        if self.observer.observing:
            with torch.no_grad():
                self.observer.observe(self._float_tokens(acc.dequantize()))
        mult, shift, prefix, pos, s = self.consts(acc.scale)
        dev = acc.q.device
        q = ops.embed_tokens(acc.q, mult.to(dev), shift.to(dev), None if prefix is None else prefix.to(dev),
                             pos.to(dev), self.bits)
        value = None if acc.value is None else carry(self._float_tokens(acc.value), q, s)
        return QTensor(q, s, self.bits, value)
