"""``ivit train`` / ``ivit qat`` / ``ivit ptq`` end to end on digits, local timm checkpoints, and the
one-line errors (mismatched checkpoint, offline ``--pretrained``, protected output folders)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ivit
from ivit import data
from ivit.api import create_model
from ivit.cli import main
from ivit.errors import IvitError


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ivit train`` of vit_test on digits (shared by the tests below)."""
    out = tmp_path_factory.mktemp("float")
    rc = main(["train", "vit_test", "--data", "digits", "--epochs", "4", "--lr", "2e-3", "--batch", "32",
               "--limit-train", "1024", "--limit-eval", "120", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    return out


def test_train_writes_weights_logs_and_plot(float_run: Path) -> None:
    recs = [json.loads(x) for x in (float_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4] and recs[-1]["float_top1"] > 0.2
    assert (float_run / "accuracy.png").stat().st_size > 1000
    # model.safetensors is a plain timm state dict: --checkpoint loads it
    m = create_model("vit_test", checkpoint=str(float_run / "model.safetensors"))
    sd = load_file(float_run / "model.safetensors")
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_local_checkpoint_safetensors_and_pth(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = create_model("vit_test")
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd}, tmp_path / "w.pth")  # the usual timm/DeiT layout, read with weights_only=True
    for f in ("w.safetensors", "w.pth"):
        m = create_model("vit_test", checkpoint=str(tmp_path / f))
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    with pytest.raises(IvitError, match="does not match the model") as e:
        create_model("vit_digits", checkpoint=str(tmp_path / "w.safetensors"))
    assert "\n" not in str(e.value)


def test_qat_cli_end_to_end(float_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "qat"
    args = ["qat", "vit_test", "--data", "digits", "--checkpoint", str(float_run / "model.safetensors"),
            "--epochs", "1", "--lr", "5e-5", "--batch", "32", "--limit-train", "256", "--limit-eval", "120",
            "--calib-batches", "2", "--distill", "--save-every", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "engine bit-exact" in text and "yes" in text
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    base = json.loads((float_run / "log.jsonl").read_text().splitlines()[-1])
    assert recs[0]["float_top1"] == pytest.approx(base["float_top1"])  # the same float model, same eval set
    assert abs(recs[0]["int_top1"] - recs[0]["float_top1"]) < 0.1  # PTQ starting point close to float
    assert (out / "accuracy.png").is_file() and (out / "log.csv").is_file()
    assert main(["eval", str(out / "model.ivit"), "--data", "digits", "--limit", "1"]) == 0
    # a finished run resumed is a no-op that rewrites the program; without --resume the folder is protected
    assert main([*args, "--resume"]) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --resume" in _err_line(capsys)


def test_ptq_cli_with_and_without_search(float_run: Path, tmp_path: Path) -> None:
    common = ["ptq", "vit_test", "--data", "digits", "--checkpoint", str(float_run / "model.safetensors"),
              "--calib-batches", "2", "--batch", "32", "--limit-eval", "120", "--eval", "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "s.ivit"), "--report", str(tmp_path / "s.json")]) == 0
    assert main([*common, "-o", str(tmp_path / "f.ivit"), "--no-search"]) == 0
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["summary"]["search"].startswith("PTQ search:")
    kinds = {c["kind"] for c in rep["choices"]}
    assert kinds == {"balance", "clip", "n"}
    s, f = ivit.load_program(tmp_path / "s.ivit"), ivit.load_program(tmp_path / "f.ivit")
    assert s.meta["ptq"]["search"] is True and f.meta["ptq"]["search"] is False
    changed = [c for c in rep["choices"] if c["choice"] != c["default"]]
    assert changed and any(not torch.equal(s.consts[k], f.consts[k]) for k in s.consts)


def test_mismatched_checkpoint_is_one_line(float_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ptq", "vit_digits", "--data", "digits", "--checkpoint", str(float_run / "model.safetensors"),
               "-o", str(tmp_path / "x.ivit"), "--no-progress"])
    assert rc == 2
    line = _err_line(capsys)
    assert "does not match the model" in line and "Traceback" not in line
    # a training checkpoint of vit_test resumed as vit_digits: one line, not a size-mismatch traceback
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes((float_run / "checkpoint.safetensors").read_bytes())
    rc = main(["train", "vit_digits", "--data", "digits", "--epochs", "3", "--out", str(out), "--resume",
               "--no-progress"])
    assert rc == 2
    line = _err_line(capsys)
    assert "different run" in line and "vit_test" in line and "vit_digits" in line
    assert not (tmp_path / "x.ivit").exists()


def test_bad_options_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["qat", "vit_test", "--data", "digits", "--epochs", "0", "--out", str(tmp_path / "a")],
                 ["train", "vit_test", "--data", "nowhere", "--out", str(tmp_path / "b")],
                 ["qat", "vit_test", "--data", "digits", "--out", str(tmp_path / "c"), "--resume",
                  str(tmp_path / "missing.safetensors")],
                 ["ptq", "vit_test", "--data", "digits", "-o", str(tmp_path / "no" / "x.ivit")]):
        assert main(argv) == 2
        _err_line(capsys)


def test_pretrained_offline_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    proc = subprocess.run([sys.executable, "-m", "ivit.cli", "ptq", "deit_tiny_patch16_224", "--pretrained",
                           "--data", "digits", "-o", str(tmp_path / "x.ivit"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "cannot download pretrained weights" in lines[0], proc.stderr


def test_timm_augmentation_yields_uint8() -> None:
    from ivit.train_cli import timm_train_transform

    torch.manual_seed(0)
    tf = timm_train_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), from_tensor=True)
    img = data.digits("train", 40).images[0]
    outs = [tf(img) for _ in range(4)]
    assert all(o.dtype == torch.uint8 and o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random
