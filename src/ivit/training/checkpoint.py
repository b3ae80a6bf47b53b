"""Training checkpoints: one safetensors file of tensors plus JSON metadata, written atomically.

A checkpoint holds everything a run needs to continue exactly where it stopped:

* ``model/<key>``: the model's state dict (parameters and buffers, observers included);
* ``optim/<param index>/<key>``: the optimizer state tensors (AdamW ``exp_avg``, ``exp_avg_sq``, ``step``);
* ``rng/<rank>/<source>``: the random states of every rank (torch CPU/CUDA, numpy, Python);
* the header metadata ``meta`` (JSON): run identity (kind, model name, architecture, ``QuantConfig``),
  training config, position (epoch, step), optimizer hyper-parameters, per-rank counters, the
  metric history and plain module attributes (the ShiftExp ``n_max`` chosen per layer).

No pickle anywhere: loading parses JSON and raw tensor bytes only.  Files are written to a temporary
file in the same folder, fsynced, then renamed over the old one (``os.replace``), so a crash at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_path
from ..errors import IvitError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_meta",
    "pack_optimizer",
    "unpack_optimizer",
    "rng_state",
    "set_rng_state",
    "module_attrs",
    "set_module_attrs",
    "check_identity",
]

FORMAT = "ivit-train-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Tensors by name and the JSON metadata of one checkpoint file."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]

    def group(self, prefix: str) -> dict[str, Tensor]:
        """Tensors under ``prefix/`` with the prefix stripped."""
        p = prefix + "/"
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    Raises:
        IvitError: the output folder does not exist.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise IvitError(f"output folder does not exist: {path.parent}")
    flat: dict[str, Tensor] = {}
    storages: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in storages:  # safetensors refuses tensors sharing memory
            t = t.clone()
        storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        flat[k] = t
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)}
    with atomic_path(path) as tmp:
        save_file(flat, tmp, metadata=metadata)
    _fsync_dir(path.parent)
    return path


def _header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise IvitError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IvitError(f"not an ivit training checkpoint ({msg}): {path}") from None
    if metadata.get("format") != FORMAT:
        raise IvitError(f"not an ivit training checkpoint (no {FORMAT} header): {path}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise IvitError(f"unsupported checkpoint version {metadata.get('format_version')!r} "
                        f"(this ivit reads {FORMAT_VERSION}): {path}")
    return metadata


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint (cheap: the tensors are not read)."""
    p = Path(path)
    try:
        meta = json.loads(_header(p)["meta"])
    except (KeyError, json.JSONDecodeError):
        raise IvitError(f"corrupt checkpoint metadata: {p}") from None
    if not isinstance(meta, dict):
        raise IvitError(f"corrupt checkpoint metadata: {p}")
    return meta


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; any defect is one ``IvitError`` line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    meta = read_meta(p)
    try:
        tensors = load_file(str(p), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IvitError(f"cannot read checkpoint {p}: {msg}") from None
    return Checkpoint(tensors, meta)


def check_identity(path: str | os.PathLike[str], saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise one clear ``IvitError`` line if a checkpoint belongs to another model / config."""
    first = ("kind", "model", "model_class")  # the most telling differences first
    keys = [k for k in first if k in saved or k in current]
    keys += sorted((set(saved) | set(current)) - set(first))
    diffs = [k for k in keys if saved.get(k) != current.get(k)]
    if not diffs:
        return
    k = diffs[0]

    def show(v: Any) -> str:
        s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
        return s if len(s) <= 60 else s[:57] + "..."

    raise IvitError(f"checkpoint {path} is from a different run: {k} is {show(saved.get(k))} there but "
                    f"{show(current.get(k))} here; use the same model/options or a new output folder")


# ---------------------------------------------------------------------------------------------
# optimizer


def pack_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors (``<param index>/<key>``) and JSON (param groups, scalars)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{idx}/{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unpack_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Inverse of :func:`pack_optimizer` (loads into ``opt``)."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = t
    for idx, d in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    groups = []
    for g in info["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise IvitError(f"checkpoint optimizer state does not fit this model: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# random states


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's random states (torch CPU and CUDA, numpy, Python) as tensors + JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    info = {"numpy": [name, int(pos), int(has_gauss), float(cached)], "python": [version, gauss_next]}
    return tensors, info


def set_rng_state(tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(tensors["torch"].cpu().to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k].cpu().to(torch.uint8) for k in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    name, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = info["python"]
    random.setstate((version, tuple(int(v) for v in tensors["python"].tolist()), gauss_next))


# ---------------------------------------------------------------------------------------------
# plain module attributes (not in the state dict)


def module_attrs(model: nn.Module) -> dict[str, dict[str, int]]:
    """Integer free parameters kept as plain attributes: the ShiftExp ``n_max`` of every
    ``QShiftmax`` / ``QShiftGELU`` (set per layer by the PTQ search)."""
    from ..nn import QShiftGELU, QShiftmax

    return {name: {"n_max": int(m.n_max)} for name, m in model.named_modules()
            if isinstance(m, (QShiftmax, QShiftGELU))}


def set_module_attrs(model: nn.Module, attrs: dict[str, dict[str, int]]) -> None:
    """Inverse of :func:`module_attrs`."""
    modules = dict(model.named_modules())
    for name, values in attrs.items():
        m = modules.get(name)
        if m is None:
            raise IvitError(f"checkpoint names module {name!r} that this model does not have")
        for k, v in values.items():
            setattr(m, k, int(v))
