"""``torchrun --nproc_per_node 2``: QAT under DistributedDataParallel over gloo on CPU, through the CLI's
parsing and the QAT workflow; both ranks end identical and rank 0 writes a bit-exact ``.ivit``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ivit
from ivit import data

HERE = Path(__file__).resolve().parent


def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    dump = tmp_path / "dump"
    dump.mkdir()
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(HERE / "_ddp_worker.py"),
           str(dump), "qat", "vit_test", "--data", "digits", "--epochs", "2", "--limit-train", "256",
           "--limit-eval", "64", "--batch", "16", "--lr", "1e-4", "--calib-images", "32", "--save-every", "3",
           "--out", str(out), "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    r0, r1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # weights and observer buffers
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert recs[-1]["world_size"] == 2 and recs[-1]["ranks_in_sync"] is True
    assert recs[-1]["step"] == 2 * (256 // 2 // 16)  # the data is sharded: 8 steps per epoch and rank
    prog = ivit.load_program(out / "model.ivit")
    assert prog.meta["model_args"] == {"num_classes": 10} and prog.meta["float_params"] > 0
    q = ivit.quantize(ivit.create_model("vit_test"))
    q.load_state_dict(r0)
    q.eval()
    x = data.digits("test", 32).images[:8]
    assert torch.equal(ivit.Engine(prog)(x), q.logits(x))
