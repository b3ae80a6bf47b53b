"""Training checkpoints: atomic safetensors + JSON files with a SHA-256, exact resume (in process and after
kill -9), one clear error line for a checkpoint of another model or config, and every kind of damaged or
tampered checkpoint refused in one line, fast, before anything is applied."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import ivit
from ivit import data
from ivit.errors import IvitError
from ivit.training.checkpoint import (
    Checkpoint,
    load_checkpoint,
    pack_optimizer,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_optimizer,
)
from ivit.training.trainer import CHECKPOINT_NAME, FloatWrapper, TrainConfig, Trainer


def test_save_load_roundtrip_is_atomic_and_pickle_free(tmp_path: Path) -> None:
    t = {"a": torch.arange(6, dtype=torch.int16).view(2, 3), "b": torch.tensor(True), "c": torch.randn(4)}
    shared = torch.zeros(3)
    t["d"], t["e"] = shared, shared  # tensors sharing memory are stored as copies
    p = save_checkpoint(tmp_path / "ck.safetensors", t, {"epoch": 3, "nested": {"x": [1, 2]}})
    assert [f.name for f in tmp_path.iterdir()] == ["ck.safetensors"]  # no temporary file left
    assert p.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle
    ck = load_checkpoint(p)
    assert ck.meta == {"epoch": 3, "nested": {"x": [1, 2]}} == read_meta(p)
    assert all(torch.equal(ck.tensors[k], t[k]) for k in t)
    save_checkpoint(p, {"a": torch.ones(1)}, {"epoch": 4})  # replaces the old file
    assert read_meta(p) == {"epoch": 4}


def test_unreadable_files_give_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(IvitError, match="not an ivit training checkpoint") as e:
        load_checkpoint(junk)
    assert "\n" not in str(e.value)
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    with pytest.raises(IvitError, match="no ivit-train-checkpoint header"):
        load_checkpoint(other)
    with pytest.raises(IvitError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    old = tmp_path / "v1.safetensors"  # ivit 0.1 wrote format 1, without a checksum
    save_file({"w": torch.ones(2)}, str(old), metadata={"format": "ivit-train-checkpoint", "format_version": "1",
                                                         "meta": "{}"})
    with pytest.raises(IvitError, match="unsupported checkpoint version '1'"):
        load_checkpoint(old)
    with pytest.raises(IvitError, match="NaN or infinite"):
        save_checkpoint(tmp_path / "nan.safetensors", {}, {"loss": float("nan")})


def test_optimizer_state_roundtrip_continues_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.1)

    def step(o: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        loss = (params[0].sum(1) + params[1]).pow(2).sum()
        o.zero_grad()
        loss.backward()
        o.step()

    for _ in range(3):
        step(opt, [w, b])
    tensors, info = pack_optimizer(opt)
    assert {"0/exp_avg", "0/exp_avg_sq", "0/step", "1/exp_avg"} <= set(tensors)
    ck = load_checkpoint(save_checkpoint(tmp_path / "opt.safetensors", tensors, {"optimizer": info}))
    tensors, info = ck.tensors, ck.meta["optimizer"]
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt2 = torch.optim.AdamW([{"params": [w2]}, {"params": [b2]}], lr=0.5)
    unpack_optimizer(opt2, tensors, info)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["weight_decay"] == 0.1
    step(opt, [w, b])
    step(opt2, [w2, b2])
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_rng_states_roundtrip() -> None:
    tensors, info = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(tensors, info)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def _qat_trainer(out: Path, lr: float = 1e-3, name: str = "vit_test", epochs: int = 2, n: int = 320) -> Trainer:
    torch.manual_seed(0)
    q = ivit.quantize(ivit.create_model(name))
    img = q.img_size[0]
    train_ds = data.digits("train", img)
    ivit.calibrate(q, [train_ds.images[:32]])
    train_ds.transform = data.train_augment(img, flip=False)  # random augmentation: RNG state matters
    torch.manual_seed(1)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=32, seed=0)
    return Trainer(q, Subset(train_ds, range(n)), cfg, eval_ds=Subset(data.digits("test", img), range(64)),
                   out_dir=out, save_every=4, identity={"model": name, "arch": q.meta}, progress=False)


class _Crash(Exception):
    pass


def test_resume_after_crash_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = _qat_trainer(tmp_path / "a")
    hist_a = straight.fit()

    crashing = _qat_trainer(tmp_path / "b")

    def crash(t: Trainer) -> None:
        if t.step == 14:  # epoch 2, step 4 of 10; last checkpoint at step 12
            raise _Crash

    crashing.on_step = crash
    with pytest.raises(_Crash):
        crashing.fit()
    meta = read_meta(tmp_path / "b" / CHECKPOINT_NAME)
    assert (meta["epoch"], meta["step"], meta["step_in_epoch"]) == (1, 12, 2)
    resumed = _qat_trainer(tmp_path / "b")
    hist_b = resumed.fit(resume=tmp_path / "b" / CHECKPOINT_NAME)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # parameters, observers: bit-identical
    assert [r["loss"] for r in hist_a] == [r["loss"] for r in hist_b]
    assert [r["int_top1"] for r in hist_a] == [r["int_top1"] for r in hist_b]
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # resuming a finished run is a no-op
    done = _qat_trainer(tmp_path / "b")
    assert done.fit(resume=tmp_path / "b" / CHECKPOINT_NAME) == hist_b


def test_checkpoint_of_another_model_or_config_is_one_line(tmp_path: Path) -> None:
    _qat_trainer(tmp_path, epochs=1, n=64).fit()
    ck = tmp_path / CHECKPOINT_NAME
    with pytest.raises(IvitError, match="different run: model is vit_test there but vit_digits here") as e:
        _qat_trainer(tmp_path, name="vit_digits", epochs=1).fit(resume=ck)
    assert "\n" not in str(e.value)
    with pytest.raises(IvitError, match="lr=0.001 but this run has lr=0.01"):
        _qat_trainer(tmp_path, lr=1e-2, epochs=1).fit(resume=ck)
    torch.manual_seed(0)
    fl = Trainer(FloatWrapper(ivit.create_model("vit_test")), data.digits("train", 32), TrainConfig(batch_size=32),
                 identity={"model": "vit_test"}, progress=False)
    with pytest.raises(IvitError, match="different run: kind is qat there but float here"):
        fl.load(ck)


# ---------------------------------------------------------------------------------------------
# damaged and tampered checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real QAT checkpoint of vit_test (one epoch of 2 steps)."""
    out = tmp_path_factory.mktemp("ck")
    _qat_trainer(out, epochs=1, n=64).fit()
    return out / CHECKPOINT_NAME


def _header(raw: bytes) -> tuple[int, dict]:
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n])


def _rewrite(src: Path, dst: Path, edit: Callable[[dict, dict], None]) -> Path:
    """A copy of ``src`` whose tensors/metadata were edited by ``edit`` and saved with a valid checksum: what
    someone who recomputes the SHA-256 can write."""
    ck = load_checkpoint(src)
    tensors, meta = dict(ck.tensors), copy.deepcopy(ck.meta)
    edit(tensors, meta)
    return save_checkpoint(dst, tensors, meta)


def _refused(path: Path, match: str) -> None:
    """Resuming from ``path`` fails with one line matching ``match``, fast, and leaves the trainer untouched."""
    t = _qat_trainer(path.parent, epochs=1, n=64)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t0 = time.perf_counter()
    with pytest.raises(IvitError, match=match) as e:
        t.load(path)
    assert time.perf_counter() - t0 < 5.0
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and t.epoch == 0 and t.step == 0


def test_flipped_weight_byte_is_refused(saved: Path, tmp_path: Path) -> None:
    raw = bytearray(saved.read_bytes())
    n, header = _header(bytes(raw))
    start, end = header["model/head.weight"]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x01
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    _refused(bad, "checksum mismatch")


def test_tensor_declared_i32_instead_of_f32_is_refused(saved: Path, tmp_path: Path) -> None:
    raw = saved.read_bytes()
    n, header = _header(raw)
    assert header["model/head.weight"]["dtype"] == "F32"
    text = raw[8:8 + n].decode()
    entry = json.dumps(header["model/head.weight"], separators=(",", ":"))
    assert entry in text  # same length: only the dtype's letters change
    tampered = text.replace(entry, entry.replace('"F32"', '"I32"'))
    bad = tmp_path / "i32.safetensors"
    bad.write_bytes(raw[:8] + tampered.encode() + raw[8 + n:])
    _refused(bad, "checksum mismatch")
    # the same with a recomputed checksum: refused by the dtype check against the model
    resealed = _rewrite(saved, tmp_path / "i32b.safetensors",
                        lambda t, m: t.update({"model/head.weight": t["model/head.weight"].view(torch.int32)}))
    _refused(resealed, r"model/head.weight is torch.int32 \[10, 32\], expected torch.float32 \[10, 32\]")


@pytest.mark.parametrize("case,edit,match", [
    ("garbage rng", lambda t, m: t.update({"rng/0/torch": torch.randint(0, 256, t["rng/0/torch"].shape,
                                                                          dtype=torch.uint8)}),
     "random state of rank 0 is not a valid generator state"),
    ("short rng", lambda t, m: t.update({"rng/0/numpy": t["rng/0/numpy"][:10]}), r"rng/0/numpy is torch.int64 \[10\]"),
    ("numpy keys", lambda t, m: t.update({"rng/0/numpy": t["rng/0/numpy"] - 2**40}), "not a valid generator state"),
    ("string history", lambda t, m: m.update(history="not a list"), "history must be a JSON list"),
    ("history values", lambda t, m: m.update(history=[{"epoch": 1, "loss": [1, 2]}]), "history record 0"),
    ("nan weights", lambda t, m: t["model/head.weight"].fill_(float("nan")), "model/head.weight has non-finite"),
    ("nan optimizer", lambda t, m: t[next(k for k in t if k.endswith("exp_avg"))].fill_(float("inf")),
     "non-finite"),
    ("huge n_max", lambda t, m: m["attrs"].update({next(iter(m["attrs"])): {"n_max": 10**6}}),
     r"n_max must be an integer in \[8, 30\], got 1000000"),
    ("unknown module", lambda t, m: m["attrs"].update({"blocks.99.attn": {"n_max": 12}}), "not a ShiftExp module"),
    ("negative epoch", lambda t, m: m.update(epoch=-1), r"epoch must be an integer in \[0, "),
    ("step out of order", lambda t, m: m.update(step=m["step"] + 1), "is not epoch"),
    ("world size", lambda t, m: m.update(world_size=10**9), "world_size must be an integer"),
    ("bool as int", lambda t, m: m.update(step_in_epoch=True), "step_in_epoch must be an integer"),
    ("missing tensor", lambda t, m: t.pop("model/head.bias"), "1 missing"),
    ("shape", lambda t, m: t.update({"model/head.bias": torch.zeros(11)}), r"model/head.bias is torch.float32 \[11\]"),
    ("optimizer group", lambda t, m: m["optimizer"]["param_groups"][0].update(lr="fast"), "lr is not a finite"),
    ("foreign tensor", lambda t, m: t.update({"extra/x": torch.zeros(1)}), "unexpected tensor extra/x"),
])
def test_tampered_checkpoint_is_refused(saved: Path, tmp_path: Path, case: str,
                                        edit: Callable[[dict, dict], None], match: str) -> None:
    _refused(_rewrite(saved, tmp_path / "t.safetensors", edit), match)


def test_cli_resume_of_a_tampered_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ivit.cli import main

    out = tmp_path / "run"
    args = ["qat", "vit_test", "--data", "digits", "--epochs", "1", "--limit-train", "64", "--limit-eval", "32",
            "--batch", "32", "--calib-images", "32", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    ck = out / CHECKPOINT_NAME
    _rewrite(ck, ck, lambda t, m: m["attrs"].update({next(iter(m["attrs"])): {"n_max": 10**6}}))
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main([*args, "--resume"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("ivit: error: invalid checkpoint") and "n_max" in lines[0], lines
    assert time.perf_counter() - t0 < 60  # no hang (the old code ran the model with n_max = 10**6)


def test_checkpoint_class_groups(saved: Path) -> None:
    ck = load_checkpoint(saved)
    assert isinstance(ck, Checkpoint)
    assert set(ck.group("model")) == set(_qat_trainer(saved.parent, epochs=1, n=64).model.state_dict())
    assert {k.split("/")[0] for k in ck.group("rng/0")} == {"torch", "numpy", "python"}


# ---------------------------------------------------------------------------------------------
# kill -9 of the real command


def _wait_for_checkpoint(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before it could be killed: {proc.stderr.read()[-2000:]}")
        if path.exists():
            try:
                meta = read_meta(path)
            except IvitError:  # caught between the rename and the header write of another file
                continue
            if meta["step"] >= 3:
                return meta
        time.sleep(0.01)
    raise AssertionError("no step checkpoint appeared")


def test_kill9_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ivit qat`` killed with SIGKILL mid-epoch, then ``--resume``: the final program is identical to an
    uninterrupted run's (the killed run is the real executable; the rest runs in process, on one thread too)."""
    from ivit.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["qat", "vit_test", "--data", "digits", "--epochs", "2", "--limit-train", "480", "--limit-eval", "64",
            "--batch", "16", "--lr", "1e-4", "--calib-images", "32", "--save-every", "3", "--no-progress",
            "--device", "cpu"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ivit.cli", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(killed / CHECKPOINT_NAME, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    meta = read_meta(killed / CHECKPOINT_NAME)  # the last save before the kill: intact, mid-epoch
    assert meta["epoch"] == 0 and 0 < meta["step_in_epoch"] < meta["steps_per_epoch"]
    assert not (killed / "model.ivit").exists()

    # without --resume the folder is protected; with it the run continues
    capsys.readouterr()
    assert main([*args, "--out", str(killed)]) == 2
    err = capsys.readouterr().err
    assert "pass --resume" in err and err.count("\n") == 1
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main([*args, "--out", str(straight)]) == 0

    pa, pb = ivit.load_program(killed / "model.ivit"), ivit.load_program(straight / "model.ivit")
    assert pa.graph_json() == pb.graph_json()
    assert pa.consts.keys() == pb.consts.keys() and all(torch.equal(pa.consts[k], pb.consts[k]) for k in pa.consts)
    ca, cb = load_checkpoint(killed / CHECKPOINT_NAME), load_checkpoint(straight / CHECKPOINT_NAME)
    assert all(torch.equal(ca.tensors[k], cb.tensors[k]) for k in ca.tensors if k.startswith(("model/", "optim/")))
    la = [r["loss"] for r in ca.meta["history"] if "loss" in r]
    assert la == [r["loss"] for r in cb.meta["history"] if "loss" in r] and len(la) == 2
    assert len((killed / "log.jsonl").read_text().splitlines()) == 3  # epoch 0 (PTQ) + 2 epochs, no duplicates
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]  # a torn temporary file is cleaned up
