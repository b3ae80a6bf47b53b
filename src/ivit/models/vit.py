"""Integer-only ViT / DeiT (I-ViT), converted from ``timm.models.vision_transformer.VisionTransformer``.

Data flow and widths (B batch, N tokens, C width, H heads, d = C/H):

    uint8 pixels (B,3,H,W) -> patchify int8 (B,L,3pp) -> int8 GEMM -> int32 -> embed (+cls, +pos) int16
    block:  x16 -> I-LN -> int8 -> qkv GEMM int32 -> q,k,v int8 -> q k^T int32 -> int16 scores
            -> probabilities (uint8, relative to the row max) -> p v int32 -> / row sum -> int8
            -> proj GEMM int32 -> add -> x16
            x16 -> I-LN -> int8 -> fc1 int32 -> int8 -> ShiftGELU int32 -> int8 -> fc2 int32 -> add -> x16
    head:   I-LN int8 -> class token -> int8 GEMM (per-tensor weight scale) -> int32 logits
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import IvitError
from ..nn import QAttention, QEmbed, QLayerNorm, QLinear, QMlp, QPatchEmbed, QResidualAdd
from ..qtensor import QTensor
from .base import QModel

__all__ = ["QBlock", "QViT"]


def _check_attention(attn: nn.Module) -> None:
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity) or not isinstance(
            getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise IvitError("attention with q/k norm or inner norm is not supported")


def _check_mlp(mlp: nn.Module) -> None:
    if not isinstance(mlp.act, nn.GELU) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise IvitError(f"MLP activation {type(mlp.act).__name__} is not supported (GELU only)")


class QBlock(nn.Module):
    """Pre-norm transformer block on the 16-bit residual stream."""

    def __init__(self, dim: int, num_heads: int, hidden: int, cfg: QuantConfig, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = QLayerNorm(dim, cfg.act_bits, cfg.momentum, eps, cfg.layernorm)
        self.attn = QAttention(dim, num_heads, cfg)
        self.add1 = QResidualAdd(cfg.residual_bits, cfg.momentum)
        self.norm2 = QLayerNorm(dim, cfg.act_bits, cfg.momentum, eps, cfg.layernorm)
        self.mlp = QMlp(dim, hidden, cfg)
        self.add2 = QResidualAdd(cfg.residual_bits, cfg.momentum)

    @classmethod
    def from_timm(cls, blk: nn.Module, cfg: QuantConfig) -> QBlock:
        _check_attention(blk.attn)
        _check_mlp(blk.mlp)
        dim = blk.norm1.normalized_shape[0]
        m = cls(dim, blk.attn.num_heads, blk.mlp.fc1.out_features, cfg)
        m.norm1 = QLayerNorm.from_float(blk.norm1, cfg.act_bits, cfg.momentum, cfg.layernorm)
        m.norm2 = QLayerNorm.from_float(blk.norm2, cfg.act_bits, cfg.momentum, cfg.layernorm)
        ls1, ls2 = getattr(blk, "ls1", None), getattr(blk, "ls2", None)
        m.attn.load_timm(blk.attn.qkv, blk.attn.proj, getattr(ls1, "gamma", None))
        m.mlp = QMlp(dim, blk.mlp.fc1.out_features, cfg)
        m.mlp.fc1 = QLinear.from_float(blk.mlp.fc1, cfg.per_channel_weights)
        m.mlp.fc2 = QLinear.from_float(blk.mlp.fc2, cfg.per_channel_weights)
        gamma = getattr(ls2, "gamma", None)
        if gamma is not None:  # fold LayerScale into fc2
            with torch.no_grad():
                m.mlp.fc2.weight.mul_(gamma.unsqueeze(1))
                m.mlp.fc2.bias.mul_(gamma)
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
        self.norm = QLayerNorm(embed_dim, cfg.act_bits, cfg.momentum, 1e-6, cfg.layernorm)
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
        m.norm = QLayerNorm.from_float(model.norm, cfg.act_bits, cfg.momentum, cfg.layernorm)
        m.head = QLinear.from_float(model.head, per_channel=False)
        return m

    def forward(self, pixels: Tensor) -> QTensor:
        """uint8 ``(B, 3, H, W)`` -> ``QTensor`` of int32 logits ``(B, num_classes)``."""
        x = self.patch_embed.patchify(self.input_qtensor(pixels))  # int8 (B, L, 3pp)
        x = self.embed(self.patch_embed(x))  # int16 (B, 1+L, C)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)  # int8 (B, 1+L, C)
        return self.head(x.select(1, 0))  # int32 (B, classes)


def _register() -> None:
    from timm.models.vision_transformer import VisionTransformer

    from .factory import register_converter

    register_converter(VisionTransformer)(QViT.from_timm)


_register()
