"""Fuzzing the loader: a few hundred seeded mutations of real ViT and Swin programs.

Every mutant (attributes, constant shapes, values and dtypes, node order and inputs, op names,
outputs, metadata; checksum kept valid) ends in a one-line refusal or in a run where the cpu and compiled
backends equal the reference; never another exception, a crash, a hang, or memory growth beyond the bound
(``MEM_MB`` of address space on top of start-up, enforced with ``RLIMIT_AS`` in the subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ivit
from conftest import make_qmodel

MUTATIONS = 400
MEM_MB = 1536


@pytest.mark.parametrize("seed", [0, 1])
def test_mutated_programs_are_refused_or_run_exactly(tmp_path: Path, seed: int) -> None:
    paths = []
    for name, kw in (("vit_test", {"depth": 1}), ("swin_test", {"depths": (2, 1), "num_heads": (2, 2)})):
        p = tmp_path / f"{name}.ivit"
        ivit.freeze(make_qmodel(name, **kw)).save(p)
        paths.append(str(p))
    work = tmp_path / "mutants"
    work.mkdir()
    harness = Path(__file__).with_name("fuzz_harness.py")
    env = {**os.environ, "IVIT_CACHE": str(tmp_path / "cache")}  # compiled mutants stay out of the user's cache
    res = subprocess.run([sys.executable, str(harness), ",".join(paths), str(MUTATIONS // 2), str(seed),
                          str(MEM_MB), str(work)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"harness crashed (rc {res.returncode}): {res.stderr[-2000:]}"
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("FUZZ "))
    out = json.loads(line[5:])
    assert not out["failures"], "\n".join(out["failures"][:20])
    c = out["counts"]
    assert c["refused"] + c["ran"] == MUTATIONS // 2
    assert c["refused"] > MUTATIONS // 4  # most mutations break something; they are caught statically
    assert c["ran"] > 0  # and some harmless ones (e.g. a value still in range) run bit-exactly
