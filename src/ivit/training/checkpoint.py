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

Checked like ``.ivit`` files: the header holds a SHA-256 over the metadata JSON and every tensor's name,
dtype, shape and bytes (``load_checkpoint`` refuses a mismatch), and ``check_training_state`` checks the
whole content against the model and optimizer before anything is applied: tensor names, dtypes and shapes,
finite floats, the ranges of epoch/step/steps_per_epoch/world_size, the structure and sizes of the random
states, the types of the history and the range of every ``n_max``.  Each defect is one ``IvitError`` line.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_path, sha256_tensors
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
    "check_training_state",
    "N_MAX_RANGE",
]

FORMAT = "ivit-train-checkpoint"
#: 2 adds the SHA-256 (format 1, ivit 0.1, had none and is not read).
FORMAT_VERSION = 2
#: Allowed ShiftExp ``n_max`` of a restored module (``QuantConfig``'s range).
N_MAX_RANGE = (8, 30)
_MAX_EPOCHS = 1_000_000
_MAX_STEPS = 2**40
_MAX_WORLD = 1 << 16


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
    try:
        text = json.dumps(meta, allow_nan=False)
    except ValueError:
        raise IvitError("checkpoint metadata holds a NaN or infinite number (did training diverge?)") from None
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": text,
                "checksum": _checksum(text, flat)}
    with atomic_path(path) as tmp:
        save_file(flat, tmp, metadata=metadata)
    _fsync_dir(path.parent)
    return path


def _checksum(meta_json: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the metadata JSON and every tensor's name, dtype, shape and bytes (in name order)."""
    return sha256_tensors(tensors, meta_json)


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
        raise IvitError(f"unsupported checkpoint version {str(metadata.get('format_version'))[:20]!r} "
                        f"(this ivit reads {FORMAT_VERSION}; start a new run): {path}")
    return metadata


def _bad_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _parse_meta(metadata: dict[str, str], p: Path) -> dict[str, Any]:
    try:
        meta = json.loads(metadata["meta"], parse_constant=_bad_constant)
    except (KeyError, TypeError, ValueError, RecursionError):
        raise IvitError(f"corrupt checkpoint metadata: {p}") from None
    if not isinstance(meta, dict):
        raise IvitError(f"corrupt checkpoint metadata: {p}")
    return meta


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint (cheap: the tensors are not read, nor checksummed)."""
    p = Path(path)
    return _parse_meta(_header(p), p)


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` and verify its SHA-256; any defect is one
    ``IvitError`` line.  (What the content means is checked by :func:`check_training_state`.)"""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    metadata = _header(p)
    meta = _parse_meta(metadata, p)
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IvitError(f"cannot read checkpoint {p}: {msg}") from None
    if _checksum(metadata["meta"], tensors) != metadata.get("checksum"):
        raise IvitError(f"corrupt checkpoint (checksum mismatch: modified or damaged): {p}")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
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


# ---------------------------------------------------------------------------------------------
# complete checks of a checkpoint's content, before anything is applied


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finite(t: Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


class _Checker:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path

    def fail(self, what: str) -> NoReturn:
        raise IvitError(f"invalid checkpoint {self.path}: {what}")

    def int_in(self, meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
        v = meta.get(key)
        if not _is_int(v) or not lo <= v <= hi:
            self.fail(f"{key} must be an integer in [{lo}, {hi}], got {str(v)[:40]}")
        return v

    def tensor(self, name: str, t: Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None) -> None:
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
            want = f"{dtype} {list(shape)}" if shape is not None else str(dtype)
            self.fail(f"tensor {name} is {t.dtype} {list(t.shape)}, expected {want}")
        if not _finite(t):
            self.fail(f"tensor {name} has non-finite values (NaN or inf)")


def _check_history(c: _Checker, history: Any) -> None:
    if not isinstance(history, list) or len(history) > _MAX_EPOCHS + 1:
        c.fail("history must be a list of per-epoch records")
    for i, rec in enumerate(history):
        if not isinstance(rec, dict):
            c.fail(f"history record {i} is not an object")
        for k, v in rec.items():
            ok = v is None or isinstance(v, bool) or _is_num(v) or (isinstance(v, str) and len(v) <= 1000)
            if not isinstance(k, str) or not ok:
                c.fail(f"history record {i}: {str(k)[:40]} is not a number, string or boolean")
        if not _is_int(rec.get("epoch", 0)):
            c.fail(f"history record {i}: epoch must be an integer")


def _check_rng(c: _Checker, ck: Checkpoint, rank: int, info: Any) -> None:
    t = ck.group(f"rng/{rank}")
    known = {"torch", "numpy", "python"}
    extra = [k for k in t if k not in known and not (k.startswith("cuda") and k[4:].isdigit())]
    if extra or not known <= set(t):
        c.fail(f"random state of rank {rank} must hold torch, numpy and python states")
    c.tensor(f"rng/{rank}/torch", t["torch"], torch.uint8, tuple(torch.get_rng_state().shape))
    c.tensor(f"rng/{rank}/numpy", t["numpy"], torch.int64, (624,))
    c.tensor(f"rng/{rank}/python", t["python"], torch.int64, (625,))
    for k in t:
        if k.startswith("cuda"):
            c.tensor(f"rng/{rank}/{k}", t[k], torch.uint8, None)
            if t[k].dim() != 1 or t[k].numel() > 1 << 16:
                c.fail(f"tensor rng/{rank}/{k} is not a CUDA generator state")
    if (not isinstance(info, dict) or not isinstance(info.get("numpy"), list) or len(info["numpy"]) != 4
            or not isinstance(info.get("python"), list) or len(info["python"]) != 2):
        c.fail(f"random state of rank {rank} is malformed")
    name, pos, has_gauss, cached = info["numpy"]
    version, gauss_next = info["python"]
    try:  # each state into a scratch generator: nothing global is touched
        torch.Generator().set_state(t["torch"].contiguous())
        keys = t["numpy"].numpy()
        if int(keys.min()) < 0 or int(keys.max()) >= 2**32 or name != "MT19937" or not _is_int(pos) \
                or not _is_int(has_gauss) or not _is_num(cached):
            raise ValueError("numpy")
        np.random.RandomState().set_state((name, keys.astype(np.uint32), pos, has_gauss, float(cached)))
        words = t["python"].tolist()
        if min(words) < 0 or max(words) >= 2**32 or not _is_int(version) or not (gauss_next is None
                                                                                  or _is_num(gauss_next)):
            raise ValueError("python")
        random.Random().setstate((version, tuple(words), gauss_next))
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        c.fail(f"random state of rank {rank} is not a valid generator state ({str(e).splitlines()[0][:60]})")


def _check_optimizer(c: _Checker, ck: Checkpoint, info: Any, opt: torch.optim.Optimizer) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    current = opt.state_dict()["param_groups"]
    if not isinstance(info, dict) or not isinstance(info.get("param_groups"), list) \
            or not isinstance(info.get("scalars", {}), dict):
        c.fail("optimizer state is malformed")
    groups = info["param_groups"]
    if len(groups) != len(current):
        c.fail(f"optimizer has {len(groups)} parameter groups, this model's has {len(current)}")
    for i, (g, cur) in enumerate(zip(groups, current, strict=True)):
        if not isinstance(g, dict) or set(g) != set(cur) or g.get("params") != cur["params"]:
            c.fail(f"optimizer parameter group {i} does not fit this model")
        for k, v in g.items():
            if k == "params":
                continue
            vals = v if isinstance(v, list) else [v]
            if isinstance(cur[k], (int, float)) and not isinstance(cur[k], bool) and not all(map(_is_num, vals)):
                c.fail(f"optimizer parameter group {i}: {k} is not a finite number")
            if isinstance(cur[k], tuple) and (len(vals) != len(cur[k]) or not all(map(_is_num, vals))):
                c.fail(f"optimizer parameter group {i}: {k} must be {len(cur[k])} finite numbers")
        if "betas" in g and not all(0 <= b < 1 for b in g["betas"]):
            c.fail(f"optimizer parameter group {i}: betas must be in [0, 1)")
        if "lr" in g and g["lr"] < 0:
            c.fail(f"optimizer parameter group {i}: negative learning rate")
    for idx, d in info.get("scalars", {}).items():
        if not str(idx).isdigit() or int(idx) >= len(params) or not isinstance(d, dict) or not all(
                isinstance(v, (bool, int, float)) and (isinstance(v, bool) or _is_num(v)) for v in d.values()):
            c.fail(f"optimizer scalars of parameter {str(idx)[:20]} are malformed")
    seen: dict[int, set[str]] = {}
    for name, t in ck.group("optim").items():
        idx_s, _, key = name.partition("/")
        if not idx_s.isdigit() or int(idx_s) >= len(params) or key not in ("exp_avg", "exp_avg_sq", "step",
                                                                             "max_exp_avg_sq"):
            c.fail(f"optimizer tensor {name[:60]} does not belong to this model's parameters")
        p = params[int(idx_s)]
        if key == "step":
            c.tensor(f"optim/{name}", t, torch.float32, ())
            if not 0 <= float(t) <= _MAX_STEPS:
                c.fail(f"optimizer step of parameter {idx_s} out of range")
        else:
            c.tensor(f"optim/{name}", t, p.dtype, tuple(p.shape))
            if key.endswith("_sq") and bool((t < 0).any()):
                c.fail(f"optimizer tensor optim/{name} has negative second moments")
        seen.setdefault(int(idx_s), set()).add(key)
    for idx, keys in seen.items():
        if not {"exp_avg", "exp_avg_sq", "step"} <= keys:
            c.fail(f"optimizer state of parameter {idx} is incomplete")


def check_training_state(ck: Checkpoint, path: str | os.PathLike[str], model: nn.Module,
                         opt: torch.optim.Optimizer) -> None:
    """Check everything a checkpoint would restore into ``model`` and ``opt``; raise one ``IvitError`` line
    naming the first defect.  Nothing is modified."""
    c = _Checker(path)
    meta = ck.meta
    for key, kind in (("identity", dict), ("train_config", dict), ("optimizer", dict), ("rng", list),
                      ("loss", list), ("attrs", dict), ("history", list)):
        if not isinstance(meta.get(key), kind):
            c.fail(f"{key} must be a JSON {'object' if kind is dict else 'list'}")
    epoch = c.int_in(meta, "epoch", 0, _MAX_EPOCHS)
    spe = c.int_in(meta, "steps_per_epoch", 1, 2**31)
    sie = c.int_in(meta, "step_in_epoch", 0, spe - 1)
    step = c.int_in(meta, "step", 0, _MAX_STEPS)
    world = c.int_in(meta, "world_size", 1, _MAX_WORLD)
    if step != epoch * spe + sie:
        c.fail(f"step {step} is not epoch {epoch} x {spe} steps + {sie}")
    if not _is_num(meta.get("epoch_time", 0.0)) or not 0 <= meta.get("epoch_time", 0.0) < 1e9:
        c.fail("epoch_time must be a finite number of seconds")
    _check_history(c, meta["history"])
    if len(meta["loss"]) != world or not all(isinstance(x, list) and len(x) == 2 and _is_num(x[0]) and _is_int(x[1])
                                             and x[1] >= 0 for x in meta["loss"]):
        c.fail(f"loss must hold [sum, count] for each of the {world} processes")
    if len(meta["rng"]) != world:
        c.fail(f"rng must hold the random states of the {world} processes")
    shift = set(module_attrs(model))
    lo, hi = N_MAX_RANGE
    for name, values in meta["attrs"].items():
        if name not in shift or not isinstance(values, dict) or set(values) != {"n_max"}:
            c.fail(f"attrs name {str(name)[:60]!r}, which is not a ShiftExp module of this model")
        if not _is_int(values["n_max"]) or not lo <= values["n_max"] <= hi:
            c.fail(f"{name}.n_max must be an integer in [{lo}, {hi}], got {str(values['n_max'])[:20]}")
    prefixes = {"model", "optim", "rng"}
    odd = [k for k in ck.tensors if k.split("/", 1)[0] not in prefixes]
    if odd:
        c.fail(f"unexpected tensor {odd[0][:60]}")
    sd = ck.group("model")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        first = (missing or extra)[0]
        c.fail(f"does not match this model ({len(missing)} missing, {len(extra)} unexpected tensors, first: {first})")
    for k, v in own.items():
        c.tensor(f"model/{k}", sd[k], v.dtype, tuple(v.shape))
    _check_optimizer(c, ck, meta["optimizer"], opt)
    rng_ranks = {k.split("/")[1] for k in ck.tensors if k.startswith("rng/")}
    if rng_ranks != {str(r) for r in range(world)}:
        c.fail(f"random states must be stored for ranks 0..{world - 1}")
    for r in range(world):
        _check_rng(c, ck, r, meta["rng"][r])
