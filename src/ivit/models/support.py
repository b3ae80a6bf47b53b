"""Which timm models quantize: one structural decision per name, and the grouped list of those that do.

``support(name)`` builds the timm model on the meta device (no weights, no memory) and asks its family's
``check_supported`` (the same function ``quantize`` runs before any work).  ``list_supported()`` does that
for every name of ``PATTERNS`` plus ``CUSTOM_MODELS``; building ~260 models on the meta device takes about a
minute, so the table is cached in ``~/.cache/ivit`` (``$IVIT_CACHE`` or ``$XDG_CACHE_HOME/ivit``), keyed by
the timm and ivit versions and a hash of the checking code, with a progress bar on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import IvitError
from . import eva, swin, vit, vit_relpos
from .factory import CUSTOM_MODELS, register_converter

__all__ = ["PATTERNS", "FAMILIES", "support", "classify", "list_supported", "list_models", "support_table", "refused",
           "swin_reason", "cache_path"]

#: timm name patterns searched for supported models
PATTERNS = ("vit_*", "deit*", "flexivit_*", "eva*", "swin_*")

#: family -> one-line description (the listing's group headings)
FAMILIES: dict[str, str] = {
    "vit": "ViT / DeiT / CLIP / DINOv2, class-token head (or its embedding)",
    "vit_gap": "ViT, global-average-pool head (fc_norm, register tokens)",
    "vit_map": "ViT with an attention-pool (MAP) head: SigLIP",
    "deit_distilled": "DeiT distilled: class + distillation heads, mean of both logits",
    "vit_relpos": "ViT with relative position bias",
    "vit_rope": "ViT with rotary position embedding (RoPE ViT, DINOv3, Perception Encoder)",
    "eva": "EVA (Eva class without RoPE)",
    "swin": "Swin Transformer",
}


def swin_reason(model: nn.Module) -> str | None:
    """The structural checks of ``QSwin.from_timm`` (one line, None: convertible)."""
    if getattr(model, "dynamic_img_size", False):
        return "Swin with dynamic_img_size / strict_img_size=False is not supported"
    if getattr(model, "absolute_pos_embed", None) is not None:
        return "Swin with an absolute position embedding is not supported"
    if getattr(model, "global_pool", "avg") != "avg":
        return "only average-pooled Swin models are supported (global_pool='avg')"
    if not isinstance(getattr(model.head, "fc", None), nn.Linear):
        return "Swin without a classifier (num_classes=0) is not supported"
    pe = model.patch_embed
    conv = pe.proj
    if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1:
        return "patch embedding must be a square conv with stride == kernel size"
    if getattr(pe, "dynamic_img_pad", False):
        return "Swin patch embedding with dynamic padding is not supported"
    if any(s % conv.kernel_size[0] for s in swin._pair(pe.img_size)):
        return "Swin image size must be a multiple of the patch size"
    for name, mod in model.named_modules():
        if name.endswith(("norm", "norm1", "norm2")) and not isinstance(mod, nn.Identity):
            if not isinstance(mod, nn.LayerNorm) or mod.weight is None or mod.bias is None:
                return f"{name}: only affine LayerNorm over channels is supported, got {type(mod).__name__}"
    for i, st in enumerate(model.layers):
        if len(st.blocks) == 0:
            return "Swin stages with no blocks are not supported"
        if i > 0 and type(st.downsample).__name__ != "PatchMerging":
            return f"Swin downsample {type(st.downsample).__name__} is not supported"
        for blk in st.blocks:
            dim = blk.norm1.normalized_shape[0]
            if blk.attn.qkv.out_features != 3 * dim or blk.attn.proj.in_features != dim:
                return "Swin attention with head_dim * num_heads != dim is not supported"
            if getattr(blk, "dynamic_mask", False):
                return "Swin with dynamic masks is not supported"
            if not isinstance(blk.mlp.act, nn.GELU) or not isinstance(getattr(blk.mlp, "norm", nn.Identity()),
                                                                        nn.Identity):
                return f"Swin MLP activation {type(blk.mlp.act).__name__} is not supported (GELU only)"
    return None


def _checked_swin(model: nn.Module, cfg: QuantConfig | None = None) -> swin.QSwin:
    """``QSwin.from_timm`` behind ``swin_reason``: the one-line refusal comes before any weight is copied."""
    r = swin_reason(model)
    if r:
        raise IvitError(r)
    return swin.QSwin.from_timm(model, cfg)


def _register() -> None:
    from timm.models.swin_transformer import SwinTransformer

    register_converter(SwinTransformer)(_checked_swin)


_register()


def classify(model: nn.Module) -> tuple[str, str | None]:
    """``(family, reason)`` of a timm model (reason None: it quantizes).  Structural: meta-device models work."""
    from timm.models.eva import Eva
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    if isinstance(model, VisionTransformer):
        return vit.family_of(model), vit.check_supported(model)
    if isinstance(model, VisionTransformerRelPos):
        return "vit_relpos", vit_relpos.check_supported(model)
    if isinstance(model, Eva):
        return ("vit_rope" if getattr(model, "rope", None) is not None else "eva"), eva.check_supported(model)
    if isinstance(model, SwinTransformer):
        return "swin", swin_reason(model)
    return type(model).__name__, f"{type(model).__name__} is not a supported architecture (ViT, DeiT, EVA, Swin)"


def _meta_model(name: str) -> nn.Module:
    import timm

    if name in CUSTOM_MODELS:
        from .factory import create_model

        return create_model(name)  # tiny: build it for real
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:  # skipping the (meta-device) weight init makes this ~2x faster where the class allows it
            return timm.create_model(name, pretrained=False, weight_init="skip")
        except TypeError:
            return timm.create_model(name, pretrained=False)


def support(name: str) -> tuple[bool, str, str | None]:
    """``(ok, family, reason)``: whether timm (or custom) model ``name`` quantizes and freezes, its listing
    family, and otherwise the one-line reason it is refused."""
    import timm

    if name not in CUSTOM_MODELS and not timm.is_model(name):
        return False, "", f"unknown model {name!r}"
    try:
        model = _meta_model(name)
    except Exception as e:  # noqa: BLE001 - a timm entry point that cannot even be built is refused
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return False, "", f"timm cannot build {name}: {msg}"
    family, reason = classify(model)
    return reason is None, family, reason


def _names() -> list[str]:
    import timm

    return sorted(set(timm.list_models(list(PATTERNS))) | set(CUSTOM_MODELS))


def _code_hash() -> str:
    h = hashlib.sha256()
    for mod in (vit, eva, vit_relpos, swin):
        h.update(Path(mod.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the support table is cached (``ivit.native.cache_dir()``: ``$IVIT_CACHE``, ``$XDG_CACHE_HOME/ivit`` or
    ``~/.cache/ivit``, like the built kernels)."""
    import timm

    from .. import __version__
    from ..native import cache_dir as ivit_cache

    if cache_dir is None:
        cache_dir = ivit_cache()
    return Path(cache_dir) / f"supported-timm{timm.__version__}-ivit{__version__}-{_code_hash()}.json"


def support_table(progress: bool = False, cache_dir: str | os.PathLike[str] | None = None, refresh: bool = False,
                  names: list[str] | None = None, decide: Callable[[str], tuple[bool, str, str | None]] | None = None,
                  ) -> dict[str, tuple[bool, str, str | None]]:
    """``{name: (ok, family, reason)}`` for every name of ``PATTERNS`` and ``CUSTOM_MODELS`` (or ``names``,
    uncached), read from the cache when it is there (``refresh`` rebuilds it).  ``decide``: default ``support``."""
    from tqdm.auto import tqdm

    decide = decide or support
    if names is not None:
        return {n: decide(n) for n in names}
    path = cache_path(cache_dir)
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text())
            return {n: (bool(v[0]), str(v[1]), v[2]) for n, v in data["models"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass  # a corrupt cache is rebuilt
    table = {n: decide(n) for n in tqdm(_names(), desc="checking timm models (cached after the first time)",
                                         disable=not progress, leave=False)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"models": {n: list(v) for n, v in table.items()}}, indent=0, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # no cache (read-only home): still answer
    return table


def list_supported(progress: bool = False, cache_dir: str | os.PathLike[str] | None = None,
                   refresh: bool = False) -> dict[str, list[str]]:
    """``{family: [names]}`` of the models that quantize and freeze, families in ``FAMILIES`` order."""
    table = support_table(progress, cache_dir, refresh)
    out: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for name, (ok, family, _) in sorted(table.items()):
        if ok:
            out.setdefault(family, []).append(name)
    return {f: names for f, names in out.items() if names}


def list_models(progress: bool = False) -> list[str]:
    """Every model name that quantizes and freezes (all families, sorted): what ``ivit models`` lists."""
    return sorted(n for names in list_supported(progress).values() for n in names)


def refused(progress: bool = False, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``{name: reason}`` of the listed timm names that do not quantize."""
    return {n: str(r) for n, (ok, _, r) in sorted(support_table(progress, cache_dir).items()) if not ok}
