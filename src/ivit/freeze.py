"""``freeze``: turn a calibrated/trained quantized model into an immutable integer ``Program``.

Emitters mirror the modules' forwards op for op and take their integer constants from the same
``consts`` methods the forwards use, so the program computes exactly what the model computes in
eval mode (tested with ``torch.equal`` for every family, size and batch size).
Emitters are registered per module type (``register_emitter``); export code stays out of the layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import IvitError
from .layers import QAct, QLayerNorm, QLinear, QResidualAdd
from .models.base import QModel
from .models.vit import QAttention, QBlock, QMlp, QViT
from .program import Node, Program

__all__ = ["freeze", "Builder", "Sym", "register_emitter"]


@dataclass
class Sym:
    """A symbolic program value: its name, its (offline) scale and bit width."""

    name: str
    scale: Tensor
    bits: int


class Builder:
    """Accumulates nodes and constants; module names give constants readable keys."""

    def __init__(self, model: nn.Module) -> None:
        self.nodes: list[Node] = []
        self.consts: dict[str, Tensor] = {}
        self._names = {id(m): n for n, m in model.named_modules()}
        self._count = 0

    def name(self, module: nn.Module) -> str:
        return self._names.get(id(module), "m")

    def const(self, key: str, t: Tensor, dtype: torch.dtype) -> str:
        if key in self.consts:
            raise RuntimeError(f"duplicate constant {key}")
        tt = t.detach().cpu()
        info = None if dtype == torch.bool else torch.iinfo(dtype)
        if info is not None and tt.numel() and (tt.min() < info.min or tt.max() > info.max):
            raise ValueError(f"constant {key} does not fit {dtype}")
        self.consts[key] = tt.to(dtype).contiguous()
        return key

    def op(self, op: str, inputs: list[str], consts: dict[str, str] | None = None, **attrs: Any) -> str:
        self._count += 1
        out = f"v{self._count}"
        self.nodes.append(Node(op, tuple(inputs), out, dict(consts or {}), attrs))
        return out


Emitter = Callable[..., Sym]
_EMITTERS: dict[type, Emitter] = {}


def register_emitter(cls: type) -> Callable[[Emitter], Emitter]:
    def deco(fn: Emitter) -> Emitter:
        _EMITTERS[cls] = fn
        return fn
    return deco


def emit(b: Builder, m: nn.Module, *args: Any, **kwargs: Any) -> Sym:
    for cls in type(m).__mro__:
        if cls in _EMITTERS:
            return _EMITTERS[cls](b, m, *args, **kwargs)
    raise IvitError(f"no freeze rule for module type {type(m).__name__}")


@register_emitter(QAct)
def _emit_qact(b: Builder, m: QAct, x: Sym) -> Sym:
    mult, shift, s = m.consts(x.scale)
    p = b.name(m)
    out = b.op("requantize", [x.name], {"mult": b.const(f"{p}.mult", mult, torch.int32),
                                        "shift": b.const(f"{p}.shift", shift, torch.int32)}, bits=m.bits)
    return Sym(out, s, m.bits)


@register_emitter(QLinear)
def _emit_linear(b: Builder, m: QLinear, x: Sym) -> Sym:
    w_int, s_w = m.int_weight()
    scale = s_w * x.scale.to(torch.float64)
    bias = m.int_bias(scale)
    p = b.name(m)
    consts = {"weight": b.const(f"{p}.weight", w_int, torch.int8)}
    if bias is not None:
        consts["bias"] = b.const(f"{p}.bias", bias, torch.int32)
    return Sym(b.op("linear", [x.name], consts), scale, 32)


@register_emitter(QLayerNorm)
def _emit_layernorm(b: Builder, m: QLayerNorm, x: Sym) -> Sym:
    mult, shift, offset, s = m.consts()
    p = b.name(m)
    out = b.op("layernorm", [x.name], {"mult": b.const(f"{p}.mult", mult, torch.int32),
                                       "shift": b.const(f"{p}.shift", shift, torch.int32),
                                       "offset": b.const(f"{p}.offset", offset, torch.int32)}, bits=m.bits)
    return Sym(out, s, m.bits)


@register_emitter(QResidualAdd)
def _emit_add(b: Builder, m: QResidualAdd, a: Sym, c: Sym) -> Sym:
    ma, sa, mb, sb, s = m.consts(a.scale, c.scale)
    p = b.name(m)
    out = b.op("add_requantize", [a.name, c.name], {
        "mult_a": b.const(f"{p}.mult_a", ma, torch.int32), "shift_a": b.const(f"{p}.shift_a", sa, torch.int32),
        "mult_b": b.const(f"{p}.mult_b", mb, torch.int32), "shift_b": b.const(f"{p}.shift_b", sb, torch.int32),
    }, bits=m.bits)
    return Sym(out, s, m.bits)


def _chunk(b: Builder, x: Sym, i: int, n: int, width: int) -> Sym:
    c = width // n
    scale = x.scale if x.scale.numel() == 1 else x.scale[i * c:(i + 1) * c]
    return Sym(b.op("slice", [x.name], dim=-1, start=i * c, end=(i + 1) * c), scale, x.bits)


def emit_attention(b: Builder, m: QAttention, x: Sym, tokens: int, rel_bias: Tensor | None = None,
                   mask: Tensor | None = None) -> Sym:
    """Attention on ``(B, N, C)``; ``rel_bias`` float ``(H, N, N)`` (quantized here to the score scale),
    ``mask`` bool ``(nW, N, N)``."""
    h, d, c = m.num_heads, m.head_dim, m.dim
    qkv = emit(b, m.qkv, x)

    def heads(s: Sym) -> Sym:
        r = b.op("reshape", [s.name], shape=[0, tokens, h, d])
        return Sym(b.op("permute", [r], perm=[0, 2, 1, 3]), s.scale, s.bits)  # (B, H, N, d)

    q = heads(emit(b, m.q_act, _chunk(b, qkv, 0, 3, 3 * c)))
    k = heads(emit(b, m.k_act, _chunk(b, qkv, 1, 3, 3 * c)))
    v = heads(emit(b, m.v_act, _chunk(b, qkv, 2, 3, 3 * c)))
    s_scale = m.score_scale(q.scale, k.scale)
    scores = b.op("matmul", [q.name, k.name], transpose_b=True)  # int32 (B, H, N, N)
    p = b.name(m)
    if rel_bias is not None:
        bias_int = m.rel_bias_int(rel_bias, s_scale)
        scores = b.op("add_const", [scores], {"const": b.const(f"{p}.rel_bias", bias_int, torch.int32)})
    s16 = emit(b, m.score_act, Sym(scores, s_scale, 32))
    x0, n, pscale = m.softmax.consts(s16.scale, tokens)
    sm_consts = {}
    if mask is not None:
        sm_consts["mask"] = b.const(f"{p}.mask", mask, torch.bool)
    probs = b.op("shiftmax", [s16.name], sm_consts, x0=x0, n=n, k_out=m.softmax.k_out)
    ctx = b.op("matmul", [probs, v.name], transpose_b=False)  # int32 (B, H, N, d)
    ctx = b.op("permute", [ctx], perm=[0, 2, 1, 3])
    ctx = b.op("reshape", [ctx], shape=[0, tokens, c])
    ctx8 = emit(b, m.ctx_act, Sym(ctx, pscale * v.scale, 32))
    return emit(b, m.proj, ctx8)


@register_emitter(QMlp)
def _emit_mlp(b: Builder, m: QMlp, x: Sym) -> Sym:
    h = emit(b, m.act_in, emit(b, m.fc1, x))
    x0, n, s = m.gelu.consts(h.scale)
    g = Sym(b.op("shiftgelu", [h.name], x0=x0, n=n, k_out=m.gelu.k_sig), s, 32)
    return emit(b, m.fc2, emit(b, m.act_out, g))


@register_emitter(QBlock)
def _emit_block(b: Builder, m: QBlock, x: Sym, tokens: int) -> Sym:
    x = emit(b, m.add1, x, emit_attention(b, m.attn, emit(b, m.norm1, x), tokens))
    return emit(b, m.add2, x, emit(b, m.mlp, emit(b, m.norm2, x)))


@register_emitter(QViT)
def _emit_vit(b: Builder, m: QViT, x: Sym) -> Sym:
    patches = Sym(b.op("patchify", [x.name], patch=m.patch_size), x.scale, 8)
    acc = emit(b, m.patch_embed, patches)
    mult, shift, prefix, pos, s = m.embed.consts(acc.scale)
    consts = {"mult": b.const("embed.mult", mult, torch.int32), "shift": b.const("embed.shift", shift, torch.int32),
              "pos": b.const("embed.pos", pos, torch.int32)}
    if prefix is not None:
        consts["prefix"] = b.const("embed.prefix", prefix, torch.int32)
    h = Sym(b.op("embed", [acc.name], consts, bits=m.embed.bits), s, m.embed.bits)
    tokens = int(pos.shape[0]) + (0 if prefix is None else int(prefix.shape[0]))
    for blk in m.blocks:
        h = emit(b, blk, h, tokens)
    h = emit(b, m.norm, h)
    cls = Sym(b.op("select", [h.name], dim=1, index=0), h.scale, h.bits)  # (B, C)
    return emit(b, m.head, cls)


def freeze(model: QModel, name: str | None = None, extra_meta: dict[str, Any] | None = None) -> Program:
    """Freeze a calibrated quantized model into an integer ``Program`` (the model is not modified).

    Raises ``IvitError`` if the model was never calibrated.
    """
    from . import __version__
    from .layers import NotCalibratedError

    if not isinstance(model, QModel):
        raise IvitError(f"freeze expects an ivit quantized model, got {type(model).__name__}")
    b = Builder(model)
    one = torch.ones((), dtype=torch.float64)
    try:
        with torch.no_grad():
            out = emit(b, model, Sym("pixels", one, 8))
    except NotCalibratedError as e:
        raise IvitError(str(e)) from None
    if out.scale.numel() != 1:
        raise RuntimeError("logits must have a per-tensor scale")
    meta: dict[str, Any] = {
        "family": model.family,
        "model": name or model.meta.get("name", model.family),
        "input_shape": [model.in_chans, *model.img_size],
        "num_classes": model.num_classes,
        "logit_scale": float(out.scale),
        "arch": model.meta,
        "config": model.config.to_json(),
        "ivit_version": __version__,
        **(extra_meta or {}),
    }
    return Program(nodes=b.nodes, consts=b.consts, input="pixels", output=out.name, meta=meta)


# ---------------------------------------------------------------------------------------------
# Swin: window partition / reverse, cyclic shifts, padding and the 2x2 patch-merging gather are
# generic data-movement ops (reshape with 0 = copy the dim and -1 = infer, so the batch size stays
# free; permute; roll; pad; slice); everything else reuses the ViT emitters.
# ---------------------------------------------------------------------------------------------

from .models.swin import QPatchMerging, QSwin, QSwinBlock, QSwinStage  # noqa: E402


def _move(b: Builder, x: Sym, op: str, **attrs: Any) -> Sym:
    """A data-movement op: same integers, same scale (channel axis stays last)."""
    return Sym(b.op(op, [x.name], **attrs), x.scale, x.bits)


@register_emitter(QSwinBlock)
def _emit_swin_block(b: Builder, m: QSwinBlock, x: Sym) -> Sym:
    (h, w), (sh, sw), (ph, pw), (hp, wp), (wh, ww) = m.resolution, m.shift, m.pad, m.padded, m.window
    c = m.dim
    t = emit(b, m.norm1, x)  # int8 (B, H, W, C)
    if sh or sw:
        t = _move(b, t, "roll", shifts=[-sh, -sw], dims=[1, 2])
    if ph or pw:
        t = _move(b, t, "pad", pads=[0, 0, 0, pw, 0, ph])  # (B, Hp, Wp, C)
    t = _move(b, t, "reshape", shape=[0, hp // wh, wh, wp // ww, ww, c])
    t = _move(b, t, "permute", perm=[0, 1, 3, 2, 4, 5])
    t = _move(b, t, "reshape", shape=[-1, wh * ww, c])  # (B*nW, N, C)
    a = emit_attention(b, m.attn, t, m.tokens, m.rel_bias(), m.attn_mask)  # int32 (B*nW, N, C)
    a = _move(b, a, "reshape", shape=[-1, hp // wh, wp // ww, wh, ww, c])
    a = _move(b, a, "permute", perm=[0, 1, 3, 2, 4, 5])
    a = _move(b, a, "reshape", shape=[-1, hp, wp, c])  # (B, Hp, Wp, C)
    if ph or pw:
        a = _move(b, _move(b, a, "slice", dim=1, start=0, end=h), "slice", dim=2, start=0, end=w)
    if sh or sw:
        a = _move(b, a, "roll", shifts=[sh, sw], dims=[1, 2])
    x = emit(b, m.add1, x, a)
    return emit(b, m.add2, x, emit(b, m.mlp, emit(b, m.norm2, x)))


@register_emitter(QPatchMerging)
def _emit_patch_merging(b: Builder, m: QPatchMerging, x: Sym) -> Sym:
    ph, pw = m.pad
    if ph or pw:
        x = _move(b, x, "pad", pads=[0, 0, 0, pw, 0, ph])
    (h2, w2), c = m.out_resolution, m.dim
    x = _move(b, x, "reshape", shape=[0, h2, 2, w2, 2, c])
    x = _move(b, x, "permute", perm=[0, 1, 3, 4, 2, 5])
    x = _move(b, x, "reshape", shape=[0, h2, w2, 4 * c])  # (B, H/2, W/2, 4C)
    return emit(b, m.out_act, emit(b, m.reduction, emit(b, m.norm, x)))


@register_emitter(QSwinStage)
def _emit_swin_stage(b: Builder, m: QSwinStage, x: Sym) -> Sym:
    if m.downsample is not None:
        x = emit(b, m.downsample, x)
    for blk in m.blocks:
        x = emit(b, blk, x)
    return x


@register_emitter(QSwin)
def _emit_swin(b: Builder, m: QSwin, x: Sym) -> Sym:
    patches = Sym(b.op("patchify", [x.name], patch=m.patch_size), x.scale, 8)
    h = emit(b, m.embed_act, emit(b, m.patch_embed, patches))  # int16 (B, L, C)
    h = _move(b, h, "reshape", shape=[0, m.grid[0], m.grid[1], m.embed_dim])  # (B, gh, gw, C)
    if m.patch_norm is not None:
        h = emit(b, m.patch_norm, h)
    for st in m.stages:
        h = emit(b, st, h)
    h = emit(b, m.norm, h)  # int8 (B, H, W, C)
    h = _move(b, h, "reshape", shape=[0, -1, m.num_features])
    pooled = _move(b, h, "mean", dim=1)  # int8 (B, C)
    return emit(b, m.head, pooled)
