"""The public workflow: ``create_model`` -> ``quantize`` -> ``calibrate`` (PTQ) / train (QAT) -> ``freeze``.

    model = ivit.create_model("deit_small_patch16_224", pretrained=True)
    qmodel = ivit.quantize(model, ivit.QuantConfig())
    ivit.calibrate(qmodel, loader)             # running min/max of every activation
    program = ivit.freeze(qmodel)              # integer program
    program.save("deit_s.ivit"); engine = ivit.load("deit_s.ivit")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .errors import IvitError
from .layers import RangeObserver
from .models.base import QModel

__all__ = ["create_model", "quantize", "calibrate", "freeze_ranges", "register_converter", "CUSTOM_MODELS",
           "list_models"]

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


def _register_builtin() -> None:
    from timm.models.vision_transformer import VisionTransformer

    from .models.vit import QViT

    register_converter(VisionTransformer)(QViT.from_timm)
    try:
        from timm.models.swin_transformer import SwinTransformer

        from .models.swin import QSwin
    except ImportError:  # Swin support not built yet
        return
    register_converter(SwinTransformer)(QSwin.from_timm)


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


def quantize(model: nn.Module, config: QuantConfig | None = None) -> QModel:
    """Convert a float timm model into an integer I-ViT ``QModel`` (weights copied).

    The result must be calibrated (``calibrate``) or trained (QAT, train mode) before eval or freeze.
    """
    if isinstance(model, QModel):
        return model
    if not _CONVERTERS:
        _register_builtin()
    config = config or QuantConfig()
    for cls in type(model).__mro__:
        if cls in _CONVERTERS:
            q = _CONVERTERS[cls](model, config)
            name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
            if name:
                q.meta["name"] = name
            return q.to(next(model.parameters()).device)
    raise IvitError(f"cannot quantize {type(model).__name__}: supported are ViT/DeiT and Swin (timm)")


def _images(batch: Any) -> Tensor:
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise IvitError("calibration batches must be uint8 tensors or (images, labels) pairs")
    return batch


def calibrate(qmodel: QModel, batches: Iterable[Any], max_batches: int | None = None,
              progress: bool = False) -> QModel:
    """Post-training calibration: run batches in train mode without gradients so that every
    observer records running min/max; leaves the model in eval mode.  Returns ``qmodel``."""
    from tqdm.auto import tqdm

    qmodel.train()
    n = 0
    device = next(qmodel.parameters()).device
    with torch.no_grad():
        it = tqdm(batches, desc="calibrate", disable=not progress, leave=False)
        for batch in it:
            qmodel(_images(batch).to(device))
            n += 1
            if max_batches is not None and n >= max_batches:
                break
    if n == 0:
        raise IvitError("no calibration data")
    qmodel.eval()
    return qmodel


def freeze_ranges(qmodel: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) the running min/max updates of every observer."""
    for m in qmodel.modules():
        if isinstance(m, RangeObserver):
            m.frozen.fill_(frozen)
