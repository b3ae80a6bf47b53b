"""Integer-only ViT / DeiT (I-ViT), converted from ``timm.models.vision_transformer.VisionTransformer``.

Data flow and widths (B batch, N tokens, C width, H heads, d = C/H):

    uint8 pixels (B,3,H,W) -> patchify int8 (B,L,3pp) -> int8 GEMM -> int32 -> embed (+cls, +pos) int16
    block:  x16 -> I-LN -> int8 -> qkv GEMM int32 -> q,k,v int8 -> q k^T int32 -> int16 scores
            -> Shiftmax int8 probs -> probs v int32 -> int8 -> proj GEMM int32 -> add -> x16
            x16 -> I-LN -> int8 -> fc1 int32 -> int8 -> ShiftGELU int32 -> int8 -> fc2 int32 -> add -> x16
    head:   I-LN int8 -> class token -> int8 GEMM (per-tensor weight scale) -> int32 logits
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import IvitError
from ..layers import QAct, QEmbed, QLayerNorm, QLinear, QPatchEmbed, QResidualAdd, QShiftGELU, QShiftmax, int_matmul
from ..qtensor import QTensor, carry
from .base import QModel

__all__ = ["QAttention", "QMlp", "QBlock", "QViT"]


def _chunk(x: QTensor, i: int, n: int) -> QTensor:
    """The i-th of n equal chunks of the last dimension (keeps per-channel scales aligned)."""
    c = x.q.shape[-1] // n
    sl = slice(i * c, (i + 1) * c)
    scale = x.scale if x.per_tensor else x.scale[sl]
    return QTensor(x.q[..., sl], scale, x.bits, None if x.value is None else x.value[..., sl])


class QAttention(nn.Module):
    """Multi-head self-attention in integers (optionally with an additive bias and a mask, for Swin).

    Scores ``q k^T`` are int32 at scale ``S_q S_k / sqrt(d)`` (the ``1/sqrt(d)`` lives in the scale);
    an optional integer bias at that scale is added (``rel_bias``), then they are requantized to
    ``score_bits`` and fed to Shiftmax; masked positions get probability exactly 0.
    """

    def __init__(self, dim: int, num_heads: int, cfg: QuantConfig) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sm_scale = self.head_dim**-0.5
        pc = cfg.per_channel_weights
        self.qkv = QLinear(dim, 3 * dim, True, pc)
        self.q_act = QAct(cfg.act_bits, cfg.momentum)
        self.k_act = QAct(cfg.act_bits, cfg.momentum)
        self.v_act = QAct(cfg.act_bits, cfg.momentum)
        self.score_act = QAct(cfg.score_bits, cfg.momentum)
        self.softmax = QShiftmax(cfg.softmax_bits, cfg.shiftmax_n_max)
        self.ctx_act = QAct(cfg.act_bits, cfg.momentum)
        self.proj = QLinear(dim, dim, True, pc)

    @classmethod
    def from_timm(cls, attn: nn.Module, cfg: QuantConfig, ls: nn.Module | None = None) -> QAttention:
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(getattr(attn, "norm", nn.Identity()),
                                                                      nn.Identity):
            raise IvitError("attention with q/k norm or inner norm is not supported")
        m = cls(attn.qkv.in_features, attn.num_heads, cfg)
        m.qkv = QLinear.from_float(attn.qkv, cfg.per_channel_weights)
        if m.qkv.bias is None:  # keep the module shape fixed: a zero bias
            m.qkv.bias = nn.Parameter(torch.zeros(m.qkv.out_features))
        m.proj = QLinear.from_float(attn.proj, cfg.per_channel_weights)
        gamma = getattr(ls, "gamma", None)
        if gamma is not None:  # fold LayerScale into the output projection
            with torch.no_grad():
                m.proj.weight.mul_(gamma.unsqueeze(1))
                m.proj.bias.mul_(gamma)
        return m

    def heads(self, x: QTensor) -> QTensor:
        b, n, _ = x.q.shape
        return x.map(lambda t: t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2))  # (B,H,N,d)

    def score_scale(self, q_scale: Tensor, k_scale: Tensor) -> Tensor:
        return q_scale * k_scale * self.sm_scale

    def rel_bias_int(self, bias: Tensor, score_scale: Tensor) -> Tensor:
        """Integer relative-position bias at the score scale: ``round(bias / S_score)`` (half to even,
        float64, offline-style constant), clamped to ``[-2**30, 2**30]`` so that ``scores + bias`` stays
        inside int32 (``|q k^T| <= d * 127**2 < 2**30``).  float ``(H, N, N)`` -> int32 ``(H, N, N)``."""
        b = torch.round(bias.detach().to(torch.float64).cpu() / score_scale.detach().to(torch.float64).cpu())
        return b.clamp(-(2**30), 2**30).to(torch.int32)

    def forward(self, x: QTensor, rel_bias: Tensor | None = None, mask: Tensor | None = None) -> QTensor:
        """x: 8-bit ``(B, N, C)``; rel_bias: float ``(H, N, N)`` (quantized to the score scale by
        ``rel_bias_int``; its float value is the STE surrogate); mask: bool ``(nW, N, N)`` (True = masked)
        repeating over the batch in blocks of nW.  Returns the int32 accumulator of the output
        projection ``(B, N, C)``."""
        b, n, c = x.q.shape
        qkv = self.qkv(x)  # int32 (B, N, 3C), per-channel scale
        q = self.heads(self.q_act(_chunk(qkv, 0, 3)))  # int8 (B, H, N, d)
        k = self.heads(self.k_act(_chunk(qkv, 1, 3)))
        v = self.heads(self.v_act(_chunk(qkv, 2, 3)))
        s_scale = self.score_scale(q.scale, k.scale)
        scores = int_matmul(q.q, k.q, transpose_b=True)  # int32 (B, H, N, N)
        if rel_bias is not None:
            bias_int = self.rel_bias_int(rel_bias, s_scale).to(scores.device)
            scores = (scores.to(torch.int64) + bias_int.to(torch.int64)).to(torch.int32)
        sv = None
        if q.value is not None:
            sv = q.value @ k.value.transpose(-1, -2) * self.sm_scale
            if rel_bias is not None:
                sv = sv + rel_bias.to(sv.dtype)
            sv = carry(sv, scores, s_scale)
        s16 = self.score_act(QTensor(scores, s_scale, 32, sv))
        full_mask = None
        if mask is not None:
            nw = mask.shape[0]
            full_mask = mask.view(1, nw, 1, n, n).expand(b // nw, nw, self.num_heads, n, n).reshape(
                b, self.num_heads, n, n)
        p = self.softmax(s16, full_mask)  # int8 probabilities (B, H, N, N), scale 2^-7
        ctx = int_matmul(p.q, v.q)  # int32 (B, H, N, d)
        c_scale = p.scale * v.scale
        cv = None if p.value is None else carry(p.value @ v.value, ctx, c_scale)
        ctx_q = QTensor(ctx, c_scale, 32, cv).map(lambda t: t.transpose(1, 2).reshape(b, n, c))  # (B,N,C)
        return self.proj(self.ctx_act(ctx_q))


class QMlp(nn.Module):
    """fc1 -> int8 -> ShiftGELU -> int8 -> fc2 (int32 accumulator out)."""

    def __init__(self, dim: int, hidden: int, cfg: QuantConfig) -> None:
        super().__init__()
        pc = cfg.per_channel_weights
        self.fc1 = QLinear(dim, hidden, True, pc)
        self.act_in = QAct(cfg.act_bits, cfg.momentum)
        self.gelu = QShiftGELU(cfg.gelu_sigmoid_bits, cfg.shiftgelu_n_max)
        self.act_out = QAct(cfg.act_bits, cfg.momentum)
        self.fc2 = QLinear(hidden, dim, True, pc)

    @classmethod
    def from_timm(cls, mlp: nn.Module, cfg: QuantConfig, ls: nn.Module | None = None) -> QMlp:
        if not isinstance(mlp.act, nn.GELU) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise IvitError(f"MLP activation {type(mlp.act).__name__} is not supported (GELU only)")
        m = cls(mlp.fc1.in_features, mlp.fc1.out_features, cfg)
        m.fc1 = QLinear.from_float(mlp.fc1, cfg.per_channel_weights)
        m.fc2 = QLinear.from_float(mlp.fc2, cfg.per_channel_weights)
        gamma = getattr(ls, "gamma", None)
        if gamma is not None:
            with torch.no_grad():
                m.fc2.weight.mul_(gamma.unsqueeze(1))
                m.fc2.bias.mul_(gamma)
        return m

    def forward(self, x: QTensor) -> QTensor:
        return self.fc2(self.act_out(self.gelu(self.act_in(self.fc1(x)))))


class QBlock(nn.Module):
    """Pre-norm transformer block on the 16-bit residual stream."""

    def __init__(self, dim: int, num_heads: int, hidden: int, cfg: QuantConfig) -> None:
        super().__init__()
        self.norm1 = QLayerNorm(dim, cfg.act_bits, cfg.momentum)
        self.attn = QAttention(dim, num_heads, cfg)
        self.add1 = QResidualAdd(cfg.residual_bits, cfg.momentum)
        self.norm2 = QLayerNorm(dim, cfg.act_bits, cfg.momentum)
        self.mlp = QMlp(dim, hidden, cfg)
        self.add2 = QResidualAdd(cfg.residual_bits, cfg.momentum)

    @classmethod
    def from_timm(cls, blk: nn.Module, cfg: QuantConfig) -> QBlock:
        dim = blk.norm1.normalized_shape[0]
        m = cls(dim, blk.attn.num_heads, blk.mlp.fc1.out_features, cfg)
        m.norm1 = QLayerNorm.from_float(blk.norm1, cfg.act_bits, cfg.momentum)
        m.norm2 = QLayerNorm.from_float(blk.norm2, cfg.act_bits, cfg.momentum)
        m.attn = QAttention.from_timm(blk.attn, cfg, getattr(blk, "ls1", None))
        m.mlp = QMlp.from_timm(blk.mlp, cfg, getattr(blk, "ls2", None))
        return m

    def forward(self, x: QTensor) -> QTensor:
        x = self.add1(x, self.attn(self.norm1(x)))
        return self.add2(x, self.mlp(self.norm2(x)))


class QViT(QModel):
    """Integer-only Vision Transformer (class-token pooling), input uint8 pixels, output int32 logits."""

    family = "vit"

    def __init__(self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, num_classes: int,
                 embed_dim: int, depth: int, num_heads: int, mlp_hidden: int,
                 mean: tuple[float, ...], std: tuple[float, ...], cfg: QuantConfig) -> None:
        meta = dict(img_size=list(img_size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                    embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_hidden=mlp_hidden,
                    mean=list(mean), std=list(std))
        super().__init__(cfg, img_size, in_chans, patch_size, num_classes, meta)
        num_patches = (img_size[0] // patch_size) * (img_size[1] // patch_size)
        self.patch_embed = QPatchEmbed(in_chans, patch_size, embed_dim, mean, std, cfg.per_channel_weights)
        self.embed = QEmbed(embed_dim, num_patches, 1, cfg.residual_bits, cfg.momentum)
        self.blocks = nn.ModuleList([QBlock(embed_dim, num_heads, mlp_hidden, cfg) for _ in range(depth)])
        self.norm = QLayerNorm(embed_dim, cfg.act_bits, cfg.momentum)
        self.head = QLinear(embed_dim, num_classes, True, per_channel=False)

    @classmethod
    def from_timm(cls, model: nn.Module, cfg: QuantConfig | None = None) -> QViT:
        """Convert a timm ``VisionTransformer`` (weights copied; the float model is left untouched)."""
        cfg = cfg or QuantConfig()
        if getattr(model, "global_pool", "token") != "token" or getattr(model, "cls_token", None) is None:
            raise IvitError("only class-token ViTs are supported (global_pool='token')")
        if getattr(model, "reg_token", None) is not None or getattr(model, "no_embed_class", False):
            raise IvitError("register tokens / no_embed_class ViTs are not supported")
        if getattr(model, "dynamic_img_size", False):
            raise IvitError("dynamic_img_size ViTs are not supported")
        for name in ("norm_pre", "fc_norm"):
            if not isinstance(getattr(model, name, nn.Identity()), nn.Identity):
                raise IvitError(f"ViT with {name} is not supported")
        if getattr(model, "head_dist", None) is not None:
            raise IvitError("distilled ViTs (two heads) are not supported")
        pe = model.patch_embed
        if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity):
            raise IvitError("patch-embedding norm is not supported")
        if not isinstance(model.head, nn.Linear):
            raise IvitError("the classifier must be a Linear layer (num_classes > 0)")
        conv = pe.proj
        p = conv.kernel_size[0]
        if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1]:
            raise IvitError("patch embedding must be a square conv with stride == kernel size")
        if any(s % p for s in pe.img_size):
            raise IvitError(f"image size {tuple(pe.img_size)} is not a multiple of the patch size {p}")
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(pcfg.get("std", (0.229, 0.224, 0.225)))
        blk0 = model.blocks[0]
        m = cls(img_size=tuple(pe.img_size), patch_size=p, in_chans=conv.in_channels,
                num_classes=model.head.out_features, embed_dim=model.embed_dim, depth=len(model.blocks),
                num_heads=blk0.attn.num_heads, mlp_hidden=blk0.mlp.fc1.out_features, mean=mean, std=std, cfg=cfg)
        m.patch_embed = QPatchEmbed.from_conv(conv, mean, std, cfg.per_channel_weights)
        with torch.no_grad():
            m.embed.cls_token.copy_(model.cls_token)
            m.embed.pos_embed.copy_(model.pos_embed)
        m.blocks = nn.ModuleList([QBlock.from_timm(b, cfg) for b in model.blocks])
        m.norm = QLayerNorm.from_float(model.norm, cfg.act_bits, cfg.momentum)
        m.head = QLinear.from_float(model.head, per_channel=False)
        return m

    def forward(self, pixels: Tensor) -> QTensor:
        """uint8 ``(B, 3, H, W)`` -> ``QTensor`` of int32 logits ``(B, num_classes)``."""
        x = self.input_qtensor(pixels)  # int8 (B, L, 3pp)
        x = self.embed(self.patch_embed(x))  # int16 (B, 1+L, C)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)  # int8 (B, 1+L, C)
        return self.head(x.map(lambda t: t[:, 0]))  # int32 (B, classes)

