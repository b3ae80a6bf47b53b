"""Integer-only relative-position ViT, converted from ``timm.models.vision_transformer_relpos.VisionTransformerRelPos``.

The same integer model as ``ivit.models.vit.QViT`` (no absolute position embedding: a zero constant), with a
relative-position bias added to the attention scores.  The bias is a float function of constants only (the
``RelPosBias`` table gathered by a fixed index, or the ``RelPosMlp`` of fixed log-spaced coordinates), so it
is computed in float offline, ``(H, N, N)``, and quantized to each block's score scale by
``QAttention.rel_bias_int`` (``round(bias / S_score)``), then added in int32 before the scores are requantized
(the Swin path).  The generators stay float modules (``EvalOnly``: never dropout) so that QAT trains them.
"""

from __future__ import annotations

import copy

from torch import nn

from ..config import QuantConfig
from ..errors import IvitError
from .vit import (
    EvalOnly,
    QBlock,
    QViT,
    _layerscale_reason,
    act_kind,
    head_reason,
    mlp_from,
    mlp_reason,
    norm_reason,
    trunk_reason,
)

__all__ = ["check_supported", "from_timm"]


def _rel_pos_reason(mod: nn.Module | None, tokens: int, where: str) -> str | None:
    from timm.layers import RelPosBias, RelPosMlp

    if mod is None:
        return None
    if type(mod) not in (RelPosBias, RelPosMlp):
        return f"{where}: relative position {type(mod).__name__} is not supported"
    area = mod.window_area + mod.prefix_tokens
    if area != tokens:
        return f"{where}: relative position bias for {area} tokens, the model has {tokens}"
    return None


def _block_reason(blk: nn.Module, dim: int, tokens: int, where: str) -> str | None:
    from timm.models.vision_transformer_relpos import RelPosBlock

    if type(blk) is not RelPosBlock:
        return (f"{where}: {type(blk).__name__} is not supported (pre-norm RelPosBlock only; no post-norm "
                "residual)")
    attn = blk.attn
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        return f"{where}.attn: q/k norm (qk_norm) is not supported"
    if attn.head_dim * attn.num_heads != dim or attn.qkv.out_features != 3 * dim or attn.proj.out_features != dim:
        return f"{where}.attn: attention with head_dim * num_heads != dim is not supported"
    return (norm_reason(blk.norm1, f"{where}.norm1", False) or norm_reason(blk.norm2, f"{where}.norm2", False)
            or _rel_pos_reason(attn.rel_pos, tokens, f"{where}.attn.rel_pos") or mlp_reason(blk.mlp, f"{where}.mlp")
            or _layerscale_reason(blk.ls1, f"{where}.ls1") or _layerscale_reason(blk.ls2, f"{where}.ls2"))


def check_supported(model: nn.Module) -> str | None:
    """Why a timm ``VisionTransformerRelPos`` cannot be quantized, in one line (None: it can).  Structural."""
    r = trunk_reason(model)
    if r:
        return r
    prefix = model.num_prefix_tokens
    tokens = prefix + model.patch_embed.num_patches
    r = _rel_pos_reason(model.shared_rel_pos, tokens, "shared_rel_pos")
    if r:
        return r
    for i, blk in enumerate(model.blocks):
        r = _block_reason(blk, model.embed_dim, tokens, f"blocks.{i}")
        if r:
            return r
    return head_reason(model, prefix, tokens, model.embed_dim)


def from_timm(model: nn.Module, cfg: QuantConfig | None = None) -> QViT:
    """Convert a timm ``VisionTransformerRelPos`` (weights copied, bias generators deep-copied)."""
    cfg = cfg or QuantConfig()
    r = check_supported(model)
    if r:
        raise IvitError(r)
    blk0 = model.blocks[0]
    m = QViT.empty_like(model, cfg, num_heads=blk0.attn.num_heads, mlp_hidden=blk0.mlp.fc1.out_features,
                        eps=blk0.norm1.eps, quick_gelu=act_kind(blk0.mlp.act) == "quick_gelu")
    m.family = "vit_relpos"
    m.load_common(model, cfg)
    blocks = []
    for b in model.blocks:
        qb = QBlock(model.embed_dim, b.attn.num_heads, b.mlp.fc1.out_features, cfg, b.norm1.eps)
        qb.load_norms(b.norm1, b.norm2, cfg)
        qb.attn.load_timm(b.attn.qkv, b.attn.proj, getattr(b.ls1, "gamma", None))
        qb.mlp = mlp_from(b.mlp, cfg, getattr(b.ls2, "gamma", None))
        if b.attn.rel_pos is not None:
            qb.rel_pos = EvalOnly(copy.deepcopy(b.attn.rel_pos))
        blocks.append(qb)
    m.blocks = nn.ModuleList(blocks)
    if model.shared_rel_pos is not None:
        m.shared_rel_pos = EvalOnly(copy.deepcopy(model.shared_rel_pos))
    return m


def _register() -> None:
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    from .factory import register_converter

    register_converter(VisionTransformerRelPos)(from_timm)


_register()
