"""``QAttention``: multi-head self-attention in integers (with the Swin bias and mask)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import Probs, QuantConfig
from ..qtensor import QTensor, carry
from ._run import run
from .act import QAct
from .linear import QLinear
from .softmax import SCORE_MIN_SCALE, QShiftmax

__all__ = ["QAttention"]


class QAttention(nn.Module):
    """Multi-head self-attention on 8-bit tokens ``(B, N, C)``.

    qkv int8 GEMM -> int32 -> q, k, v int8 ``(B, H, N, d)``; scores ``q k^T`` int32 at scale
    ``S_q S_k / sqrt(d)`` (the ``1/sqrt(d)`` lives in the scale), plus an optional integer bias at that
    scale (Swin's relative position bias), requantized to ``score_bits``; probabilities and ``p @ v``
    (``QShiftmax``; masked positions get probability exactly 0); ``ctx_act`` to int8; output projection.
    """

    def __init__(self, dim: int, num_heads: int, cfg: QuantConfig, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sm_scale = self.head_dim**-0.5
        pc = cfg.per_channel_weights
        self.qkv = QLinear(dim, 3 * dim, True, pc)
        if not qkv_bias:
            with torch.no_grad():
                self.qkv.bias.zero_()
        self.q_act = QAct(cfg.act_bits, cfg.momentum)
        self.k_act = QAct(cfg.act_bits, cfg.momentum)
        self.v_act = QAct(cfg.act_bits, cfg.momentum)
        rel = cfg.probs == Probs.REL8
        self.score_act = QAct(cfg.score_bits, cfg.momentum, min_scale=SCORE_MIN_SCALE if rel else 0.0)
        self.softmax = QShiftmax(cfg.softmax_bits, cfg.shiftmax_n_max, cfg.probs)
        self.ctx_act = QAct(cfg.act_bits, cfg.momentum)
        self.proj = QLinear(dim, dim, True, pc)

    def load_timm(self, qkv: nn.Linear, proj: nn.Linear, gamma: Tensor | None = None) -> None:
        """Copy timm weights (a missing qkv bias becomes zeros; LayerScale ``gamma`` folds into proj)."""
        with torch.no_grad():
            self.qkv.weight.copy_(qkv.weight)
            self.qkv.bias.copy_(qkv.bias if qkv.bias is not None else torch.zeros(qkv.out_features))
            self.proj.weight.copy_(proj.weight)
            self.proj.bias.copy_(proj.bias if proj.bias is not None else torch.zeros(proj.out_features))
            if gamma is not None:
                self.proj.weight.mul_(gamma.unsqueeze(1))
                self.proj.bias.mul_(gamma)

    def score_scale(self, q_scale: Tensor, k_scale: Tensor) -> Tensor:
        return q_scale * k_scale * self.sm_scale

    def rel_bias_int(self, bias: Tensor, score_scale: Tensor) -> Tensor:
        """Integer relative-position bias at the score scale: ``round(bias / S_score)`` (half to even,
        float64, an offline constant), clamped to ``[-2**30, 2**30]`` so that ``scores + bias`` stays
        inside int32 (``|q k^T| <= d * 127**2 < 2**30``).  float ``(H, N, N)`` -> int32 ``(H, N, N)``."""
        b = torch.round(bias.detach().to(torch.float64).cpu() / score_scale.detach().to(torch.float64).cpu())
        return b.clamp(-(2**30), 2**30).to(torch.int32)

    def _heads(self, x: QTensor, n: int) -> QTensor:
        return x.reshape(0, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # (B, H, N, d)

    def forward(self, x: QTensor, rel_bias: Tensor | None = None, mask: Tensor | None = None) -> QTensor:
        """x: 8-bit ``(B, N, C)``; rel_bias: float ``(H, N, N)`` (quantized to the score scale by
        ``rel_bias_int``; its float value is the STE surrogate); mask: bool ``(nW, N, N)`` (True = masked)
        repeating over the batch in blocks of nW.  Returns the int32 accumulator of the output
        projection ``(B, N, C)``."""
        n, c = x.q.shape[1], self.dim
        qkv = self.qkv(x)  # int32 (B, N, 3C), per-channel scale
        q = self._heads(self.q_act(qkv.slice(-1, 0, c)), n)  # int8 (B, H, N, d)
        k = self._heads(self.k_act(qkv.slice(-1, c, 2 * c)), n)
        v = self._heads(self.v_act(qkv.slice(-1, 2 * c, 3 * c)), n)
        s_scale = self.score_scale(q.scale, k.scale)
        sq, sname = run("matmul", [q, k], attrs={"transpose_b": 1})  # int32 (B, H, N, N)
        sv = None
        if q.value is not None:
            sv = q.value @ k.value.transpose(-1, -2) * self.sm_scale
            if rel_bias is not None:
                sv = sv + rel_bias.to(sv.dtype)
        if rel_bias is not None:
            sq, sname = run("add_const", [QTensor(sq, s_scale, 32, None, sname)],
                             {"const": self.rel_bias_int(rel_bias, s_scale)})
        scores = QTensor(sq, s_scale, 32, None if sv is None else carry(sv, sq, s_scale.to(sq.device)), sname)
        ctx = self.softmax(self.score_act(scores), v, mask)  # int32 (B, H, N, d)
        ctx = ctx.permute(0, 2, 1, 3).reshape(0, n, c)  # (B, N, C)
        return self.proj(self.ctx_act(ctx))
