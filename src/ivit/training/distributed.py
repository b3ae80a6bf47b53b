"""Multi-process training through ``torchrun``: process group setup, rank queries, reductions.

``torchrun --nproc_per_node N [--nnodes M ...] $(which ivit) qat ...`` starts N processes per node with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` in the environment; :func:`init_distributed`
reads them and joins the group (``nccl`` on CUDA, ``gloo`` on CPU).  Without those variables (a plain
``ivit qat ...``) everything here degrades to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import IvitError

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "is_distributed", "rank", "world_size",
           "all_reduce_sum", "all_gather_objects", "broadcast_buffers", "barrier", "resolve_device"]


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``, and whether we created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when a GPU is available, else ``cpu``; ``"cuda"`` without one
    is an ``IvitError``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise IvitError("--device cuda requested but no CUDA GPU is available")
        return torch.device("cuda", local_rank if device == "cuda" else torch.device(device).index or 0)
    if device != "cpu":
        raise IvitError(f"unknown device {device!r} (choose auto, cpu or cuda)")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (idempotent); pick this rank's device."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if ws <= 1:
        return DistInfo(device=dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev,
                    owns_group=owns)


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum a few numbers over ranks (float64)."""
    if not is_distributed():
        return list(values)
    if device is None:  # NCCL reduces CUDA tensors only
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON-able or tensors), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (observer ranges, ...) to every rank."""
    if not is_distributed():
        return
    for buf in model.buffers():
        t: Tensor = buf
        if t.dtype == torch.bool:  # not every backend reduces/broadcasts bool
            tmp = t.to(torch.uint8)
            dist.broadcast(tmp, 0)
            t.copy_(tmp.bool())
        else:
            dist.broadcast(t, 0)
