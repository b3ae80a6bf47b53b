"""``ModelSpec``: exactly which float network a workflow builds, as data.

A spec is a timm model name plus the constructor arguments that change its geometry
(``model_args``: ``{"img_size": 28, "patch_size": 7, "embed_dim": 96, ...}``), and where its weights
come from (``checkpoint``, ``pretrained``).  It round-trips through JSON, goes into the metadata of every
program a workflow freezes (``meta["model_args"]``, ``meta["float_params"]``), and ``ivit bench`` /
``ivit inspect`` rebuild or describe that exact network from it (:func:`spec_from_program`).

Building is guarded: the parameter count is taken first on the ``meta`` device (nothing allocated) and
checked against ``Limits.max_float_params``; unknown or inconsistent constructor arguments are one
``IvitError`` line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import IvitError
from ..ir.limits import Limits

__all__ = ["ModelSpec", "parse_model_args", "spec_from_program", "checkpoint_spec", "SPEC_METADATA_KEY"]

#: safetensors metadata key under which ``ivit train`` records the spec of the weights it writes.
SPEC_METADATA_KEY = "ivit_model_spec"
#: Constructor arguments a spec sets through its own fields (or that would load weights behind its back).
_RESERVED = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                       "pretrained_strict", "features_only", "cache_dir"})
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MAX_KEYS = 64
_MAX_LIST = 64
_MAX_STR = 200


def _check_value(v: Any, where: str, depth: int = 0) -> Any:
    """A JSON scalar, or a (nested, at most 3 deep) list of them; lists become tuples."""
    if v is None or isinstance(v, (bool, str)):
        if isinstance(v, str) and len(v) > _MAX_STR:
            raise IvitError(f"{where}: string longer than {_MAX_STR} characters")
        return v
    if isinstance(v, int):
        if abs(v) > 2**53:
            raise IvitError(f"{where}: integer {v} out of range")
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise IvitError(f"{where}: non-finite number {v}")
        return v
    if isinstance(v, (list, tuple)):
        if depth >= 3 or len(v) > _MAX_LIST:
            raise IvitError(f"{where}: lists may hold at most {_MAX_LIST} values, nested at most 3 deep")
        return tuple(_check_value(x, where, depth + 1) for x in v)
    raise IvitError(f"{where} must be a JSON number, string, boolean, null or list, got {type(v).__name__}")


def _check_model_args(args: Any) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise IvitError(f"model arguments must be a JSON object (name -> value), got {type(args).__name__}")
    if len(args) > _MAX_KEYS:
        raise IvitError(f"at most {_MAX_KEYS} model arguments")
    out: dict[str, Any] = {}
    for k, v in args.items():
        if not isinstance(k, str) or not _KEY.match(k):
            raise IvitError(f"model argument name {str(k)[:40]!r} is not an identifier")
        if k in _RESERVED:
            raise IvitError(f"model argument {k!r} is not allowed (use --pretrained / --checkpoint)")
        out[k] = _check_value(v, f"model argument {k!r}")
    return out


def _jsonable(v: Any) -> Any:
    return [_jsonable(x) for x in v] if isinstance(v, tuple) else v


def _floats(v: Any, name: str) -> tuple[float, ...] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= 16 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        raise IvitError(f"ModelSpec.{name} must be a list of 1 to 16 finite numbers")
    if name == "std" and any(x <= 0 for x in v):
        raise IvitError("ModelSpec.std must be positive")
    return tuple(float(x) for x in v)


@dataclass(frozen=True)
class ModelSpec:
    """A float timm model: name, constructor arguments and the source of its weights.

    Attributes:
        name: a timm model name (``vit_tiny_patch16_224``, ``deit_small_patch16_224``, ``swin_tiny_...``) or
            one of ``ivit.models.CUSTOM_MODELS``.
        model_args: timm constructor arguments (JSON scalars and lists): the geometry of the network
            (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``in_chans``, ...).
        checkpoint: a local timm state dict loaded into the model (it must fit the geometry above).
        pretrained: timm's pretrained weights from the hub.
        num_classes: classifier size (overrides ``model_args["num_classes"]``, which must then agree).
        mean, std: the float model's input normalization (default: the model's ``pretrained_cfg``, or the
            one recorded with a checkpoint written by ``ivit train``).
    """

    name: str
    model_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= _MAX_STR:
            raise IvitError("ModelSpec.name must be a model name")
        args = _check_model_args(self.model_args)
        n = self.num_classes
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1_000_000):
            raise IvitError(f"ModelSpec.num_classes must be an integer in [1, 1000000], got {n!r}")
        if n is not None and "num_classes" in args and args["num_classes"] != n:
            raise IvitError(f"num_classes is {n} but model_args says {args['num_classes']}")
        if not isinstance(self.pretrained, bool):
            raise IvitError("ModelSpec.pretrained must be true or false")
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, Path)):
            raise IvitError("ModelSpec.checkpoint must be a path")
        if self.pretrained and self.checkpoint is not None:
            raise IvitError("use either --pretrained or --checkpoint, not both")
        object.__setattr__(self, "model_args", args)
        object.__setattr__(self, "checkpoint", None if self.checkpoint is None else str(self.checkpoint))
        object.__setattr__(self, "mean", _floats(self.mean, "mean"))
        object.__setattr__(self, "std", _floats(self.std, "std"))
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std or ())):
            raise IvitError("ModelSpec.mean and std go together, with one value per channel")

    # -- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_args"] = {k: _jsonable(v) for k, v in self.model_args.items()}
        d["mean"] = None if self.mean is None else list(self.mean)
        d["std"] = None if self.std is None else list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        """The inverse of :meth:`to_dict` (every field checked)."""
        known = {f.name for f in fields(cls)}
        problem = ("a model spec must be a JSON object" if not isinstance(d, dict) else
                   f"unknown model spec fields: {sorted(set(d) - known)}" if set(d) - known else
                   "a model spec needs a name" if "name" not in d else None)
        if problem:
            raise IvitError(problem)
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> ModelSpec:
        return cls.from_dict(_load_json(s, "model spec JSON"))

    # -- description ----------------------------------------------------------------------------

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments passed to timm (``num_classes`` included)."""
        kw = dict(self.model_args)
        if self.num_classes is not None:
            kw["num_classes"] = self.num_classes
        return kw

    def describe(self) -> str:
        """``vit_tiny_patch16_224(img_size=28, patch_size=7, ...)`` (the name alone without arguments)."""
        kw = self.kwargs()
        if not kw:
            return self.name
        return f"{self.name}({', '.join(f'{k}={json.dumps(_jsonable(v))}' for k, v in kw.items())})"

    def cli_args(self) -> str:
        """The command-line arguments that give this geometry."""
        kw = self.kwargs()
        return self.name + (f" --model-args '{json.dumps({k: _jsonable(v) for k, v in kw.items()})}'" if kw else "")

    def program_meta(self, float_params: int | None = None) -> dict[str, Any]:
        """What a workflow records in a frozen program's metadata."""
        meta: dict[str, Any] = {"model_args": {k: _jsonable(v) for k, v in self.kwargs().items()}}
        if float_params is not None:
            meta["float_params"] = int(float_params)
        return meta

    # -- building -------------------------------------------------------------------------------

    def _build(self, device: str | None) -> nn.Module:
        from ..models import create_model

        try:
            if device == "meta":
                with torch.device("meta"):
                    return create_model(self.name, **self.kwargs())
            return create_model(self.name, pretrained=self.pretrained, **self.kwargs())
        except IvitError:
            raise
        except TypeError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            m = re.search(r"unexpected keyword argument '(\w+)'", msg)
            if m:
                raise IvitError(f"{self.name} takes no model argument {m.group(1)!r} ({msg})") from None
            raise IvitError(f"cannot build {self.describe()}: {msg}") from None
        except (ValueError, AssertionError, RuntimeError, IndexError, KeyError, ZeroDivisionError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise IvitError(f"cannot build {self.describe()}: {msg}") from None

    def num_params(self) -> int:
        """Parameters of the float network, counted on the meta device (nothing is allocated)."""
        return sum(p.numel() for p in self._build("meta").parameters())

    def check_size(self, limits: Limits | None = None) -> int:
        """``num_params()``, refused in one line above ``limits.max_float_params``."""
        limits = limits or Limits()
        n = self.num_params()
        if n > limits.max_float_params:
            raise IvitError(f"{self.describe()} has {n:,} parameters (limit max_float_params="
                            f"{limits.max_float_params:,}; raise it with --limit max_float_params=N)")
        return n

    def with_checkpoint_normalization(self) -> ModelSpec:
        """This spec, with the normalization recorded in its checkpoint (written by ``ivit train``) when it
        names none itself."""
        if self.checkpoint is None or self.mean is not None:
            return self
        saved = checkpoint_spec(self.checkpoint)
        if saved is None or saved.mean is None:
            return self
        return replace(self, mean=saved.mean, std=saved.std)

    def create(self, limits: Limits | None = None) -> nn.Module:
        """Build the float timm model (size-checked first), load its weights and set its normalization."""
        from ..models.factory import load_timm_checkpoint

        self.check_size(limits)
        spec = self.with_checkpoint_normalization()
        model = spec._build(None)
        if spec.checkpoint is not None:
            try:
                load_timm_checkpoint(model, spec.checkpoint, expected=spec.describe())
            except IvitError as e:
                saved = checkpoint_spec(spec.checkpoint) if "does not match" in str(e) else None
                if saved is not None and (saved.name, saved.kwargs()) != (spec.name, spec.kwargs()):
                    raise IvitError(f"{e}; the checkpoint was written for {saved.cli_args()}") from None
                raise
        if spec.mean is not None:
            cfg = dict(getattr(model, "pretrained_cfg", None) or {})
            cfg.update(mean=spec.mean, std=spec.std)
            model.pretrained_cfg = cfg
        return model


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError included
        raise IvitError(f"{what} is not valid JSON: {str(e).splitlines()[0]}") from None


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``--model-args``: a JSON object (``'{"img_size": 28, "patch_size": 7}'``) or ``@FILE`` holding one."""
    if text is None or text == "":
        return {}
    src = "--model-args"
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise IvitError(f"cannot read --model-args file {path}: {getattr(e, 'strerror', None) or e}") from None
        src = str(path)
    args = _load_json(text, src)
    if not isinstance(args, dict):
        raise IvitError(f"{src} must be a JSON object such as '{{\"img_size\": 28, \"patch_size\": 7}}'")
    return _check_model_args(args)


def checkpoint_spec(path: str | Path) -> ModelSpec | None:
    """The spec ``ivit train`` recorded in a ``model.safetensors`` (None for other files)."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            text = (f.metadata() or {}).get(SPEC_METADATA_KEY)
        return None if text is None else ModelSpec.from_json(text)
    except Exception:  # noqa: BLE001 - an unreadable record is no record; loading reports the file's defect
        return None


def spec_from_program(meta: dict[str, Any]) -> ModelSpec:
    """The float network a program was frozen from, from its metadata.

    Programs written by the workflows carry ``model_args`` (the exact timm arguments); older ones
    (``.ivit`` format 1, or ``ivit.freeze`` without a spec) carry the name and the input geometry only, so
    the network is rebuilt from the name at the program's input size and class count.  The metadata is
    untrusted: every value is checked, and the spec's ``arch`` fields must agree with the program's.
    """
    name = meta.get("model")
    if not isinstance(name, str):
        raise IvitError("the program does not name its model")
    raw = meta.get("model_args")
    try:
        c, h, w = (int(v) for v in meta["input_shape"])
        n_cls = int(meta["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise IvitError("the program's metadata has no valid input_shape / num_classes") from None
    if raw is not None:
        spec = ModelSpec(name, _check_model_args(raw))
    else:
        from ..models import CUSTOM_MODELS

        args: dict[str, Any] = {} if name in CUSTOM_MODELS else {"img_size": [h, w] if h != w else h}
        if c != 3:
            args["in_chans"] = c
        spec = ModelSpec(name, args, num_classes=n_cls)
    arch = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    kw = spec.kwargs()
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans", "num_classes", "depths"):
        if key in kw and key in arch and _jsonable(kw[key]) != arch[key] and not (
                key == "embed_dim" and isinstance(arch.get("embed_dims"), list)):
            raise IvitError(f"the program's model_args say {key}={_jsonable(kw[key])} but it was frozen with "
                            f"{key}={arch[key]}")
    return spec
