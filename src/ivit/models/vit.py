"""Integer-only ViT / DeiT (I-ViT), converted from ``timm.models.vision_transformer.VisionTransformer``.

Data flow and widths (B batch, N tokens, C width, H heads, d = C/H, P prefix tokens):

    uint8 pixels (B,3,H,W) [-> crop to a multiple of the patch] -> patchify int8 (B,L,3pp) -> int8 GEMM -> int32
        -> embed (+class/register/distillation tokens, +pos) int16 (B,P+L,C) [-> norm_pre I-LN int16]
    block:  x16 -> I-LN -> int8 -> qkv GEMM int32 -> q,k,v int8 -> q k^T int32 [+ rel-pos bias] -> int16 scores
            -> probabilities (uint8, relative to the row max) -> p v int32 -> / row sum -> int8
            -> proj GEMM int32 -> add -> x16
            x16 -> I-LN -> int8 -> fc1 int32 -> int8 -> ShiftGELU int32 -> int8 -> fc2 int32 -> add -> x16
    head:   [I-LN int8] -> pool: class token (select) | mean of the patch tokens (``mean``, half up)
            | attention pool (MAP: a constant latent query, see ``QAttentionPool``)
            -> [fc_norm I-LN int8] -> [int8] -> int8 GEMM (per-tensor weight scale) -> int32 logits
            (``num_classes=0``: the pooled int8/int16 embedding itself, its scale is the program's ``logit_scale``)
    distilled DeiT: both heads in one GEMM over tokens 0 and 1 with one weight scale ``S``, then
            ``I_out = I_cls + I_dist`` (``add_requantize`` with multipliers exactly 1) at scale ``S / 2``:
            the dequantized output is exactly the mean of the two heads' dequantized logits.

LayerScale is folded into ``proj``/``fc2``; QuickGELU (``x * sigmoid(1.702 x)``) is ShiftGELU's own form and
the tanh GELU runs as ShiftGELU too (the same sigmoid approximation of GELU; only the float surrogate used
for QAT gradients differs).  ``check_supported`` refuses, in one line and before any work, what this cannot
run exactly.  The same ``QViT`` serves the relative-position ViT (``vit_relpos``) and the RoPE ViTs (``eva``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..config import Probs, QuantConfig
from ..errors import IvitError
from ..ir.trace import call
from ..nn import QAct, QAttention, QEmbed, QLayerNorm, QLinear, QMlp, QPatchEmbed, QResidualAdd
from ..nn._run import run
from ..qtensor import QTensor, carry
from .base import QModel
from .factory import normalization

__all__ = ["QBlock", "QViT", "QAttentionPool", "EvalOnly", "check_supported", "family_of", "act_kind",
           "mlp_reason", "norm_reason", "patch_embed_reason", "MAX_PREFIX"]

#: most prefix (class + register + distillation) tokens the ``embed`` op takes
MAX_PREFIX = 64


# ---------------------------------------------------------------------------------------------
# Structural checks (no weights touched: they run on the meta device too)
# ---------------------------------------------------------------------------------------------

def act_kind(act: nn.Module) -> str | None:
    """``"gelu"``, ``"gelu_tanh"`` or ``"quick_gelu"`` for the activations ShiftGELU computes, else None."""
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, GELUTanh):
        return "gelu_tanh"
    if isinstance(act, GELU):
        return "gelu"
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    return None


def norm_reason(mod: nn.Module | None, where: str, optional: bool = True) -> str | None:
    """Why ``mod`` cannot be an I-LayerNorm (None: it can, or it is an allowed Identity)."""
    if mod is None or isinstance(mod, nn.Identity):
        return None if optional else f"{where} is missing"
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
        return None
    return f"{where}: {type(mod).__name__} is not supported (LayerNorm only, as I-LayerNorm)"


def mlp_reason(mlp: nn.Module, where: str) -> str | None:
    """Why ``mlp`` is not a plain ``fc1 -> GELU/QuickGELU -> fc2`` timm ``Mlp`` (None: it is)."""
    from timm.layers import Mlp

    name = type(mlp).__name__
    if type(mlp) is not Mlp:
        if "glu" in name.lower():
            return (f"{where}: gated MLP {name} is not supported (SwiGLU/GLU multiplies two activations "
                    "elementwise)")
        return f"{where}: MLP {name} is not supported"
    if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return f"{where}: convolutional MLP is not supported"
    if act_kind(mlp.act) is None:
        return f"{where}: MLP activation {type(mlp.act).__name__} is not supported (GELU, GELU-tanh, QuickGELU only)"
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return f"{where}: normalization inside the MLP (scale_mlp_norm) is not supported"
    return None


def trunk_reason(model: nn.Module) -> str | None:
    """Why the parts every ViT family shares cannot be quantized (None: they can): the patch embedding, at
    least one block, at most ``MAX_PREFIX`` prefix (class, distillation, register) tokens."""
    r = patch_embed_reason(model.patch_embed)
    if r:
        return r
    if len(model.blocks) == 0:
        return "a ViT without blocks"
    if model.num_prefix_tokens > MAX_PREFIX:
        return f"{model.num_prefix_tokens} prefix tokens (at most {MAX_PREFIX})"
    return None


def patch_embed_reason(pe: nn.Module) -> str | None:
    """Why the patch embedding is not a plain strided conv over a fixed image (None: it is)."""
    from timm.layers import PatchEmbed

    name = type(pe).__name__
    if name == "HybridEmbed" or hasattr(pe, "backbone"):
        return "hybrid CNN-backbone patch embedding (HybridEmbed) is not supported"
    if not isinstance(pe, PatchEmbed):
        return f"patch embedding {name} is not supported"
    conv = pe.proj
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        return "patch embedding must be a plain Conv2d"
    if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1]:
        return "patch embedding must be a square conv with stride == kernel size"
    if conv.padding not in ((0, 0), 0, "valid") or conv.dilation != (1, 1):
        return "patch embedding conv must have no padding and no dilation"
    if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity):
        return "normalization inside the patch embedding is not supported"
    if pe.img_size is None:
        return "patch embedding without a fixed image size is not supported"
    p = conv.kernel_size[0]
    if getattr(pe, "dynamic_img_pad", False) and any(s % p for s in pe.img_size):
        return f"dynamic padding of a {tuple(pe.img_size)} image to the patch size {p} is not supported"
    if any(s < p for s in pe.img_size):
        return f"image {tuple(pe.img_size)} smaller than one patch ({p})"
    return None


def _attn_reason(attn: nn.Module, dim: int, where: str) -> str | None:
    from timm.layers import Attention

    if type(attn) is not Attention:
        name = type(attn).__name__
        what = " (differential attention)" if "Diff" in name else ""
        return f"{where}: attention {name}{what} is not supported"
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        return f"{where}: q/k norm (qk_norm) is not supported"
    if not isinstance(attn.norm, nn.Identity):
        return f"{where}: normalization of the attention output (scale_attn_norm) is not supported"
    if getattr(attn, "gate", None) is not None:
        return f"{where}: gated attention is not supported"
    if attn.head_dim * attn.num_heads != dim or attn.proj.out_features != dim:
        return f"{where}: attention with head_dim * num_heads != dim is not supported"
    return None


def _layerscale_reason(mod: nn.Module, where: str) -> str | None:
    from timm.layers import LayerScale

    if isinstance(mod, (nn.Identity, LayerScale)):
        return None
    return f"{where}: {type(mod).__name__} is not supported (LayerScale only)"


def block_reason(blk: nn.Module, dim: int, where: str) -> str | None:
    """Why a timm ``Block`` (pre-norm, attention + MLP) cannot be converted (None: it can)."""
    from timm.models.vision_transformer import Block

    if type(blk) is not Block:
        return (f"{where}: {type(blk).__name__} is not supported (pre-norm Block only; no post-norm residual "
                "or parallel branches)")
    return (norm_reason(blk.norm1, f"{where}.norm1", False) or norm_reason(blk.norm2, f"{where}.norm2", False)
            or _attn_reason(blk.attn, dim, f"{where}.attn") or mlp_reason(blk.mlp, f"{where}.mlp")
            or _layerscale_reason(blk.ls1, f"{where}.ls1") or _layerscale_reason(blk.ls2, f"{where}.ls2"))


def map_reason(pool: nn.Module, dim: int, tokens: int) -> str | None:
    """Why timm's ``AttentionPoolLatent`` (MAP head) cannot be converted (None: it can)."""
    from timm.layers import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        return f"attention pooling {type(pool).__name__} is not supported"
    if pool.pos_embed is not None:
        return "attention pooling with its own position embedding is not supported"
    if not isinstance(pool.q_norm, nn.Identity) or not isinstance(pool.k_norm, nn.Identity):
        return "attention pooling with q/k norm is not supported"
    if not isinstance(pool.proj, nn.Linear) or pool.mlp is None:
        return "attention pooling without its output projection and MLP is not supported"
    if pool.kv.in_features != dim or pool.proj.out_features != dim or pool.head_dim * pool.num_heads != dim:
        return "attention pooling of another width than the tokens is not supported"
    if pool.pool not in ("token", "avg"):
        return f"attention pooling with pool_type={pool.pool!r} is not supported"
    if pool.latent_len > tokens:
        return "attention pooling with more latent queries than tokens is not supported"
    return (norm_reason(pool.norm, "attn_pool.norm", False) or mlp_reason(pool.mlp, "attn_pool.mlp"))


def head_reason(model: nn.Module, prefix: int, tokens: int, dim: int, include_prefix: bool | None = None
                ) -> str | None:
    """Pooling, final norms and classifier shared by the ViT families (None: convertible).  ``include_prefix``:
    whether pooling sees the prefix tokens (default: the model's ``pool_include_prefix``)."""
    if include_prefix is None:
        include_prefix = bool(getattr(model, "pool_include_prefix", False))
    pool = getattr(model, "global_pool", "token")
    if pool in ("max", "avgmax"):
        return f"global_pool={pool!r}: max pooling over tokens is not supported (no integer max op)"
    if pool == "":
        return "global_pool='' (no pooling: the output would be every token) is not supported"
    if pool not in ("token", "avg", "map"):
        return f"global_pool={pool!r} is not supported"
    if pool == "token" and prefix == 0:
        return "class-token pooling without a class token"
    attn_pool = getattr(model, "attn_pool", None)
    if (pool == "map") != (attn_pool is not None):
        return "attention pooling must come with global_pool='map'"
    if attn_pool is not None:
        r = map_reason(attn_pool, dim, tokens if include_prefix else tokens - prefix)
        if r:
            return r
    if pool == "avg" and not include_prefix and tokens == prefix:
        return "average pooling without patch tokens"
    for name in ("norm", "fc_norm", "norm_pre"):
        r = norm_reason(getattr(model, name, None), name)
        if r:
            return r
    for name in ("head", "head_dist"):
        h = getattr(model, name, None)
        if h is not None and not isinstance(h, (nn.Linear, nn.Identity)):
            return f"classifier {name} must be a Linear layer (or Identity for num_classes=0)"
    return None


def check_supported(model: nn.Module) -> str | None:
    """Why a timm ``VisionTransformer`` (or DeiT's ``VisionTransformerDistilled``) cannot be quantized, in one
    line (None: it can).  Structural checks only: works on a model built on the meta device."""
    r = trunk_reason(model)
    if r:
        return r
    dim = model.embed_dim
    prefix = model.num_prefix_tokens
    distilled = getattr(model, "dist_token", None) is not None
    if distilled and (getattr(model, "global_pool", "token") != "token" or prefix != 2
                      or getattr(model, "reg_token", None) is not None):
        return "distilled ViT must pool its class and distillation tokens (and have no register tokens)"
    tokens = prefix + model.patch_embed.num_patches
    for i, blk in enumerate(model.blocks):
        r = block_reason(blk, dim, f"blocks.{i}")
        if r:
            return r
    return head_reason(model, prefix, tokens, dim)


def family_of(model: nn.Module) -> str:
    """The listing family of a (supported) timm ViT: how it pools and classifies."""
    if getattr(model, "dist_token", None) is not None:
        return "deit_distilled"
    pool = getattr(model, "global_pool", "token")
    return {"token": "vit", "avg": "vit_gap", "map": "vit_map"}.get(pool, "vit")


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class EvalOnly(nn.Module):
    """A float submodule that always runs in eval mode: a generator of offline constants of the integer
    program (relative-position bias MLP, rotary tables).  Its parameters still train in QAT (gradients flow
    through the float surrogates); dropout and train-time coordinate augmentation never run."""

    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self.mod = mod.eval()

    def train(self, mode: bool = True) -> EvalOnly:
        super().train(mode)
        self.mod.eval()
        return self


def ln_from(ln: nn.Module, bits: int, cfg: QuantConfig) -> QLayerNorm:
    """``QLayerNorm`` with the weights of a timm/torch LayerNorm (missing affine parameters become 1 / 0)."""
    m = QLayerNorm(ln.normalized_shape[0], bits, cfg.momentum, ln.eps, cfg.layernorm)
    with torch.no_grad():
        if ln.weight is not None:
            m.weight.copy_(ln.weight)
        if ln.bias is not None:
            m.bias.copy_(ln.bias)
    return m


def linear_from(lin: nn.Linear, per_channel: bool, gamma: Tensor | None = None) -> QLinear:
    """``QLinear`` with the weights of ``lin`` (a missing bias becomes zeros), LayerScale ``gamma`` folded in."""
    m = QLinear(lin.in_features, lin.out_features, True, per_channel)
    with torch.no_grad():
        m.weight.copy_(lin.weight)
        m.bias.copy_(lin.bias if lin.bias is not None else torch.zeros(lin.out_features))
        if gamma is not None:
            m.weight.mul_(gamma.unsqueeze(1))
            m.bias.mul_(gamma)
    return m


def mlp_from(mlp: nn.Module, cfg: QuantConfig, gamma: Tensor | None = None) -> QMlp:
    """``QMlp`` of a timm ``Mlp`` (checked by ``mlp_reason``), LayerScale ``gamma`` folded into fc2."""
    m = QMlp(mlp.fc1.in_features, mlp.fc1.out_features, cfg, quick_gelu=act_kind(mlp.act) == "quick_gelu")
    m.fc1 = linear_from(mlp.fc1, cfg.per_channel_weights)
    m.fc2 = linear_from(mlp.fc2, cfg.per_channel_weights, gamma)
    return m


class QBlock(nn.Module):
    """Pre-norm transformer block on the 16-bit residual stream.

    ``rel_pos`` (relative-position ViT): a float generator (``EvalOnly`` around timm's ``RelPosMlp`` /
    ``RelPosBias``) of the ``(H, N, N)`` bias that ``QAttention`` quantizes to its score scale.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int, cfg: QuantConfig, eps: float = 1e-6,
                 quick_gelu: bool = False) -> None:
        super().__init__()
        self.norm1 = QLayerNorm(dim, cfg.act_bits, cfg.momentum, eps, cfg.layernorm)
        self.attn: nn.Module = QAttention(dim, num_heads, cfg)
        self.add1 = QResidualAdd(cfg.residual_bits, cfg.momentum)
        self.norm2 = QLayerNorm(dim, cfg.act_bits, cfg.momentum, eps, cfg.layernorm)
        self.mlp = QMlp(dim, hidden, cfg, quick_gelu)
        self.add2 = QResidualAdd(cfg.residual_bits, cfg.momentum)
        self.rel_pos: EvalOnly | None = None

    @classmethod
    def from_timm(cls, blk: nn.Module, cfg: QuantConfig) -> QBlock:
        """Convert a timm ``Block`` (see ``block_reason``)."""
        dim = blk.norm1.normalized_shape[0]
        r = block_reason(blk, dim, "block")
        if r:
            raise IvitError(r)
        m = cls(dim, blk.attn.num_heads, blk.mlp.fc1.out_features, cfg)
        m.load_norms(blk.norm1, blk.norm2, cfg)
        m.attn.load_timm(blk.attn.qkv, blk.attn.proj, getattr(blk.ls1, "gamma", None))
        m.mlp = mlp_from(blk.mlp, cfg, getattr(blk.ls2, "gamma", None))
        return m

    def load_norms(self, norm1: nn.Module, norm2: nn.Module, cfg: QuantConfig) -> None:
        self.norm1 = ln_from(norm1, cfg.act_bits, cfg)
        self.norm2 = ln_from(norm2, cfg.act_bits, cfg)

    def forward(self, x: QTensor, rel_bias: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
                ) -> QTensor:
        """x: 16-bit ``(B, N, C)``; ``rel_bias`` float ``(H, N, N)`` (shared by all blocks); ``rope`` the float
        ``(sin, cos)`` tables of a rotary attention.  Returns 16-bit ``(B, N, C)``."""
        if self.rel_pos is not None:
            rel_bias = self.rel_pos.mod.get_bias()[0]  # (H, N, N)
        kw: dict[str, Any] = {}
        if rel_bias is not None:
            kw["rel_bias"] = rel_bias
        if rope is not None:
            kw["rope"] = rope
        x = self.add1(x, self.attn(self.norm1(x), **kw))
        return self.add2(x, self.mlp(self.norm2(x)))


def mean_tokens(x: QTensor) -> QTensor:
    """Integer mean over the tokens of ``(B, N, C)`` (``ops.int_mean``, half up) -> ``(B, C)``, same scale."""
    q, name = call("mean", [x], attrs={"dim": 1})
    value = None if x.value is None else carry(x.value.mean(dim=1), q, x.scale)
    return QTensor(q, x.scale, x.bits, value, name)


class QAttentionPool(nn.Module):
    """Multihead attention pooling with a learned latent query (timm ``AttentionPoolLatent``, SigLIP's MAP head).

    The query ``q = latent W_q^T + b_q`` is a constant: it is quantized offline to int8 at ``S_q = max|q| / 127``
    and laid out as a block-diagonal int8 weight ``(H*L, C)`` (head ``h`` of query ``l`` in row ``h*L + l``, its
    ``d`` values in columns ``h*d .. h*d+d-1``), so the scores of every head are one int8 GEMM of the keys:
    ``scores (B, N, H*L) = linear(k, W)`` at ``S_k S_q / sqrt(d)``.  Then as in self-attention: requantize to
    ``score_bits``, ``shiftmax_rel`` over the ``N`` keys -> uint8 ``(B, H, L, N)``; ``attn_normalize`` needs
    square probabilities, so the ``L`` rows are zero-padded to ``N`` (``pad``), multiplied with ``v`` and
    normalized (a zero row stays zero) and the ``L`` rows sliced back.  (``shiftmax8``: Shiftmax, ``p @ v``,
    no padding.)  Output projection, then ``x + MLP(LN(x))`` on the 16-bit residual stream, then the token
    (``pool_type='token'``) or mean of the ``L`` outputs.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int, cfg: QuantConfig, latent_len: int = 1,
                 latent_dim: int | None = None, q_proj: bool = True, pool: str = "token", eps: float = 1e-6,
                 quick_gelu: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sm_scale = self.head_dim**-0.5
        self.latent_len = latent_len
        self.pool = pool
        self.probs = Probs(cfg.probs)
        self.n_max = cfg.shiftmax_n_max
        ldim = latent_dim or dim
        self.latent = nn.Parameter(torch.zeros(1, latent_len, ldim))
        self.q = nn.Linear(ldim, dim) if q_proj else None  # float: its output is the constant query
        pc = cfg.per_channel_weights
        self.kv = QLinear(dim, 2 * dim, True, pc)
        self.k_act = QAct(cfg.act_bits, cfg.momentum)
        self.v_act = QAct(cfg.act_bits, cfg.momentum)
        self.score_act = QAct(cfg.score_bits, cfg.momentum)
        self.ctx_act = QAct(cfg.act_bits, cfg.momentum)
        self.proj = QLinear(dim, dim, True, pc)
        self.res_act = QAct(cfg.residual_bits, cfg.momentum)
        self.norm = QLayerNorm(dim, cfg.act_bits, cfg.momentum, eps, cfg.layernorm)
        self.mlp = QMlp(dim, hidden, cfg, quick_gelu)
        self.add = QResidualAdd(cfg.residual_bits, cfg.momentum)

    @classmethod
    def from_timm(cls, pool: nn.Module, cfg: QuantConfig) -> QAttentionPool:
        """Convert timm's ``AttentionPoolLatent`` (checked by ``map_reason``)."""
        dim = pool.kv.in_features
        q_proj = isinstance(pool.q, nn.Linear)
        m = cls(dim, pool.num_heads, pool.mlp.fc1.out_features, cfg, pool.latent_len, pool.latent_dim, q_proj,
                pool.pool, pool.norm.eps, act_kind(pool.mlp.act) == "quick_gelu")
        with torch.no_grad():
            m.latent.copy_(pool.latent)
            if q_proj:
                m.q.weight.copy_(pool.q.weight)
                if pool.q.bias is not None:
                    m.q.bias.copy_(pool.q.bias)
                else:
                    m.q.bias.zero_()
        m.kv = linear_from(pool.kv, cfg.per_channel_weights)
        m.proj = linear_from(pool.proj, cfg.per_channel_weights)
        m.norm = ln_from(pool.norm, cfg.act_bits, cfg)
        m.mlp = mlp_from(pool.mlp, cfg)
        return m

    def query(self) -> Tensor:
        """Float query ``(L, C)``."""
        lat = self.latent[0]
        return lat if self.q is None else self.q(lat)

    def int_query(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(int8 block-diagonal weight (H*L, C), S_q, float query (L, C))``."""
        qf = self.query()
        s = qf.detach().to(torch.float64).abs().max().clamp(min=1e-12).cpu() / ops.qmax(8)
        qi = ops.quantize_symmetric(qf.detach().cpu(), s, 8)  # int8 (L, C)
        heads = qi.reshape(self.latent_len, self.num_heads, self.head_dim).permute(1, 0, 2)  # (H, L, d)
        w = torch.block_diag(*[heads[h] for h in range(self.num_heads)])  # (H*L, H*d)
        return w.to(torch.int8).contiguous(), s, qf

    def _probs_times_v(self, s: QTensor, v: QTensor) -> QTensor:
        """softmax over the keys of ``s`` (B, H, L, N) times ``v`` (B, H, N, d) -> int32 (B, H, L, d)."""
        n, ln = s.q.shape[-1], self.latent_len
        x0 = ops.shift_exp_x0(float(s.scale))
        one = torch.ones((), dtype=torch.float64)
        if self.probs == Probs.REL8:
            p, pname = run("shiftmax_rel", [s], attrs={"x0": x0})  # uint8 (B, H, L, N)
            pq = QTensor(p, one, 8, None, pname)
            if n > ln:
                pq = pq.pad((0, 0, 0, n - ln))  # (B, H, N, N), zero rows
            acc, aname = run("matmul", [pq, v], attrs={"transpose_b": 0})
            ctx, cname = run("attn_normalize", [QTensor(acc, v.scale, 32, None, aname), pq])
            out = QTensor(ctx, v.scale.to(torch.float64) * 2.0**-ops.CTX_FRAC_BITS, 32, None, cname)
            return out.slice(2, 0, ln) if n > ln else out
        nn_ = ops.choose_shiftmax_n(x0, n, self.n_max)
        p, pname = run("shiftmax", [s], attrs={"x0": x0, "n": nn_, "k_out": 8})
        acc, aname = run("matmul", [QTensor(p, one, 8, None, pname), v], attrs={"transpose_b": 0})
        return QTensor(acc, v.scale.to(torch.float64) * 2.0**-7, 32, None, aname)

    def forward(self, x: QTensor) -> QTensor:
        """x: 8-bit ``(B, N, C)`` -> 16-bit ``(B, C)``."""
        n, c, h, d, ln = x.q.shape[1], self.dim, self.num_heads, self.head_dim, self.latent_len
        kv = self.kv(x)  # int32 (B, N, 2C), per-channel scale
        k = self.k_act(kv.slice(-1, 0, c))  # int8 (B, N, C)
        v = self.v_act(kv.slice(-1, c, 2 * c)).reshape(0, n, h, d).permute(0, 2, 1, 3)  # (B, H, N, d)
        w, s_q, qf = self.int_query()
        s_scale = k.scale.to(torch.float64) * s_q * self.sm_scale
        sq, sname = run("linear", [k], {"weight": w})  # int32 (B, N, H*L)
        sv = None
        if k.value is not None:
            qh = carry(qf, ops.quantize_symmetric(qf.detach().cpu(), s_q, 8).to(qf.device), s_q.to(qf.device))
            qh = qh.reshape(ln, h, d).permute(1, 0, 2)  # (H, L, d)
            kh = k.value.reshape(-1, n, h, d).permute(0, 2, 1, 3)  # (B, H, N, d)
            sv = (qh.unsqueeze(0) @ kh.transpose(-1, -2)) * self.sm_scale  # (B, H, L, N)
            sv = carry(sv.permute(0, 3, 1, 2).reshape(-1, n, h * ln), sq, s_scale.to(sq.device))
        scores = QTensor(sq, s_scale, 32, sv, sname).reshape(0, n, h, ln).permute(0, 2, 3, 1)  # (B, H, L, N)
        s = self.score_act(scores)
        ctx = self._probs_times_v(s, v)  # int32 (B, H, L, d)
        if s.value is not None and v.value is not None:
            ctx.value = carry(torch.softmax(s.value, dim=-1) @ v.value, ctx.q, ctx.scale.to(ctx.q.device))
        t = self.proj(self.ctx_act(ctx.permute(0, 2, 1, 3).reshape(0, ln, c)))  # int32 (B, L, C)
        t = self.res_act(t)  # 16-bit residual
        t = self.add(t, self.mlp(self.norm(t)))  # 16-bit (B, L, C)
        return t.select(1, 0) if self.pool == "token" else mean_tokens(t)


class QViT(QModel):
    """Integer-only Vision Transformer: uint8 pixels in, int32 logits (or the pooled integer embedding) out.

    Pooling ``pool``: ``"token"`` (class token), ``"avg"`` (mean of the patch tokens, or of all tokens with
    ``pool_include_prefix``) or ``"map"`` (``QAttentionPool``).  ``num_prefix`` class/register/distillation
    tokens (``pos_on_prefix=False``: timm's ``no_embed_class``); ``norm_pre`` (CLIP) on the 16-bit stream;
    ``final_norm`` before pooling and/or ``fc_norm`` after it; ``distilled``: DeiT's two heads.
    """

    family = "vit"

    def __init__(self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, num_classes: int,
                 embed_dim: int, depth: int, num_heads: int, mlp_hidden: int,
                 mean: tuple[float, ...], std: tuple[float, ...], cfg: QuantConfig, num_prefix: int = 1,
                 pos_on_prefix: bool = True, pool: str = "token", pool_include_prefix: bool = False,
                 norm_pre: bool = False, final_norm: bool = True, fc_norm: bool = False, distilled: bool = False,
                 quick_gelu: bool = False, eps: float = 1e-6, map_head: dict[str, Any] | None = None) -> None:
        if pool not in ("token", "avg", "map"):
            raise IvitError(f"unknown pooling {pool!r}")
        if pool == "token" and num_prefix == 0:
            raise IvitError("class-token pooling needs a class token")
        meta = dict(img_size=list(img_size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                    embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_hidden=mlp_hidden,
                    mean=list(mean), std=list(std), num_prefix=num_prefix, pos_on_prefix=pos_on_prefix, pool=pool,
                    pool_include_prefix=pool_include_prefix, norm_pre=norm_pre, final_norm=final_norm,
                    fc_norm=fc_norm, distilled=distilled)
        super().__init__(cfg, img_size, in_chans, patch_size, num_classes, meta)
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.crop = (self.grid[0] * patch_size, self.grid[1] * patch_size)  # timm's conv drops the rest
        self.embed_dim = embed_dim
        self.num_prefix = num_prefix
        self.pool = pool
        self.pool_include_prefix = pool_include_prefix
        self.distilled = distilled
        num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = QPatchEmbed(in_chans, patch_size, embed_dim, mean, std, cfg.per_channel_weights)
        self.embed = QEmbed(embed_dim, num_patches, num_prefix, cfg.residual_bits, cfg.momentum, pos_on_prefix)
        self.norm_pre = QLayerNorm(embed_dim, cfg.residual_bits, cfg.momentum, eps, cfg.layernorm) if norm_pre \
            else None
        self.blocks = nn.ModuleList([QBlock(embed_dim, num_heads, mlp_hidden, cfg, eps, quick_gelu)
                                     for _ in range(depth)])
        self.shared_rel_pos: EvalOnly | None = None  # relative-position ViT with one bias for all blocks
        self.rope: nn.Module | None = None  # rotary ViT: the float table generator (see ``eva``)
        self.norm = QLayerNorm(embed_dim, cfg.act_bits, cfg.momentum, eps, cfg.layernorm) if final_norm else None
        self.attn_pool = None
        self.pool_act = None  # the pool's key/value GEMM reads int8 (a 16-bit stream without a final norm)
        if pool == "map":
            if not final_norm:
                self.pool_act = QAct(cfg.act_bits, cfg.momentum)
            self.attn_pool = QAttentionPool(embed_dim, num_heads, mlp_hidden, cfg, eps=eps, quick_gelu=quick_gelu,
                                            **(map_head or {}))
        self.fc_norm = QLayerNorm(embed_dim, cfg.act_bits, cfg.momentum, eps, cfg.layernorm) if fc_norm else None
        # the classifier reads int8: requantize a 16-bit pooled value (no norm after the residual stream)
        pooled_bits = cfg.residual_bits if (pool == "map" or not final_norm) else cfg.act_bits
        needs_act = num_classes > 0 and not fc_norm and pooled_bits > cfg.act_bits
        self.head_act = QAct(cfg.act_bits, cfg.momentum) if needs_act else None
        self.head: QLinear | None = None
        if num_classes > 0:
            self.head = QLinear(embed_dim, (2 if distilled else 1) * num_classes, True, per_channel=False)

    @classmethod
    def from_timm(cls, model: nn.Module, cfg: QuantConfig | None = None) -> QViT:
        """Convert a timm ``VisionTransformer`` / ``VisionTransformerDistilled`` (weights copied; the float model
        is left untouched).  Unsupported variants raise one ``IvitError`` line before any work."""
        cfg = cfg or QuantConfig()
        r = check_supported(model)
        if r:
            raise IvitError(r)
        blk0 = model.blocks[0]
        m = cls.empty_like(model, cfg, quick_gelu=act_kind(blk0.mlp.act) == "quick_gelu",
                           num_heads=blk0.attn.num_heads, mlp_hidden=blk0.mlp.fc1.out_features,
                           eps=blk0.norm1.eps)
        m.family = family_of(model)
        m.load_common(model, cfg)
        m.blocks = nn.ModuleList([QBlock.from_timm(b, cfg) for b in model.blocks])
        return m

    @classmethod
    def empty_like(cls, model: nn.Module, cfg: QuantConfig, *, num_heads: int, mlp_hidden: int, eps: float,
                   quick_gelu: bool = False, pool_include_prefix: bool | None = None) -> QViT:
        """A ``QViT`` with the geometry, tokens, pooling and head of the timm ``model`` (nothing loaded yet)."""
        if pool_include_prefix is None:
            pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        pe = model.patch_embed
        conv = pe.proj
        mean, std = normalization(model)
        pool = getattr(model, "global_pool", "token")
        attn_pool = getattr(model, "attn_pool", None)
        map_head = None
        if attn_pool is not None:
            map_head = dict(latent_len=attn_pool.latent_len, latent_dim=attn_pool.latent_dim,
                            q_proj=isinstance(attn_pool.q, nn.Linear), pool=attn_pool.pool)
        head = model.head
        return cls(img_size=tuple(pe.img_size), patch_size=conv.kernel_size[0], in_chans=conv.in_channels,
                   num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
                   embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=num_heads, mlp_hidden=mlp_hidden,
                   mean=mean, std=std, cfg=cfg, num_prefix=model.num_prefix_tokens,
                   pos_on_prefix=not getattr(model, "no_embed_class", False), pool=pool,
                   pool_include_prefix=pool_include_prefix,
                   norm_pre=not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
                   final_norm=not isinstance(getattr(model, "norm", nn.Identity()), nn.Identity),
                   fc_norm=not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
                   distilled=getattr(model, "dist_token", None) is not None, quick_gelu=quick_gelu, eps=eps,
                   map_head=map_head)

    def load_common(self, model: nn.Module, cfg: QuantConfig) -> None:
        """Copy the patch embedding, tokens, norms, attention pool and classifier(s) of the timm ``model``."""
        mean, std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        self.patch_embed = QPatchEmbed.from_conv(model.patch_embed.proj, mean, std, cfg.per_channel_weights)
        prefix = [t for t in (getattr(model, "cls_token", None), getattr(model, "reg_token", None),
                              getattr(model, "dist_token", None)) if t is not None]
        with torch.no_grad():
            if prefix:
                self.embed.cls_token.copy_(torch.cat([t.detach() for t in prefix], dim=1))
            pos = getattr(model, "pos_embed", None)
            if pos is not None:
                self.embed.pos_embed.copy_(pos)
            else:  # no absolute position embedding (rotary / relative-position ViTs): a constant zero
                self.embed.pos_embed.zero_()
                self.embed.pos_embed.requires_grad_(False)
        for name in ("norm_pre", "norm", "fc_norm"):
            if getattr(self, name) is not None:
                bits = cfg.residual_bits if name == "norm_pre" else cfg.act_bits
                setattr(self, name, ln_from(getattr(model, name), bits, cfg))
        if self.attn_pool is not None:
            self.attn_pool = QAttentionPool.from_timm(model.attn_pool, cfg)
        if self.head is not None:
            heads = [model.head] + ([model.head_dist] if self.distilled else [])
            w = torch.cat([h.weight.detach() for h in heads])
            b = torch.cat([h.bias.detach() if h.bias is not None else torch.zeros(h.out_features) for h in heads])
            with torch.no_grad():
                self.head.weight.copy_(w)
                self.head.bias.copy_(b)

    def rel_bias(self) -> Tensor | None:
        """The float ``(H, N, N)`` bias shared by every block (relative-position ViT), or None."""
        return None if self.shared_rel_pos is None else self.shared_rel_pos.mod.get_bias()[0]

    def rope_tables(self) -> list[tuple[Tensor, Tensor] | None]:
        """Per block the float ``(sin, cos)`` tables of a rotary ViT (None: no rotation)."""
        return [None] * len(self.blocks)

    def features(self, pixels: Tensor) -> QTensor:
        """uint8 ``(B, 3, H, W)`` -> the tokens after the blocks and the final norm: 8-bit ``(B, N, C)`` (16-bit
        without a final norm)."""
        x = self.input_qtensor(pixels)
        if self.crop != tuple(self.img_size):
            x = x.slice(2, 0, self.crop[0]).slice(3, 0, self.crop[1])
        x = self.patch_embed.patchify(x)  # int8 (B, L, 3pp)
        x = self.embed(self.patch_embed(x))  # int16 (B, P+L, C)
        if self.norm_pre is not None:
            x = self.norm_pre(x)  # int16
        shared = self.rel_bias()
        for blk, rope in zip(self.blocks, self.rope_tables(), strict=True):
            x = blk(x, shared, rope)
        return x if self.norm is None else self.norm(x)

    def forward(self, pixels: Tensor) -> QTensor:
        """uint8 ``(B, 3, H, W)`` -> ``QTensor`` of int32 logits ``(B, num_classes)``, or with ``num_classes=0``
        the pooled 8/16-bit embedding ``(B, C)``."""
        x = self.features(pixels)
        n = x.q.shape[1]
        if self.distilled:
            t = x.slice(1, 0, 2)  # (B, 2, C): class and distillation tokens
            if self.head is None:
                return mean_tokens(t)  # timm's pre-logits (x + x_dist) / 2
            if self.head_act is not None:
                t = self.head_act(t)
            return self._mean_of_heads(self.head(t))
        if self.pool == "token":
            t = x.select(1, 0)
        else:
            if self.num_prefix and not self.pool_include_prefix:
                x = x.slice(1, self.num_prefix, n)  # (B, L, C) the patch tokens
            if self.pool == "avg":
                t = mean_tokens(x)
            else:
                if self.pool_act is not None:
                    x = self.pool_act(x)
                t = self.attn_pool(x)
        if self.fc_norm is not None:
            t = self.fc_norm(t)
        if self.head is None:
            return t  # the pooled integer embedding
        if self.head_act is not None:
            t = self.head_act(t)
        return self.head(t)  # int32 (B, classes)

    def _mean_of_heads(self, acc: QTensor) -> QTensor:
        """``(B, 2, 2K)`` int32 of both heads (one weight scale ``S``) -> ``I_cls + I_dist`` at ``S / 2``."""
        k = self.num_classes
        a = acc.select(1, 0).slice(-1, 0, k)  # class token, class head
        b = acc.select(1, 1).slice(-1, k, 2 * k)  # distillation token, distillation head
        one_m, one_s = ops.dyadic(1.0)  # exactly 1: 2**30 / 2**30
        q, name = run("add_requantize", [a, b], {"mult_a": one_m, "shift_a": one_s, "mult_b": one_m,
                                                 "shift_b": one_s}, {"bits": 32})
        s = a.scale.to(torch.float64) / 2
        value = None
        if a.value is not None and b.value is not None:
            value = carry((a.value + b.value) / 2, q, s)
        return QTensor(q, s, 32, value, name)


def _check_attention(attn: nn.Module) -> None:
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity) or not isinstance(
            getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise IvitError("attention with q/k norm or inner norm is not supported")


def _check_mlp(mlp: nn.Module) -> None:
    """(Swin) plain GELU MLPs only."""
    if not isinstance(mlp.act, nn.GELU) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise IvitError(f"MLP activation {type(mlp.act).__name__} is not supported (GELU only)")


def _register() -> None:
    from timm.models.vision_transformer import VisionTransformer

    from .factory import register_converter

    register_converter(VisionTransformer)(QViT.from_timm)


_register()
