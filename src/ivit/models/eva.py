"""Integer-only rotary (RoPE) ViTs and EVA, converted from ``timm.models.eva.Eva``.

The model is ``ivit.models.vit.QViT`` with a rotary attention (``QRopeAttention``) in every block.  RoPE
rotates each pair of query/key channels by a constant angle that depends on the token's position only:
``q' = q * cos + rot(q) * sin`` with ``rot`` swapping the two channels of a pair and negating one.  In
integers (``QRope``), per position ``n`` and channel ``j`` of a head:

    swap = roll(q viewed as (..., d/2, 2), 1)     (interleaved pairs; halves: (..., 2, d/2))   data movement
    q'   = add_requantize(q, swap, dyadic(cos[n,j] S_q / S_out), dyadic(+-sin[n,j] S_q / S_out), 8 bits)

i.e. two multiplies by quantized constants (31-bit dyadic multipliers, the sign of ``rot`` folded into the
sine's), each rounded half up, summed and clamped once - exact integer arithmetic of the op set
(``add_requantize`` with per-channel constants over the flattened ``(N*d)`` or, for per-head tables (RoPE-Mixed),
``(H*N*d)`` axis).  Prefix (class/register) tokens are not rotated: their rows have ``cos = 1, sin = 0``.
``S_out`` is observed like every activation.  The tables come from timm's own rotary module in eval mode
(no train-time coordinate augmentation), kept as a float generator so that RoPE-Mixed's learned
frequencies still train in QAT.

Refused (one line each, ``check_supported``): SwiGLU/GLU MLPs (EVA-02, DINOv3-H/7B, ...), RmsNorm, q/k norm,
normalization inside attention (``scale_attn_inner``), grouped-query attention, post-norm blocks, gates.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .. import ops
from ..config import QuantConfig
from ..errors import IvitError
from ..nn import QAttention
from ..nn._run import run
from ..nn.observers import RangeObserver
from ..qtensor import QTensor, carry
from .vit import (
    EvalOnly,
    QBlock,
    QViT,
    act_kind,
    head_reason,
    linear_from,
    mlp_from,
    mlp_reason,
    norm_reason,
    trunk_reason,
)

__all__ = ["QRope", "QRopeAttention", "QRopeViT", "check_supported", "from_timm"]

_ROPES = ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMixed")


def _dyadic_channels(ratio: Tensor) -> tuple[Tensor, Tensor]:
    """``ops.dyadic`` per channel, with the shift of an exact-zero ratio (``sin = 0``: prefix rows, angle 0) set to
    31 instead of 1: the product is 0 either way, and the op set's static bound (largest multiplier over the
    smallest shift) stays that of the nonzero channels."""
    m, s = ops.dyadic(ratio)
    return m, torch.where(m == 0, torch.full_like(s, 31), s)


class QRope(nn.Module):
    """Rotary position embedding of int8 ``(B, H, N, d)`` queries or keys (see the module docstring).

    ``half``: timm's ``rotate_half`` layout (channel ``j`` pairs with ``j + d/2``); else interleaved pairs
    ``(2i, 2i+1)``.  Output int8 at an observed scale.
    """

    def __init__(self, half: bool, bits: int = 8, momentum: float = 0.95) -> None:
        super().__init__()
        self.half = half
        self.bits = bits
        self.observer = RangeObserver(bits, momentum)

    def _swap(self, x: QTensor) -> QTensor:
        h, n, d = x.q.shape[1:]
        if self.half:  # (B, H, N, 2, d/2): swap the halves
            return x.reshape(0, h, n, 2, d // 2).roll((1,), (3,)).reshape(0, h, n, d)
        return x.reshape(0, h, n, d // 2, 2).roll((1,), (4,)).reshape(0, h, n, d)  # swap within each pair

    def signed_sin(self, sin: Tensor) -> Tensor:
        """``sin`` with the sign of ``rot`` folded in: ``rot(x) = sign * swap(x)``."""
        d = sin.shape[-1]
        sign = torch.ones(d, dtype=sin.dtype, device=sin.device)
        if self.half:
            sign[: d // 2] = -1
        else:
            sign[0::2] = -1
        return sin * sign

    def forward(self, x: QTensor, sin: Tensor, cos: Tensor) -> QTensor:
        """x: int8 ``(B, H, N, d)``; ``sin``/``cos`` float ``(N, d)`` or per head ``(H, N, d)``."""
        if not x.per_tensor:
            raise ValueError("QRope needs a per-tensor input")
        h, n, d = x.q.shape[1:]
        sw = self._swap(x)
        ssin = self.signed_sin(sin)
        if self.observer.observing:
            with torch.no_grad():
                self.observer.observe(x.dequantize() * cos.float() + sw.dequantize() * ssin.float())
        s = self.observer.scale()
        ratio = float(x.scale) / float(s)  # offline constants on the CPU, whatever the model's device
        per_head = cos.dim() == 3
        flat = (0, -1) if per_head else (0, h, -1)  # (B, H*N*d) or (B, H, N*d): per-channel constants
        ma, sa = _dyadic_channels(cos.detach().to(torch.float64).cpu().reshape(-1) * ratio)
        mb, sb = _dyadic_channels(ssin.detach().to(torch.float64).cpu().reshape(-1) * ratio)
        q, name = run("add_requantize", [x.reshape(*flat), sw.reshape(*flat)],
                      {"mult_a": ma, "shift_a": sa, "mult_b": mb, "shift_b": sb}, {"bits": self.bits})
        value = None
        if x.value is not None:
            f = x.value * cos.to(x.value.dtype) + sw.value * ssin.to(x.value.dtype)
            value = carry(f.reshape(q.shape), q, s)
        return QTensor(q, s, self.bits, value, name).reshape(0, h, n, d)

    def extra_repr(self) -> str:
        return f"half={self.half}, bits={self.bits}"


class QRopeAttention(QAttention):
    """``QAttention`` with the rotary embedding applied to the int8 queries and keys (``QRope``)."""

    def __init__(self, dim: int, num_heads: int, cfg: QuantConfig, half: bool) -> None:
        super().__init__(dim, num_heads, cfg)
        self.q_rope = QRope(half, cfg.act_bits, cfg.momentum)
        self.k_rope = QRope(half, cfg.act_bits, cfg.momentum)

    def forward(self, x: QTensor, rel_bias: Tensor | None = None, mask: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> QTensor:
        """x: 8-bit ``(B, N, C)``; ``rope``: float ``(sin, cos)``, each ``(N, d)`` or ``(H, N, d)``.  Returns the
        int32 accumulator of the output projection ``(B, N, C)``."""
        if rope is None:
            return super().forward(x, rel_bias, mask)
        if rel_bias is not None or mask is not None:
            raise ValueError("rotary attention takes no bias or mask")
        sin, cos = rope
        n, c = x.q.shape[1], self.dim
        qkv = self.qkv(x)  # int32 (B, N, 3C), per-channel scale
        q = self.q_rope(self._heads(self.q_act(qkv.slice(-1, 0, c)), n), sin, cos)  # int8 (B, H, N, d)
        k = self.k_rope(self._heads(self.k_act(qkv.slice(-1, c, 2 * c)), n), sin, cos)
        v = self._heads(self.v_act(qkv.slice(-1, 2 * c, 3 * c)), n)
        s_scale = self.score_scale(q.scale, k.scale)
        sq, sname = run("matmul", [q, k], attrs={"transpose_b": 1})  # int32 (B, H, N, N)
        sv = None
        if q.value is not None:
            sv = carry(q.value @ k.value.transpose(-1, -2) * self.sm_scale, sq, s_scale.to(sq.device))
        ctx = self.softmax(self.score_act(QTensor(sq, s_scale, 32, sv, sname)), v)  # int32 (B, H, N, d)
        ctx = ctx.permute(0, 2, 1, 3).reshape(0, n, c)  # (B, N, C)
        return self.proj(self.ctx_act(ctx))


class QRopeViT(QViT):
    """``QViT`` whose blocks rotate queries and keys; ``rope`` is timm's rotary module (float, eval only)."""

    family = "vit_rope"

    def rope_tables(self) -> list[tuple[Tensor, Tensor] | None]:
        """Per block ``(sin, cos)`` float ``(N, d)`` (or ``(H, N, d)`` for RoPE-Mixed), prefix rows ``(0, 1)``."""
        if self.rope is None:
            return [None] * len(self.blocks)
        mod = self.rope.mod
        if getattr(mod, "feat_shape", None) is None:
            emb = mod.get_embed(shape=list(self.grid))
        else:
            emb = mod.get_embed()
        sin, cos = emb.float().chunk(2, -1)  # (..., L, d)
        p = self.num_prefix
        if p:
            pad = (0, 0, p, 0)
            sin = torch.nn.functional.pad(sin, pad, value=0.0)
            cos = torch.nn.functional.pad(cos, pad, value=1.0)
        if sin.dim() == 4:  # RoPE-Mixed: (depth, H, N, d), one table per block
            return [(sin[i], cos[i]) for i in range(len(self.blocks))]
        return [(sin, cos)] * len(self.blocks)


# ---------------------------------------------------------------------------------------------
# Checks and conversion
# ---------------------------------------------------------------------------------------------

def _attn_reason(attn: nn.Module, dim: int, where: str) -> str | None:
    name = type(attn).__name__
    if name not in ("EvaAttention", "AttentionRope"):
        return f"{where}: attention {name} is not supported"
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        return f"{where}: q/k norm (qk_norm) is not supported"
    if not isinstance(attn.norm, nn.Identity):
        return f"{where}: normalization of the attention output (scale_attn_inner) is not supported"
    if getattr(attn, "gate", None) is not None:
        return f"{where}: gated attention is not supported"
    if getattr(attn, "num_kv_groups", 1) != 1:
        return f"{where}: grouped-query attention (num_kv_heads) is not supported"
    if attn.head_dim * attn.num_heads != dim or attn.proj.out_features != dim:
        return f"{where}: attention with head_dim * num_heads != dim is not supported"
    if attn.head_dim % 2:
        return f"{where}: odd head dimension"
    return None


def _block_reason(blk: nn.Module, dim: int, where: str) -> str | None:
    if type(blk).__name__ != "EvaBlock":
        return f"{where}: {type(blk).__name__} is not supported (pre-norm EvaBlock only; no post-norm residual)"
    return (norm_reason(blk.norm1, f"{where}.norm1", False) or norm_reason(blk.norm2, f"{where}.norm2", False)
            or _attn_reason(blk.attn, dim, f"{where}.attn") or mlp_reason(blk.mlp, f"{where}.mlp"))


def check_supported(model: nn.Module) -> str | None:
    """Why a timm ``Eva`` (EVA, RoPE ViTs, DINOv3, Perception Encoder) cannot be quantized, in one line
    (None: it can).  Structural checks only."""
    r = trunk_reason(model)
    if r:
        return r
    prefix = model.num_prefix_tokens
    rope = getattr(model, "rope", None)
    if rope is not None and type(rope).__name__ not in _ROPES:
        return f"rotary embedding {type(rope).__name__} is not supported"
    for i, blk in enumerate(model.blocks):
        r = _block_reason(blk, model.embed_dim, f"blocks.{i}")
        if r:
            return r
    tokens = prefix + model.patch_embed.num_patches
    # Eva's attention pool sees every token (prefix included); its average pool skips the prefix
    return head_reason(model, prefix, tokens, model.embed_dim, include_prefix=model.attn_pool is not None)


def _qkv(attn: nn.Module) -> tuple[Tensor, Tensor]:
    """Fused ``(3C, C)`` weight and ``(3C,)`` bias of an ``EvaAttention`` / ``AttentionRope`` (zeros for
    missing biases, EVA's fixed zero key bias included)."""
    def bias(lin: nn.Linear | None, b: Tensor | None, n: int) -> Tensor:
        if b is None and lin is not None:
            b = lin.bias
        return torch.zeros(n) if b is None else b.detach().reshape(-1)

    if attn.qkv is not None:
        w = attn.qkv.weight.detach()
        c = w.shape[0] // 3
        if getattr(attn, "q_bias", None) is not None:
            b = torch.cat([attn.q_bias.detach(), attn.k_bias.detach(), attn.v_bias.detach()])
        else:
            b = bias(attn.qkv, None, 3 * c)
        return w, b
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    w = torch.cat([lin.weight.detach() for lin in lins])
    b = torch.cat([bias(lin, None, lin.out_features) for lin in lins])
    return w, b


def from_timm(model: nn.Module, cfg: QuantConfig | None = None) -> QViT:
    """Convert a timm ``Eva`` (weights copied; the rotary module deep-copied)."""
    cfg = cfg or QuantConfig()
    r = check_supported(model)
    if r:
        raise IvitError(r)
    blk0 = model.blocks[0]
    rope = getattr(model, "rope", None)
    cls = QRopeViT if rope is not None else QViT
    m = cls.empty_like(model, cfg, num_heads=blk0.attn.num_heads, mlp_hidden=blk0.mlp.fc1.out_features,
                       eps=blk0.norm1.eps, quick_gelu=act_kind(blk0.mlp.act) == "quick_gelu",
                       pool_include_prefix=model.attn_pool is not None)
    m.family = "vit_rope" if rope is not None else "eva"
    m.load_common(model, cfg)
    dim = model.embed_dim
    blocks = []
    for b in model.blocks:
        a = b.attn
        qb = QBlock(dim, a.num_heads, b.mlp.fc1.out_features, cfg, b.norm1.eps)
        if rope is not None:
            qb.attn = QRopeAttention(dim, a.num_heads, cfg, bool(getattr(a, "rotate_half", False)))
        qb.load_norms(b.norm1, b.norm2, cfg)
        w, bias = _qkv(a)
        with torch.no_grad():
            qb.attn.qkv.weight.copy_(w)
            qb.attn.qkv.bias.copy_(bias)
        gamma1 = b.gamma_1.detach() if b.gamma_1 is not None else None
        gamma2 = b.gamma_2.detach() if b.gamma_2 is not None else None
        qb.attn.proj = linear_from(a.proj, cfg.per_channel_weights, gamma1)
        qb.mlp = mlp_from(b.mlp, cfg, gamma2)
        blocks.append(qb)
    m.blocks = nn.ModuleList(blocks)
    if rope is not None:
        m.rope = EvalOnly(copy.deepcopy(rope))
    return m


def _register() -> None:
    from timm.models.eva import Eva

    from .factory import register_converter

    register_converter(Eva)(from_timm)


_register()
