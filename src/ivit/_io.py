"""Atomic file output: every file ivit writes goes through a temporary name and a rename.

A crash or a kill never leaves a half-written file under the user's name; a temporary file left by
a kill (``.NAME.XXXX.tmp`` next to the target) is removed by the next write to the same target.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import IvitError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["atomic_path", "publish", "write_text_atomic", "write_bytes_atomic", "check_output_path",
           "check_output_folder", "sha256_tensors"]

#: Temporary files older than this (seconds) next to a target are leftovers of a killed writer.
STALE_SECONDS = 600.0


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Give a finished temporary file the usual permissions (``0o666`` minus the umask; ``mkstemp``
    makes ``0o600``), fsync it and rename it over ``path``."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_stale(path: Path, suffix: str) -> None:
    """Remove temporary files of earlier, killed writes to ``path`` (same prefix, older than a while)."""
    now = time.time()
    try:
        for p in path.parent.glob(f".{path.name}.*{suffix}"):
            try:
                if now - p.stat().st_mtime > STALE_SECONDS:
                    p.unlink()
            except OSError:
                pass
    except OSError:
        pass


def check_output_path(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Fail early (before any work) when ``path`` cannot be written as a file: missing folder, or a folder
    in its place.  Returns ``path`` as a ``Path``."""
    p = Path(path)
    if p.is_dir():
        raise IvitError(f"{what} {p} is a directory")
    check_output_folder(p)
    return p


def check_output_folder(path: str | os.PathLike[str]) -> None:
    """Fail early when the folder that is to hold ``path`` (a file or a directory) is missing or not writable."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise IvitError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise IvitError(f"output folder is not writable: {parent}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file name next to ``path`` to write to; published over ``path`` (``publish``) when the
    block succeeds, removed when it fails, so ``path`` is never half-written.  Temporary files of earlier
    writers killed mid-write (older than ``STALE_SECONDS``) are removed first.  A failure to create, write or
    publish the temporary file is an ``IvitError`` naming ``path`` (not the temporary name)."""
    path = Path(path)
    _remove_stale(path, suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise IvitError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if tmp in (e.filename, e.filename2) or str(path) in (e.filename, e.filename2):
            raise IvitError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` through a temporary file in the same folder, fsync and rename."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` through a temporary file in the same folder, fsync and rename."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def sha256_tensors(tensors: Mapping[str, Tensor], text: str = "", sort: bool = True) -> str:
    """SHA-256 over ``text`` and every tensor's name, dtype, shape and bytes (in name order with ``sort``):
    the integrity check of checkpoints, and the identity of a set of weights."""
    import torch

    h = hashlib.sha256(text.encode())
    for name in sorted(tensors) if sort else tensors:
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
