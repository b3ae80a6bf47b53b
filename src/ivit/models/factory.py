"""Float timm models by name, and the registry binding timm model classes to their integer converters.

``create_model(name)`` builds a timm model (timm names, or the small ``CUSTOM_MODELS`` used by tests,
demos and benchmarks); ``register_converter(timm_cls)`` binds a timm class to the function that turns
it into an ivit ``QModel`` (registered next to each model's definition).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import IvitError
from .base import QModel

__all__ = ["create_model", "load_timm_checkpoint", "register_converter", "converter_for",
           "CUSTOM_MODELS", "DEFAULT_MEAN", "DEFAULT_STD", "normalization"]

#: Normalization of a model whose ``pretrained_cfg`` names none (timm's ImageNet default).
DEFAULT_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
DEFAULT_STD: tuple[float, ...] = (0.229, 0.224, 0.225)

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


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the float model expects its ``[0, 1]`` pixels normalized with (its ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", DEFAULT_MEAN)), tuple(cfg.get("std", DEFAULT_STD))


def create_model(name: str, *, pretrained: bool = False, checkpoint: str | None = None,
                 num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Create a float timm model by name (timm names or ``CUSTOM_MODELS``).

    Args:
        name: e.g. ``"deit_small_patch16_224"`` or ``"vit_digits"``.
        pretrained: load timm's pretrained weights from the hub (needs network access; fails in one line
            within seconds when the hub cannot be reached and the weights are not cached).
        checkpoint: a local timm state dict (``.safetensors``, or ``.pth``/``.pt`` loaded with
            ``weights_only=True``) to load into the model.
        num_classes: override the classifier size.
        **kwargs: timm constructor arguments (``img_size=28, patch_size=7, embed_dim=96, ...``).
    """
    import timm

    if name in CUSTOM_MODELS:
        family, kw = CUSTOM_MODELS[name]
        kw = {**kw, **kwargs}
        if num_classes is not None:
            kw["num_classes"] = num_classes
        if pretrained:
            raise IvitError(f"{name} is a custom size with no pretrained weights")
        if family == "vit":
            from timm.models.vision_transformer import VisionTransformer

            model: nn.Module = VisionTransformer(**kw)
        else:
            from timm.models.swin_transformer import SwinTransformer

            model = SwinTransformer(**kw)
        model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "architecture": name}
    else:
        if not timm.is_model(name):
            raise IvitError(f"unknown model {name!r}; try 'ivit models' for the list (e.g. deit_small_patch16_224)")
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if pretrained:
            with _hub_access(name):
                try:
                    model = timm.create_model(name, pretrained=True, **kwargs)
                except (OSError, RuntimeError, ValueError) as e:
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise IvitError(f"cannot download pretrained weights for {name} (offline?): {msg}") from None
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint is not None:
        load_timm_checkpoint(model, checkpoint)
    return model


#: Seconds to wait for a TCP connection to the weights' host before ``pretrained=True`` gives up.
HUB_TIMEOUT_S = 3.0
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                     "open_clip_pytorch_model.bin")


def _reachable(host: str, port: int = 443, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (name lookup included)."""
    import socket
    import threading

    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


class _hub_access:
    """Fail fast, in one line, when pretrained weights are neither cached nor downloadable (timm would retry
    for about a minute and print every attempt); when they are cached but the hub is unreachable, read the
    cache without asking the hub."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.patched: Any = None

    def __enter__(self) -> _hub_access:
        import os
        from urllib.parse import urlparse

        import timm

        cfg = timm.models.get_pretrained_cfg(self.name)
        d = cfg.to_dict() if cfg is not None else {}
        if d.get("file"):
            return self
        cached = False
        host = ""
        if d.get("hf_hub_id"):
            try:
                from huggingface_hub import constants, try_to_load_from_cache
            except ImportError:
                return self
            repo, _, rev = str(d["hf_hub_id"]).partition("@")
            cached = any(isinstance(try_to_load_from_cache(repo, f, revision=rev or None), str)
                         for f in _HUB_WEIGHT_FILES)
            endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
            host, port = endpoint.hostname or "huggingface.co", endpoint.port
            port = port or (80 if endpoint.scheme == "http" else 443)
            offline = bool(constants.HF_HUB_OFFLINE)
        elif d.get("url"):
            import torch.hub

            url = str(d["url"])
            cached = (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file()
            host, port = urlparse(url).hostname or "", urlparse(url).port or 443
            offline = False
        else:
            return self
        if offline and not cached:
            raise IvitError(f"cannot download pretrained weights for {self.name}: HF_HUB_OFFLINE is set and "
                            "they are not in the local cache")
        if offline or not host:
            return self
        if not _reachable(host, port):
            if not cached:
                raise IvitError(f"cannot download pretrained weights for {self.name} (offline?): {host}:{port} "
                                f"did not answer within {HUB_TIMEOUT_S:g} s and they are not in the local cache")
            if d.get("hf_hub_id"):
                from huggingface_hub import constants

                self.patched = constants.HF_HUB_OFFLINE
                constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.patched is not None:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = self.patched


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_timm_checkpoint(model: nn.Module, path: str | Path, expected: str | None = None) -> None:
    """Load a local timm state dict into ``model``; any defect gives one clear ``IvitError`` line.

    Args:
        model: the float model (its geometry comes from its name and constructor arguments only).
        path: ``.safetensors`` or a ``.pth``/``.pt`` file read with ``weights_only=True`` (``model``,
            ``state_dict`` or ``state_dict_ema`` entries are unwrapped).
        expected: how to describe the model in a mismatch message (e.g. ``vit_tiny_patch16_224(img_size=28)``).
    """
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
        raise IvitError(f"cannot read checkpoint {p}: {_first_line(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise IvitError(f"checkpoint {p} does not hold a state dict (names -> tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        what = expected or type(model).__name__
        first = ""
        if bad:
            k = bad[0]
            first = (f"; first: {k} is {tuple(sd[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the "
                     "model")
        elif missing or unexpected:
            first = f"; first: {(missing or unexpected)[0]} {'missing' if missing else 'unexpected'}"
        raise IvitError(f"checkpoint {p} does not match the model {what} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(bad)} shape mismatches{first}); the geometry comes "
                        "from the model name and its model arguments (--model-args) only")
    for k, v in sd.items():
        if v.dtype != own[k].dtype and not (v.is_floating_point() and own[k].is_floating_point()):
            raise IvitError(f"checkpoint {p}: {k} is {v.dtype}, the model has {own[k].dtype}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise IvitError(f"checkpoint {p} has non-finite values (NaN or inf) in {k}")
    model.load_state_dict(sd)
