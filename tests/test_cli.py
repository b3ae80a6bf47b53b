"""The ``ivit`` command line.

Success paths (demo settings aside: quantize, train, qat, ptq, eval, inspect, bench, models), a model geometry
given only on the command line from PTQ to bench, and every bad input: wrong arguments, unknown models, bad
``--model-args``, missing or unwritable paths, non-image data, damaged ``.ivit`` files, mismatched or NaN
checkpoints, offline ``--pretrained``, and unexpected failures.  Each must give exactly one line on stderr,
exit code 2, no traceback and no (partial) output file.  Most cases call ``ivit.cli.main`` in process (an
escaping exception fails the test just like a traceback would); a few run the real executable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import ivit
from ivit.cli import main
from ivit.ir.program import load_program

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GEOMETRY = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 2, "num_heads": 2, "in_chans": 3,
            "num_classes": 10}


def error_lines(err: str) -> list[str]:
    """Non-empty stderr lines, ignoring progress-bar redraws (``\\r``) that precede the final text."""
    lines = [seg.rsplit("\r", 1)[-1] for seg in err.split("\n")]
    return [ln for ln in lines if ln.strip()]


def assert_one_line_error(code: int, err: str, match: str = "") -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("ivit: error: "), lines[0]
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ivit.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no wrapping of the lines we look for
    monkeypatch.delenv("IVIT_DEBUG", raising=False)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ivit quantize vit_test --data random`` on 4 images (shared by the read-only tests)."""
    d = tmp_path_factory.mktemp("cli")
    assert main(["quantize", "vit_test", "-o", str(d / "m.ivit"), "--data", "random", "--calib-images", "4",
                 "--calib-batch", "4", "--no-progress"]) == 0
    return d / "m.ivit"


@pytest.fixture(scope="module")
def float_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ivit train`` of vit_test on digits (shared by the tests below)."""
    out = tmp_path_factory.mktemp("float")
    rc = main(["train", "vit_test", "--data", "digits", "--epochs", "4", "--lr", "2e-3", "--batch", "32",
               "--warmup-epochs", "0.5", "--limit-train", "1024", "--limit-eval", "120", "--out", str(out),
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------------------
# a geometry the project never used, given only on the command line


def test_custom_geometry_from_the_command_line_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model-args", json.dumps(GEOMETRY), "--data", "digits", "--no-progress", "--device", "cpu"]
    m = tmp_path / "m.ivit"
    assert main(["ptq", "vit_tiny_patch16_224", *args, "--calib-images", "32", "--calib-batch", "16",
                 "--search-images", "16", "-o", str(m), "--eval", "--limit-eval", "32"]) == 0
    assert "engine bit-exact" in capsys.readouterr().out
    n_timm = sum(p.numel() for p in timm.create_model("vit_tiny_patch16_224", **GEOMETRY).parameters())
    meta = load_program(m).meta
    assert meta["model_args"] == GEOMETRY and meta["float_params"] == n_timm and meta["input_shape"] == [3, 28, 28]

    assert main(["eval", str(m), "--data", "digits", "--limit-eval", "32", "--no-progress"]) == 0
    assert re.search(r"│\s+32 │", capsys.readouterr().out)

    assert main(["bench", str(m), "--batch", "1", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    # the float twin is the same network: the same parameter count as the program's source model
    assert "torch fp32" in out and "ivit int" in out
    assert ("float network: vit_tiny_patch16_224(depth=2, embed_dim=96, img_size=28, in_chans=3, num_classes=10, "
            f"num_heads=2, patch_size=7), {n_timm:,} parameters") in out

    assert main(["inspect", str(m)]) == 0
    out = capsys.readouterr().out
    assert "float network: vit_tiny_patch16_224(depth=2, embed_dim=96, img_size=28" in out
    assert f"{n_timm:,} parameters" in out and "integer-only: yes" in out and "vit_tiny_patch16_224 (vit)" not in out

    q = tmp_path / "qat"
    assert main(["qat", "vit_tiny_patch16_224", *args, "--epochs", "1", "--limit-train", "64", "--limit-eval", "32",
                 "--batch", "32", "--calib-images", "32", "--out", str(q)]) == 0
    assert re.search(r"engine bit-exact\s*│\s*yes", capsys.readouterr().out)
    assert load_program(q / "model.ivit").meta["model_args"] == GEOMETRY


def test_checkpoint_of_a_custom_geometry_says_what_was_expected(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model-args", json.dumps({**GEOMETRY, "depth": 1}), "--data", "digits", "--no-progress"]
    assert main(["train", "vit_tiny_patch16_224", *args, "--epochs", "1", "--limit-train", "64", "--limit-eval", "16",
                 "--batch", "32", "--out", str(tmp_path / "f")]) == 0
    capsys.readouterr()
    w = tmp_path / "f" / "model.safetensors"
    code = main(["ptq", "vit_tiny_patch16_224", "--checkpoint", str(w), "--data", "digits", "-o",
                 str(tmp_path / "m.ivit"), "--no-progress"])
    line = assert_one_line_error(code, capsys.readouterr().err, "does not match the model vit_tiny_patch16_224")
    assert "shape mismatches" in line and "the geometry comes from the model name and its model arguments" in line
    assert "was written for vit_tiny_patch16_224 --model-args '{\"depth\": 1, \"embed_dim\": 96" in line
    assert not (tmp_path / "m.ivit").exists()


@pytest.mark.parametrize("model_args,match", [
    ("{img_size: 28}", "--model-args is not valid JSON"),
    ("[28, 7]", "must be a JSON object"),
    ('{"img_size": {"h": 28}}', "model argument 'img_size' must be a JSON number"),
    ('{"patch_sz": 7}', "vit_tiny_patch16_224 takes no model argument 'patch_sz'"),
    ('{"embed_dim": 97}', "cannot build vit_tiny_patch16_224(embed_dim=97, num_classes=10): dim should be divisible"),
    ('{"pretrained": true}', "not allowed"),
    ("@/nonexistent/model.json", "cannot read --model-args file"),
])
def test_bad_model_args_are_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     model_args: str, match: str) -> None:
    t0 = time.perf_counter()
    code = main(["ptq", "vit_tiny_patch16_224", "--model-args", model_args, "--data", "digits", "-o",
                 str(tmp_path / "m.ivit"), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, match)
    assert time.perf_counter() - t0 < 10 and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# quantize


def test_quantize_random_writes_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.ivit"
    code = main(["quantize", "vit_test", "-o", str(out), "--data", "random", "--calib-images", "8", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"wrote {out}" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ivit"]  # no leftover temporary files
    prog = load_program(out)
    assert prog.meta["model"] == "vit_test" and prog.meta["input_shape"] == [3, 32, 32]
    assert prog.meta["ptq"] == {"calib_images": 8, "search": False}
    assert ivit.verify_integer_only(ivit.Engine(prog, backend="reference")).ok


def test_quantize_with_qat_epochs_uses_the_qat_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.ivit"
    assert main(["quantize", "vit_test", "-o", str(out), "--data", "digits", "--qat-epochs", "1", "--calib-images",
                 "32", "--batch", "64", "--no-progress", "--device", "cpu"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    meta = load_program(out).meta
    assert meta["qat"]["epochs"] == 1 and meta["qat"]["steps"] == 1437 // 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.ivit"]


def test_quantize_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["quantize", "unknown_model", "-o", str(tmp_path / "x.ivit"), "--data", "random"])
    cap = capsys.readouterr()
    assert_one_line_error(code, cap.err, "unknown model")
    assert cap.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,match", [
    (["--data", "/nonexistent/dataset"], "unknown dataset"),
    (["--data", "random", "--qat-epochs", "1", "--calib-images", "4"], "QAT needs real data"),
    (["--data", "random", "--checkpoint", "/nonexistent/w.pth"], "checkpoint not found"),
    (["--data", "random", "--pretrained"], "pretrained"),
    (["--data", "random", "--calib-images", "0"], "--calib-images"),
    (["--data", "random", "--model-args", '{"global_pool": "max"}'], "is not supported"),
    (["--data", "random", "--img-size", "0"], "--img-size"),
    (["--data", "random", "--num-classes", "0"], "--num-classes"),
    (["--data", "random", "--img-size", "32", "--model-args", '{"img_size": 64}'], "disagrees"),
    (["--data", "random", "--quant-config", '{"act_bits": 4}'], "act_bits"),
])
def test_quantize_bad_inputs_leave_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                           match: str) -> None:
    code = main(["quantize", "vit_test", "-o", str(tmp_path / "x.ivit"), "--calib-images", "4", *extra])
    assert_one_line_error(code, capsys.readouterr().err, match)
    assert list(tmp_path.iterdir()) == []


def test_quantize_into_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["quantize", "vit_test", "-o", str(tmp_path / "no" / "x.ivit"), "--data", "random"])
    assert_one_line_error(code, capsys.readouterr().err, "does not exist")
    assert not (tmp_path / "no").exists()


def test_quantize_keeps_existing_file_on_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.ivit"
    out.write_bytes(b"previous")
    code = main(["quantize", "vit_test", "-o", str(out), "--data", "/nonexistent"])
    assert_one_line_error(code, capsys.readouterr().err)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ivit"]


def test_nan_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = {k: v.clone().contiguous() for k, v in ivit.create_model("vit_test").state_dict().items()}
    sd["blocks.0.attn.qkv.weight"][3, 3] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    code = main(["quantize", "vit_test", "--checkpoint", str(tmp_path / "nan.safetensors"), "--data", "random",
                 "-o", str(tmp_path / "x.ivit")])
    assert_one_line_error(code, capsys.readouterr().err, "non-finite values (NaN or inf) in blocks.0.attn.qkv.weight")
    assert not (tmp_path / "x.ivit").exists()


# ---------------------------------------------------------------------------------------------
# outputs checked before any work, and named as the user wrote them


def test_report_in_a_missing_folder_fails_before_the_program_is_written(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    code = main(["ptq", "vit_test", "--data", "digits", "-o", str(tmp_path / "m.ivit"), "--report",
                 str(tmp_path / "missing" / "r.json"), "--no-progress"])
    line = assert_one_line_error(code, capsys.readouterr().err, f"output folder does not exist: {tmp_path}/missing")
    assert ".tmp" not in line and time.perf_counter() - t0 < 5
    assert list(tmp_path.iterdir()) == []  # the .ivit was not written


@pytest.mark.parametrize("cmd", [
    ["ptq", "vit_test", "--data", "digits", "--no-progress", "-o"],
    ["quantize", "vit_test", "--data", "random", "-o"],
])
def test_output_that_is_a_directory_fails_before_the_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          cmd: list[str]) -> None:
    t0 = time.perf_counter()
    code = main([*cmd, str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, f"{tmp_path} is a directory")
    assert time.perf_counter() - t0 < 5 and list(tmp_path.iterdir()) == []


def test_write_errors_name_the_users_path(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import ivit._io as io_mod

    def full(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device", str(a[0]))

    monkeypatch.setattr(io_mod, "publish", full)  # the disk fills up while the file is published
    out = tmp_path / "x.ivit"
    code = main(["quantize", "vit_test", "-o", str(out), "--data", "random", "--calib-images", "4"])
    line = assert_one_line_error(code, capsys.readouterr().err, f"cannot write {out}: No space left on device")
    assert ".tmp" not in line and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# train / qat / ptq on real data


def test_train_writes_weights_logs_and_plot(float_run: Path) -> None:
    recs = [json.loads(x) for x in (float_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4] and recs[-1]["float_top1"] > 0.2
    assert (float_run / "accuracy.png").stat().st_size > 1000
    m = ivit.create_model("vit_test", checkpoint=str(float_run / "model.safetensors"))  # a timm state dict
    assert m.head.out_features == 10


def test_qat_cli_end_to_end(float_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "qat"
    args = ["qat", "vit_test", "--data", "digits", "--checkpoint", str(float_run / "model.safetensors"),
            "--epochs", "1", "--lr", "5e-5", "--batch", "32", "--limit-train", "256", "--limit-eval", "120",
            "--calib-images", "64", "--distill", "--save-every", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "engine bit-exact" in text and "yes" in text
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    base = json.loads((float_run / "log.jsonl").read_text().splitlines()[-1])
    assert recs[0]["float_top1"] == pytest.approx(base["float_top1"])  # the same float model, same eval set
    assert abs(recs[0]["int_top1"] - recs[0]["float_top1"]) < 0.1  # PTQ starting point close to float
    assert (out / "accuracy.png").is_file() and (out / "log.csv").is_file()
    assert main(["eval", str(out / "model.ivit"), "--data", "digits", "--limit-eval", "16", "--no-progress"]) == 0
    # a finished run resumed is a no-op that rewrites the program; without --resume the folder is protected
    assert main([*args, "--resume"]) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --resume" in assert_one_line_error(2, capsys.readouterr().err)


def test_ptq_cli_with_search_and_report(float_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ptq", "vit_test", "--data", "digits", "--checkpoint", str(float_run / "model.safetensors"),
                 "--calib-images", "64", "--calib-batch", "32", "--search-images", "32", "--limit-eval", "120",
                 "--eval", "--no-progress", "-o", str(tmp_path / "s.ivit"), "--report", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "PTQ search:" in out and "top-1 (engine, 120 images)" in out
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["summary"]["search"].startswith("PTQ search:") and rep["summary"]["bitexact"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ivit", "s.json"]


def test_mismatched_checkpoint_is_one_line(float_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ptq", "vit_digits", "--data", "digits", "--checkpoint", str(float_run / "model.safetensors"),
               "-o", str(tmp_path / "x.ivit"), "--no-progress"])
    line = assert_one_line_error(rc, capsys.readouterr().err, "does not match the model vit_digits")
    assert "was written for vit_test" in line
    # a training checkpoint of vit_test resumed as vit_digits: one line, not a size-mismatch traceback
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes((float_run / "checkpoint.safetensors").read_bytes())
    rc = main(["train", "vit_digits", "--data", "digits", "--epochs", "3", "--out", str(out), "--resume",
               "--no-progress"])
    line = assert_one_line_error(rc, capsys.readouterr().err, "different run")
    assert "vit_test" in line and "vit_digits" in line
    assert not (tmp_path / "x.ivit").exists()


@pytest.mark.parametrize("argv,match", [
    (["qat", "vit_test", "--data", "digits", "--epochs", "0"], "argument --epochs: must be an integer >= 1"),
    (["qat", "vit_test", "--data", "digits", "--lr", "-1"], "--lr must be > 0"),
    (["qat", "vit_test", "--data", "digits", "--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["qat", "vit_test", "--data", "digits", "--lr", "nan"], "argument --lr: must be finite"),
    (["train", "vit_test", "--data", "nowhere"], "unknown dataset"),
    (["train", "vit_test", "--data", "random"], "--data random only calibrates"),
    (["train", "vit_test", "--data", "digits", "--aug", "mixup"], "invalid choice"),
    (["qat", "vit_test", "--data", "digits", "--resume", "/nonexistent/ck.safetensors"], "checkpoint not found"),
])
def test_bad_training_options_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                           match: str) -> None:
    assert_one_line_error(main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]), capsys.readouterr().err,
                          match)


# ---------------------------------------------------------------------------------------------
# pretrained weights offline: one line, within seconds


def test_pretrained_offline_is_one_line_and_fast(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env_clean = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ivit.cli", "ptq", "deit_tiny_patch16_224", "--pretrained",
                           "--data", "digits", "-o", str(tmp_path / "x.ivit"), "--no-progress"],
                          env={**env_clean, **env}, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    line = assert_one_line_error(proc.returncode, proc.stderr, "cannot download pretrained weights")
    assert "127.0.0.1:9 did not answer" in line and "not in the local cache" in line
    assert seconds < 45  # timm alone retries for about a minute; the rest is interpreter start-up


def test_hf_hub_offline_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    t0 = time.perf_counter()
    code = main(["ptq", "deit_tiny_patch16_224", "--pretrained", "--data", "digits", "-o", str(tmp_path / "x.ivit")])
    assert_one_line_error(code, capsys.readouterr().err, "HF_HUB_OFFLINE is set and they are not in the local cache")
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_digits(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(model_file), "--data", "digits", "--limit-eval", "16", "--batch", "16", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "top-1" in out and re.search(r"│\s+16 │", out)  # 16 images evaluated


def test_eval_missing_dataset(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(model_file), "--data", "/nonexistent"])
    assert_one_line_error(code, capsys.readouterr().err, "unknown dataset")


def test_eval_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(tmp_path / "missing.ivit"), "--data", "digits"])
    assert_one_line_error(code, capsys.readouterr().err, "no such file")


def _image_folder(root: Path, bad_name: str, bad_bytes: bytes) -> Path:
    for cls in ("a", "b"):
        (root / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (10, 200, 30)).save(root / "val" / cls / "ok.png")
    (root / "val" / "b" / bad_name).write_bytes(bad_bytes)
    return root


@pytest.mark.parametrize("bad_name,bad_bytes,match", [
    ("notes.txt", b"not an image", "not an image file"),
    ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "cannot decode image"),
    ("empty.jpg", b"", "cannot decode image"),
])
def test_eval_folder_with_non_image_files(tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str],
                                          bad_name: str, bad_bytes: bytes, match: str) -> None:
    folder = _image_folder(tmp_path / "ds", bad_name, bad_bytes)
    code = main(["eval", str(model_file), "--data", str(folder), "--batch", "2", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, match)


@pytest.mark.parametrize("kw,match", [
    (dict(num_classes=5), "dataset has 10 classes but the model predicts 5"),
    (dict(img_size=(32, 48), patch_size=16), "square"),
])
def test_eval_model_dataset_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str], kw: dict,
                                     match: str) -> None:
    from conftest import make_qmodel

    path = ivit.freeze(make_qmodel("vit_test", depth=1, calib_batches=1, **kw)).save(tmp_path / "m.ivit")
    code = main(["eval", str(path), "--data", "digits", "--limit-eval", "8"])
    assert_one_line_error(code, capsys.readouterr().err, match)


def test_eval_non_ivit_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "photo.ivit"
    Image.new("RGB", (8, 8)).save(img, format="PNG")
    code = main(["eval", str(img), "--data", "digits"])
    assert_one_line_error(code, capsys.readouterr().err, "ivit")


# ---------------------------------------------------------------------------------------------
# any failure of a loaded program: "invalid program in FILE: ...", and no traceback for anything else


@pytest.mark.parametrize("cmd", [
    ["eval", "{f}", "--data", "digits", "--limit-eval", "4", "--no-progress"],
    ["bench", "{f}", "--iters", "1", "--no-float"],
    ["inspect", "{f}"],
])
def test_a_program_failing_at_run_time_is_one_line(model_file: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, cmd: list[str]) -> None:
    from ivit.backends.engine import Engine

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("shape '[-1, 7]' is invalid for input of size 10")  # what a kernel might raise

    monkeypatch.setattr(Engine, "run", broken)  # every backend runs through it
    capsys.readouterr()
    code = main([c.format(f=model_file) for c in cmd])
    line = assert_one_line_error(code, capsys.readouterr().err, f"invalid program in {model_file}: ")
    assert "is invalid for input of size 10" in line


def test_unexpected_errors_are_one_line_and_ivit_debug_shows_them(model_file: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ivit.workflows.ptq as ptq_mod

    def boom(*a: object, **k: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(ptq_mod, "build_qmodel", boom)
    argv = ["quantize", "vit_test", "--data", "random", "-o", str(tmp_path / "x.ivit")]
    line = assert_one_line_error(main(argv), capsys.readouterr().err, "ZeroDivisionError: division by zero")
    assert "IVIT_DEBUG=1" in line
    monkeypatch.setenv("IVIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(argv)


def test_engine_refuses_bad_devices_and_meta_inputs(model_file: Path) -> None:
    with pytest.raises(ivit.IvitError, match="unknown device 'nonsense'"):
        ivit.load(model_file, device="nonsense")
    engine = ivit.load(model_file)
    with pytest.raises(ivit.IvitError, match="pixels on device meta"):
        engine(torch.empty(1, 3, 32, 32, dtype=torch.uint8, device="meta"))


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", str(model_file)])
    out = capsys.readouterr().out
    assert code == 0
    assert "vit_test" in out and "int32" in out and "float network: vit_test" in out
    for op in ("linear", "shiftgelu", "layernorm", "requantize"):
        assert op in out
    assert "integer-only: yes" in out
    assert "integer-only: NO" not in out


def test_inspect_ops_lists_every_node(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prog = load_program(model_file)
    code = main(["inspect", "--ops", str(model_file)])
    out = capsys.readouterr().out
    assert code == 0
    rows = [ln for ln in out.splitlines() if any(f" {n.op} " in ln for n in prog.nodes) and "int" in ln]
    assert len(rows) >= len(prog.nodes)


def test_inspect_limits(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = len(load_program(model_file).nodes)
    code = main(["inspect", str(model_file), "--limit", "max_nodes=10"])
    assert_one_line_error(code, capsys.readouterr().err, f"program has {n} nodes (limit 10)")
    code = main(["inspect", str(model_file), "--limit", "max_nodez=10"])
    assert_one_line_error(code, capsys.readouterr().err, "bad --limit 'max_nodez=10'")
    assert main(["inspect", str(model_file), "--limit", "max_nodes=100000"]) == 0


def test_inspect_truncated_files(tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = model_file.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    for off in (0, 1, 7, 8, 100, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, len(data) - 1):
        path = tmp_path / "t.ivit"
        path.write_bytes(data[:off])
        code = main(["inspect", str(path)])
        cap = capsys.readouterr()
        assert_one_line_error(code, cap.err)
        assert cap.out == "", off


def test_inspect_corrupted_tensor_data(tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "c.ivit").write_bytes(bytes(data))
    code = main(["inspect", str(tmp_path / "c.ivit")])
    assert_one_line_error(code, capsys.readouterr().err, "checksum")


def test_inspect_directory_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(main(["inspect", str(tmp_path)]), capsys.readouterr().err, "not a file")
    assert_one_line_error(main(["inspect", str(tmp_path / "nope.ivit")]), capsys.readouterr().err, "no such file")


# ---------------------------------------------------------------------------------------------
# programs of the previous release (format 1) still load, run and describe themselves


@pytest.mark.parametrize("name,family", [("vit_test", "vit"), ("swin_test", "swin")])
def test_format1_programs(name: str, family: str, capsys: pytest.CaptureFixture[str]) -> None:
    f = FIXTURES / f"{name}_v1.ivit"
    assert main(["inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"{name}(num_classes=10) ({family}), format 1" in out and "no model_args recorded" in out
    assert main(["eval", str(f), "--data", "digits", "--limit-eval", "8", "--no-progress"]) == 0
    assert main(["bench", str(f), "--iters", "1"]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in ivit.create_model(name).parameters())
    assert f"float network: {name}(num_classes=10), {n:,} parameters" in out


# ---------------------------------------------------------------------------------------------
# bench, models, export, arguments


def test_bench_prints_float_and_int_rows(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", str(model_file), "--batch", "2", "--iters", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "torch fp32" in out and "ivit int" in out and "median ms" in out


def test_bench_float_twin_over_the_limit_is_a_note(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(model_file), "--iters", "1", "--limit", "max_float_params=1000"]) == 0
    cap = capsys.readouterr()
    assert "ivit: note: no float twin:" in cap.err and "limit max_float_params=1,000" in cap.err
    assert "torch fp32" not in cap.out and "ivit int" in cap.out


def test_models_lists_supported_names_by_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "deit_"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.strip() for ln in lines if ln.startswith("  ")]
    heads = [ln for ln in lines if not ln.startswith("  ")]
    assert "deit_tiny_patch16_224" in names and all("deit_" in n for n in names)
    assert "deit_tiny_distilled_patch16_224" in names  # its own family
    assert any(h.startswith("vit (") for h in heads) and any(h.startswith("deit_distilled (") for h in heads)


def test_models_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--why", "vit_small_r26_s32_224"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("vit_small_r26_s32_224: not supported: ") and "\n" not in out
    assert main(["models", "--why", "deit_small_patch16_224"]) == 0
    assert capsys.readouterr().out.strip() == "deit_small_patch16_224: supported (vit)"


def test_export_bad_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.ivit"
    bad.write_bytes(b"junk")
    code = main(["export", str(bad), "--format", "c", "-o", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "not an .ivit file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["quantize", "vit_test"],
    ["quantize", "vit_test", "-o", "x.ivit"],
    ["bench", "m.ivit", "--batch", "0"],
    ["bench", "m.ivit", "--batch", "two"],
    ["bench", "m.ivit", "--iters", "-1"],
    ["bench", "m.ivit", "--threads", "-1"],
    ["eval", "m.ivit", "--data", "digits", "--limit-eval", "-1"],
    ["quantize", "vit_test", "-o", "x.ivit", "--data", "random", "--qat-epochs", "-1"],
    ["eval", "m.ivit", "--data", "digits", "--split", "holdout"],
    ["eval", "m.ivit", "--data", "digits", "--backend", "gpu"],
    ["inspect"],
    ["inspect", "a.ivit", "--bogus-flag"],
    ["demo", "--model", "resnet"],
    ["ptq", "vit_test", "--data", "digits"],
])
def test_argument_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                         argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(main(argv), capsys.readouterr().err)
    assert "ivit: error: ivit" not in line  # the program name once
    assert list(tmp_path.iterdir()) == []


def test_argparse_messages(capsys: pytest.CaptureFixture[str]) -> None:
    line = assert_one_line_error(main(["inspect", "a.ivit", "--bogus-flag"]), capsys.readouterr().err)
    assert line == "ivit: error: unrecognized arguments: --bogus-flag"
    line = assert_one_line_error(main(["qat", "vit_test", "--out", "o"]), capsys.readouterr().err)
    assert line == "ivit: error: qat: the following arguments are required: --data"


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("quantize", "train", "qat", "ptq", "eval", "inspect", "bench", "export", "demo", "models"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["qat", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model-args JSON" in out and "(default: 1e-06)" in out and "(default: 512)" in out


# ---------------------------------------------------------------------------------------------
# The real executable: exit codes and stderr as a user sees them


def test_subprocess_bad_input(tmp_path: Path, model_file: Path) -> None:
    data = model_file.read_bytes()
    (tmp_path / "trunc.ivit").write_bytes(data[: len(data) // 2])
    r = run_cli("inspect", "trunc.ivit", cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, "not an .ivit file")
    assert r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunc.ivit"]
