"""Integer-only Swin Transformer, converted from ``timm.models.swin_transformer.SwinTransformer``.

Tokens are laid out ``(B, H, W, C)`` (no class token, no absolute position embedding).  Data flow
and widths (``ws`` window, ``N = ws_h * ws_w`` tokens per window, ``nW`` windows per image):

    uint8 pixels -> patchify int8 (B,L,3pp) -> int8 GEMM -> int32 -> int16 (B,gh,gw,C) -> I-LN -> int16
    stage:  [patch merging: 2x2 gather (B,H/2,W/2,4C) int16 -> I-LN int8 -> GEMM int32 -> int16]
    block:  x16 -> I-LN int8 -> roll(-shift) -> window partition (B*nW, N, C)
            -> attention (scores int32 + relative-position bias int32 at the score scale -> int16
               -> Shiftmax with the shifted-window mask, masked probabilities exactly 0) -> proj int32
            -> window reverse -> roll(+shift) -> add -> x16 -> I-LN -> MLP -> add -> x16
    head:   I-LN int8 -> integer mean over the H*W tokens (round half up) int8 -> int8 GEMM -> int32 logits

Window sizes, shifts and padding follow timm exactly: a stage whose resolution is not larger than
its window uses one window of the whole resolution and no shift (unless ``always_partition``);
resolutions that are not multiples of the window are zero-padded after the roll, the padded
tokens are cut off again after the window reverse (timm masks no padded token, neither do we).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import IvitError
from ..ir.trace import call
from ..nn import QAct, QAttention, QLayerNorm, QLinear, QMlp, QPatchEmbed, QResidualAdd
from ..qtensor import QTensor, carry
from .base import QModel
from .vit import _check_mlp

__all__ = [
    "QSwin",
    "QSwinStage",
    "QSwinBlock",
    "QPatchMerging",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_mask",
    "block_geometry",
    "pool_tokens",
]

Pair = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# Geometry: pure data movement and integer index/mask constants (shared by forward and tests).
# ---------------------------------------------------------------------------------------------

def window_partition(t: Tensor, ws: Pair) -> Tensor:
    """``(B, H, W, C)`` -> ``(B*nW, ws_h*ws_w, C)``, windows of one image contiguous (batch-major)."""
    b, h, w, c = t.shape
    t = t.reshape(b, h // ws[0], ws[0], w // ws[1], ws[1], c)  # (B, nH, wh, nW_, ww, C)
    return t.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws[0] * ws[1], c)  # (B*nW, N, C)


def window_reverse(t: Tensor, ws: Pair, h: int, w: int) -> Tensor:
    """``(B*nW, ws_h*ws_w, C)`` -> ``(B, H, W, C)`` (inverse of ``window_partition``)."""
    c = t.shape[-1]
    t = t.reshape(-1, h // ws[0], w // ws[1], ws[0], ws[1], c)  # (B, nH, nW_, wh, ww, C)
    return t.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)  # (B, H, W, C)


def relative_position_index(ws: Pair) -> Tensor:
    """int64 ``(N, N)``: row of the ``((2 wh - 1) * (2 ww - 1), heads)`` bias table for each token pair."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (rel[..., 0] + ws[0] - 1) * (2 * ws[1] - 1) + (rel[..., 1] + ws[1] - 1)


def shifted_window_mask(padded: Pair, ws: Pair, shift: Pair) -> Tensor | None:
    """bool ``(nW, N, N)``, True where two tokens of a shifted window came from different regions
    of the image (timm's -100 entries), or None without a shift.  ``padded``: the padded resolution."""
    if not any(shift):
        return None
    img = torch.zeros(1, padded[0], padded[1], 1, dtype=torch.int64)
    cnt = 0
    for hs in ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None)):
        for wsl in ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None)):
            img[:, hs[0]:hs[1], wsl[0]:wsl[1], :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)  # (nW, N) region id of each token
    return win.unsqueeze(1) != win.unsqueeze(2)


def block_geometry(resolution: Pair, window: Pair, shift: Pair, always_partition: bool) -> tuple[Pair, Pair]:
    """timm's ``SwinTransformerBlock._calc_window_shift``: the window and shift a block really uses.

    Without ``always_partition`` a dimension not larger than the window becomes one window with no shift.
    """
    if always_partition:
        return window, shift
    win = tuple(r if r <= w else w for r, w in zip(resolution, window, strict=True))
    sh = tuple(0 if r <= w else s for r, w, s in zip(resolution, win, shift, strict=True))
    return (win[0], win[1]), (sh[0], sh[1])


def _check_layernorm(mod: nn.Module, where: str) -> None:
    if isinstance(mod, nn.Identity):
        return
    if not isinstance(mod, nn.LayerNorm) or mod.weight is None or mod.bias is None or len(mod.normalized_shape) != 1:
        raise IvitError(f"{where}: only affine LayerNorm over channels is supported, got {type(mod).__name__}")


def _pair(v: int | Sequence[int]) -> Pair:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class QSwinBlock(nn.Module):
    """(Shifted-)window attention block on the 16-bit residual stream ``(B, H, W, C)``.

    The relative-position bias table stays a float parameter (trained in QAT); its gathered
    ``(heads, N, N)`` form is quantized to the attention-score scale inside ``QAttention``
    (``rel_bias_int``).  The shifted-window mask is a bool constant ``(nW, N, N)``.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int, resolution: Pair, window: Pair, shift: Pair,
                 cfg: QuantConfig) -> None:
        super().__init__()
        self.dim = dim
        self.resolution = resolution
        self.window = window
        self.shift = shift
        self.pad = ((window[0] - resolution[0] % window[0]) % window[0],
                    (window[1] - resolution[1] % window[1]) % window[1])
        self.padded = (resolution[0] + self.pad[0], resolution[1] + self.pad[1])
        self.norm1 = QLayerNorm(dim, cfg.act_bits, cfg.momentum, 1e-5, cfg.layernorm)
        self.attn = QAttention(dim, num_heads, cfg)
        self.rel_bias_table = nn.Parameter(torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads))
        nn.init.trunc_normal_(self.rel_bias_table, std=0.02)
        self.register_buffer("rel_index", relative_position_index(window), persistent=False)
        self.register_buffer("attn_mask", shifted_window_mask(self.padded, window, shift), persistent=False)
        self.add1 = QResidualAdd(cfg.residual_bits, cfg.momentum)
        self.norm2 = QLayerNorm(dim, cfg.act_bits, cfg.momentum, 1e-5, cfg.layernorm)
        self.mlp = QMlp(dim, hidden, cfg)
        self.add2 = QResidualAdd(cfg.residual_bits, cfg.momentum)

    @property
    def tokens(self) -> int:
        """Tokens per window ``N``."""
        return self.window[0] * self.window[1]

    def rel_bias(self) -> Tensor:
        """Float relative-position bias ``(heads, N, N)`` gathered from the table (as timm does)."""
        n = self.tokens
        return self.rel_bias_table[self.rel_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    @classmethod
    def from_timm(cls, blk: nn.Module, cfg: QuantConfig) -> QSwinBlock:
        attn = blk.attn
        dim = blk.norm1.normalized_shape[0]
        if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim:
            raise IvitError("Swin attention with head_dim * num_heads != dim is not supported")
        if getattr(blk, "dynamic_mask", False):
            raise IvitError("Swin with dynamic masks (strict_img_size=False) is not supported")
        m = cls(dim, attn.num_heads, blk.mlp.fc1.out_features, _pair(blk.input_resolution),
                _pair(blk.window_size), _pair(blk.shift_size), cfg)
        m.norm1 = QLayerNorm.from_float(blk.norm1, cfg.act_bits, cfg.momentum, cfg.layernorm)
        m.norm2 = QLayerNorm.from_float(blk.norm2, cfg.act_bits, cfg.momentum, cfg.layernorm)
        m.attn.load_timm(attn.qkv, attn.proj)
        _check_mlp(blk.mlp)
        m.mlp.fc1 = QLinear.from_float(blk.mlp.fc1, cfg.per_channel_weights)
        m.mlp.fc2 = QLinear.from_float(blk.mlp.fc2, cfg.per_channel_weights)
        with torch.no_grad():
            m.rel_bias_table.copy_(attn.relative_position_bias_table)
        if not torch.equal(m.rel_index, attn.relative_position_index.cpu()):
            raise IvitError("unexpected Swin relative position index")
        theirs = blk.attn_mask
        if (theirs is None) != (m.attn_mask is None) or (
                theirs is not None and not torch.equal(m.attn_mask, theirs.cpu() != 0)):
            raise IvitError("unexpected Swin shifted-window mask")
        return m

    def forward(self, x: QTensor) -> QTensor:
        """x: 16-bit ``(B, H, W, C)`` -> 16-bit ``(B, H, W, C)``."""
        (h, w), (sh, sw), (ph, pw), (hp, wp), (wh, ww) = self.resolution, self.shift, self.pad, self.padded, self.window
        c = self.dim
        t = self.norm1(x)  # int8 (B, H, W, C)
        if sh or sw:
            t = t.roll((-sh, -sw), (1, 2))
        if ph or pw:
            t = t.pad((0, 0, 0, pw, 0, ph))  # (B, Hp, Wp, C); integer 0 stands for 0.0
        # window partition: (B, Hp, Wp, C) -> (B*nW, N, C), windows of one image contiguous
        t = t.reshape(0, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)
        a = self.attn(t, self.rel_bias(), self.attn_mask)  # int32 (B*nW, N, C), per-channel scale
        # window reverse: (B*nW, N, C) -> (B, Hp, Wp, C)
        a = a.reshape(-1, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
        if ph or pw:
            a = a.slice(1, 0, h).slice(2, 0, w)
        if sh or sw:
            a = a.roll((sh, sw), (1, 2))
        x = self.add1(x, a)
        return self.add2(x, self.mlp(self.norm2(x)))


class QPatchMerging(nn.Module):
    """2x2 neighbour gather ``(B, H, W, C) -> (B, H/2, W/2, 4C)`` -> I-LayerNorm (8-bit) -> int8 linear
    (no bias) -> requantized to the 16-bit residual stream.  Odd sizes are zero-padded first (timm)."""

    def __init__(self, dim: int, out_dim: int, resolution: Pair, cfg: QuantConfig) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.resolution = resolution
        self.pad = (resolution[0] % 2, resolution[1] % 2)
        self.norm = QLayerNorm(4 * dim, cfg.act_bits, cfg.momentum, 1e-5, cfg.layernorm)
        self.reduction = QLinear(4 * dim, out_dim, False, cfg.per_channel_weights)
        self.out_act = QAct(cfg.residual_bits, cfg.momentum)

    @property
    def out_resolution(self) -> Pair:
        return ((self.resolution[0] + 1) // 2, (self.resolution[1] + 1) // 2)

    @classmethod
    def from_timm(cls, pm: nn.Module, resolution: Pair, cfg: QuantConfig) -> QPatchMerging:
        m = cls(pm.dim, pm.out_dim, resolution, cfg)
        m.norm = QLayerNorm.from_float(pm.norm, cfg.act_bits, cfg.momentum, cfg.layernorm)
        m.reduction = QLinear.from_float(pm.reduction, cfg.per_channel_weights)
        return m

    def forward(self, x: QTensor) -> QTensor:
        """x: 16-bit ``(B, H, W, C)`` -> 16-bit ``(B, H/2, W/2, out_dim)``."""
        ph, pw = self.pad
        if ph or pw:
            x = x.pad((0, 0, 0, pw, 0, ph))
        (h2, w2), c = self.out_resolution, self.dim
        # (B, H/2, 2, W/2, 2, C) -> (B, H/2, W/2, 2w, 2h, C) -> (B, H/2, W/2, 4C), timm's channel order
        x = x.reshape(0, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(0, h2, w2, 4 * c)
        return self.out_act(self.reduction(self.norm(x)))


class QSwinStage(nn.Module):
    """Optional patch merging, then the stage's blocks (alternating plain and shifted windows)."""

    def __init__(self, downsample: QPatchMerging | None, blocks: Sequence[QSwinBlock]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: QTensor) -> QTensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class QSwin(QModel):
    """Integer-only Swin Transformer (average pooling), input uint8 pixels, output int32 logits.

    Constructed from its hyper-parameters (``meta``), which reproduce timm's geometry; ``from_timm``
    copies the weights of a timm ``SwinTransformer`` and checks the geometry against it.
    """

    family = "swin"

    def __init__(self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, num_classes: int,
                 embed_dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 window_sizes: Sequence[Pair], mlp_hidden: Sequence[int], always_partition: bool,
                 patch_norm: bool, mean: tuple[float, ...], std: tuple[float, ...], cfg: QuantConfig) -> None:
        n_st = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(window_sizes) == len(mlp_hidden) == n_st) or n_st == 0:
            raise IvitError("Swin stage lists (embed_dims, depths, num_heads, window_sizes, mlp_hidden) "
                            "must be non-empty and of equal length")
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise IvitError(f"image size {tuple(img_size)} is not a multiple of the patch size {patch_size}")
        window_sizes = [_pair(w) for w in window_sizes]
        meta = dict(img_size=list(img_size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                    embed_dims=list(embed_dims), depths=list(depths), num_heads=list(num_heads),
                    window_sizes=[list(w) for w in window_sizes], mlp_hidden=list(mlp_hidden),
                    always_partition=always_partition, patch_norm=patch_norm, mean=list(mean), std=list(std))
        super().__init__(cfg, img_size, in_chans, patch_size, num_classes, meta)
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.embed_dim = embed_dims[0]
        self.num_features = embed_dims[-1]
        self.patch_embed = QPatchEmbed(in_chans, patch_size, embed_dims[0], mean, std, cfg.per_channel_weights)
        self.embed_act = QAct(cfg.residual_bits, cfg.momentum)
        self.patch_norm = (QLayerNorm(embed_dims[0], cfg.residual_bits, cfg.momentum, 1e-5, cfg.layernorm)
                           if patch_norm else None)
        stages = []
        res = self.grid
        for i in range(n_st):
            down = None
            if i > 0:
                down = QPatchMerging(embed_dims[i - 1], embed_dims[i], res, cfg)
                res = down.out_resolution
            win = window_sizes[i]
            blocks = []
            for j in range(depths[i]):
                target_shift = (0, 0) if j % 2 == 0 else (win[0] // 2, win[1] // 2)
                bw, bs = block_geometry(res, win, target_shift, always_partition)
                blocks.append(QSwinBlock(embed_dims[i], num_heads[i], mlp_hidden[i], res, bw, bs, cfg))
            stages.append(QSwinStage(down, blocks))
        self.stages = nn.ModuleList(stages)
        self.final_resolution = res
        self.norm = QLayerNorm(self.num_features, cfg.act_bits, cfg.momentum, 1e-5, cfg.layernorm)
        self.head = QLinear(self.num_features, num_classes, True, per_channel=False)

    @classmethod
    def from_timm(cls, model: nn.Module, cfg: QuantConfig | None = None) -> QSwin:
        """Convert a timm ``SwinTransformer`` (weights copied; the float model is left untouched)."""
        cfg = cfg or QuantConfig()
        if getattr(model, "dynamic_img_size", False):
            raise IvitError("Swin with dynamic_img_size / strict_img_size=False is not supported")
        if getattr(model, "absolute_pos_embed", None) is not None:
            raise IvitError("Swin with an absolute position embedding is not supported")
        if getattr(model, "global_pool", "avg") != "avg":
            raise IvitError("only average-pooled Swin models are supported (global_pool='avg')")
        fc = getattr(model.head, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise IvitError("the classifier must be a Linear layer (num_classes > 0)")
        pe = model.patch_embed
        conv = pe.proj
        if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1:
            raise IvitError("patch embedding must be a square conv with stride == kernel size")
        if getattr(pe, "dynamic_img_pad", False):
            raise IvitError("Swin patch embedding with dynamic padding is not supported")
        norm = getattr(pe, "norm", nn.Identity())
        patch_norm = not isinstance(norm, nn.Identity)
        if patch_norm and not isinstance(norm, nn.LayerNorm):
            raise IvitError(f"patch-embedding norm {type(norm).__name__} is not supported (LayerNorm only)")
        for name, mod in model.named_modules():
            if name.endswith("norm") or name.endswith("norm1") or name.endswith("norm2"):
                _check_layernorm(mod, name)
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(pcfg.get("std", (0.229, 0.224, 0.225)))
        stages = list(model.layers)
        if any(len(st.blocks) == 0 for st in stages):
            raise IvitError("Swin stages with no blocks are not supported")
        firsts = [st.blocks[0] for st in stages]
        # the windows the stages asked for (timm keeps them; a block's own window may be cut to its resolution,
        # which gives the same geometry unless always_partition, where blocks keep the requested window)
        ref = getattr(model, "_ref_window_sizes", None)
        windows = [_pair(w) for w in ref] if ref is not None and len(ref) == len(stages) else [
            _pair(b.window_size) for b in firsts]
        always = bool(getattr(firsts[0], "always_partition", False))
        embed_dims = [b.norm1.normalized_shape[0] for b in firsts]
        depths = [len(st.blocks) for st in stages]
        heads = [b.attn.num_heads for b in firsts]
        hidden = [b.mlp.fc1.out_features for b in firsts]
        img = _pair(pe.img_size)
        m = cls(img_size=img, patch_size=conv.kernel_size[0], in_chans=conv.in_channels,
                num_classes=fc.out_features, embed_dims=embed_dims, depths=depths, num_heads=heads,
                window_sizes=windows, mlp_hidden=hidden, always_partition=always, patch_norm=patch_norm,
                mean=mean, std=std, cfg=cfg)
        m.patch_embed = QPatchEmbed.from_conv(conv, mean, std, cfg.per_channel_weights)
        if patch_norm:
            m.patch_norm = QLayerNorm.from_float(norm, cfg.residual_bits, cfg.momentum, cfg.layernorm)
        for qst, st in zip(m.stages, stages, strict=True):
            if qst.downsample is not None:
                pm = st.downsample
                if type(pm).__name__ != "PatchMerging":
                    raise IvitError(f"Swin downsample {type(pm).__name__} is not supported")
                qst.downsample = QPatchMerging.from_timm(pm, qst.downsample.resolution, cfg)
            elif not isinstance(st.downsample, nn.Identity):
                raise IvitError("unexpected downsampling in the first Swin stage")
            for i, (qb, b) in enumerate(zip(qst.blocks, st.blocks, strict=True)):
                geom = (qb.resolution, qb.window, qb.shift)
                theirs = (_pair(b.input_resolution), _pair(b.window_size), _pair(b.shift_size))
                if geom != theirs:
                    raise IvitError(f"Swin block geometry (resolution, window, shift) {theirs} differs from the "
                                    f"expected {geom}; models resized after construction are not supported")
                qst.blocks[i] = QSwinBlock.from_timm(b, cfg)
        m.norm = QLayerNorm.from_float(model.norm, cfg.act_bits, cfg.momentum, cfg.layernorm)
        m.head = QLinear.from_float(fc, per_channel=False)
        return m

    def forward(self, pixels: Tensor) -> QTensor:
        """uint8 ``(B, 3, H, W)`` -> ``QTensor`` of int32 logits ``(B, num_classes)``."""
        gh, gw = self.grid
        x = self.patch_embed.patchify(self.input_qtensor(pixels))  # int8 (B, L, 3pp)
        x = self.embed_act(self.patch_embed(x))  # int16 (B, L, C)
        x = x.reshape(0, gh, gw, self.embed_dim)  # (B, gh, gw, C)
        if self.patch_norm is not None:
            x = self.patch_norm(x)  # int16
        for st in self.stages:
            x = st(x)
        x = self.norm(x)  # int8 (B, H, W, C)
        return self.head(pool_tokens(x))  # int32 (B, classes)


def pool_tokens(x: QTensor) -> QTensor:
    """Integer mean over the ``H*W`` tokens of ``(B, H, W, C)`` (``ops.int_mean``, half up) -> ``(B, C)``."""
    t = x.reshape(0, -1, x.q.shape[-1])  # (B, H*W, C)
    q, name = call("mean", [t], attrs={"dim": 1})
    value = None if t.value is None else carry(t.value.mean(dim=1), q, x.scale)
    return QTensor(q, x.scale, x.bits, value, name)


def _register() -> None:
    from timm.models.swin_transformer import SwinTransformer

    from .factory import register_converter

    register_converter(SwinTransformer)(QSwin.from_timm)


_register()
