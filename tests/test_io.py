"""``ivit._io``: atomic writes, stale temporary files of killed writers, and output paths checked early."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ivit._io import STALE_SECONDS, atomic_path, check_output_path, write_text_atomic
from ivit.errors import IvitError


def test_a_stale_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "model.ivit"
    stale = tmp_path / ".model.ivit.abc123.tmp"  # what a kill during the write window leaves
    stale.write_bytes(b"half a file")
    old = time.time() - STALE_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = tmp_path / ".model.ivit.def456.tmp"  # another writer, still writing: left alone
    fresh.write_bytes(b"being written")
    other = tmp_path / ".other.ivit.abc123.tmp"  # a temporary file of another target: left alone
    other.write_bytes(b"x")
    os.utime(other, (old, old))
    write_text_atomic(target, "done")
    assert target.read_text() == "done"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.ivit.def456.tmp", ".other.ivit.abc123.tmp",
                                                          "model.ivit"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        Path(tmp).write_text("new, half")
        raise ZeroDivisionError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_errors_name_the_users_path_not_the_temporary_one(tmp_path: Path) -> None:
    with pytest.raises(IvitError, match=f"cannot write {tmp_path}/missing/r.json") as e:
        write_text_atomic(tmp_path / "missing" / "r.json", "x")
    assert ".tmp" not in str(e.value)


def test_check_output_path(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "m.ivit") == tmp_path / "m.ivit"
    with pytest.raises(IvitError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(IvitError, match="output folder does not exist"):
        check_output_path(tmp_path / "no" / "m.ivit")
