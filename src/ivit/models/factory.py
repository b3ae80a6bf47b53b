"""Float timm models by name, and the registry binding timm model classes to their integer converters.

``create_model(name)`` builds a timm model (timm names, or the small ``CUSTOM_MODELS`` used by tests,
demos and benchmarks); ``register_converter(timm_cls)`` binds a timm class to the function that turns
it into an ivit ``QModel`` (registered next to each model's definition).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import IvitError
from .base import QModel

__all__ = ["create_model", "load_timm_checkpoint", "list_models", "register_converter", "converter_for",
           "CUSTOM_MODELS"]

#: Small custom sizes (timm VisionTransformer / SwinTransformer kwargs) for tests, demos and benchmarks.
CUSTOM_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_digits": ("vit", dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                               num_classes=10)),
    "vit_fmnist": ("vit", dict(img_size=28, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
                               num_classes=10)),
    "vit_test": ("vit", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_classes=10)),
    # 4x4 patch grid, 2x2 windows: stage 1 runs plain and shifted (masked) windows, stage 2 (2x2) one window
    "swin_digits": ("swin", dict(img_size=16, patch_size=4, window_size=2, embed_dim=32, depths=(2, 2),
                                 num_heads=(2, 4), mlp_ratio=2.0, drop_path_rate=0.0, num_classes=10)),
    "swin_test": ("swin", dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                               num_heads=(2, 2), mlp_ratio=2.0, drop_path_rate=0.0, num_classes=10)),
}

_CONVERTERS: dict[type, Callable[[nn.Module, QuantConfig], QModel]] = {}


def register_converter(timm_cls: type) -> Callable[[Callable[[nn.Module, QuantConfig], QModel]],
                                                    Callable[[nn.Module, QuantConfig], QModel]]:
    """Bind a timm model class to the function converting it into an ivit ``QModel``."""
    def deco(fn: Callable[[nn.Module, QuantConfig], QModel]) -> Callable[[nn.Module, QuantConfig], QModel]:
        _CONVERTERS[timm_cls] = fn
        return fn
    return deco


def converter_for(model: nn.Module) -> Callable[[nn.Module, QuantConfig], QModel] | None:
    """The registered converter of ``model``'s class (or of its nearest registered base class)."""
    for cls in type(model).__mro__:
        if cls in _CONVERTERS:
            return _CONVERTERS[cls]
    return None


def list_models() -> list[str]:
    """Supported model names: the custom sizes plus the timm families we convert."""
    import timm

    names = set(CUSTOM_MODELS)
    for pattern in ("deit_*", "vit_*", "swin_*"):
        names.update(timm.list_models(pattern))
    return sorted(names)


def create_model(name: str, *, pretrained: bool = False, checkpoint: str | None = None,
                 num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Create a float timm model by name (timm names or ``CUSTOM_MODELS``).

    Args:
        name: e.g. ``"deit_small_patch16_224"`` or ``"vit_digits"``.
        pretrained: load timm's pretrained weights from the hub (needs network access).
        checkpoint: a local timm state dict (``.safetensors``, or ``.pth``/``.pt`` loaded with
            ``weights_only=True``) to load into the model.
        num_classes: override the classifier size.
    """
    import timm

    if name in CUSTOM_MODELS:
        family, kw = CUSTOM_MODELS[name]
        kw = {**kw, **kwargs}
        if num_classes is not None:
            kw["num_classes"] = num_classes
        if family == "vit":
            from timm.models.vision_transformer import VisionTransformer

            model: nn.Module = VisionTransformer(**kw)
        else:
            from timm.models.swin_transformer import SwinTransformer

            model = SwinTransformer(**kw)
        model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "architecture": name}
        if pretrained:
            raise IvitError(f"{name} is a custom size with no pretrained weights")
    else:
        if not timm.is_model(name):
            raise IvitError(f"unknown model {name!r}; try 'ivit models' for the list (e.g. deit_small_patch16_224)")
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            if pretrained:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise IvitError(f"cannot download pretrained weights for {name} (offline?): {msg}") from None
            raise
    if checkpoint is not None:
        load_timm_checkpoint(model, checkpoint)
    return model


def load_timm_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local timm state dict into ``model``; mismatches give one clear ``IvitError`` line."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise IvitError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
            for key in ("state_dict", "model", "state_dict_ema"):
                if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                    sd = sd[key]
                    break
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IvitError(f"cannot read checkpoint {p}: {msg}") from None
    if not isinstance(sd, dict):
        raise IvitError(f"checkpoint {p} does not hold a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(bad)} shape mismatches"
                  + (f" (first: {(bad or missing or unexpected)[0]})" if (bad or missing or unexpected) else ""))
        raise IvitError(f"checkpoint {p} does not match the model: {detail}")
    model.load_state_dict(sd)


