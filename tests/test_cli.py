"""Tests for the ``ivit`` command line.

Success paths (quantize, eval, inspect, bench, models) and every bad input the issue lists: wrong
arguments, unknown model names, missing paths, non-image data, damaged ``.ivit`` files.  Each bad
input must give exactly one line on stderr, exit code 2, no traceback and no (partial) output file.
Most cases call ``ivit.cli.main`` in-process (an escaping exception fails the test just like a
traceback would); a few run the real executable in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import ivit
from ivit.cli import main
from ivit.program import load_program


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


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "ivit.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no wrapping of the lines we look for


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ivit quantize vit_test --data random --calib-batches 1`` (shared by the read-only tests)."""
    d = tmp_path_factory.mktemp("cli")
    assert (
        main(
            [
                "quantize",
                "vit_test",
                "-o",
                str(d / "m.ivit"),
                "--data",
                "random",
                "--calib-batches",
                "1",
                "--batch",
                "4",
            ]
        )
        == 0
    )
    return d / "m.ivit"


# ---------------------------------------------------------------------------------------------
# quantize


def test_quantize_random_writes_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.ivit"
    code = main(["quantize", "vit_test", "-o", str(out), "--data", "random", "--calib-batches", "1"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"wrote {out}" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ivit"]  # no leftover temporary files
    prog = load_program(out)
    assert prog.meta["model"] == "vit_test" and prog.meta["input_shape"] == [3, 32, 32]
    assert ivit.verify_integer_only(ivit.Engine(prog, backend="reference")).ok


def test_quantize_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["quantize", "unknown_model", "-o", str(tmp_path / "x.ivit"), "--data", "random"])
    cap = capsys.readouterr()
    assert_one_line_error(code, cap.err, "unknown model")
    assert cap.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--data", "/nonexistent/dataset"], "unknown dataset"),
        (["--data", "random", "--qat-epochs", "1", "--calib-batches", "1"], "QAT needs real data"),
        (["--data", "random", "--checkpoint", "/nonexistent/w.pth"], "checkpoint not found"),
        (["--data", "random", "--pretrained"], "pretrained"),
        (["--data", "random", "--calib-batches", "0"], "--calib-batches"),
        (["--data", "random", "--img-size", "30"], "multiple of the patch size"),
        (["--data", "random", "--img-size", "0"], "--img-size"),
        (["--data", "random", "--num-classes", "0"], "--num-classes"),
    ],
)
def test_quantize_bad_inputs_leave_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], match: str
) -> None:
    code = main(["quantize", "vit_test", "-o", str(tmp_path / "x.ivit"), *extra])
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


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_digits(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", str(model_file), "--data", "digits", "--limit", "1", "--batch", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "top-1" in out and "16" in out  # 16 images evaluated


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


@pytest.mark.parametrize(
    "bad_name,bad_bytes,match",
    [
        ("notes.txt", b"not an image", "not an image file"),
        ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "cannot decode image"),
        ("empty.jpg", b"", "cannot decode image"),
    ],
)
def test_eval_folder_with_non_image_files(
    tmp_path: Path,
    model_file: Path,
    capsys: pytest.CaptureFixture[str],
    bad_name: str,
    bad_bytes: bytes,
    match: str,
) -> None:
    folder = _image_folder(tmp_path / "ds", bad_name, bad_bytes)
    code = main(["eval", str(model_file), "--data", str(folder), "--batch", "2"])
    assert_one_line_error(code, capsys.readouterr().err, match)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_classes=5), "dataset has 10 classes but the model predicts 5"),
        (dict(img_size=(32, 48), patch_size=16), "square"),
    ],
)
def test_eval_model_dataset_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kw: dict, match: str
) -> None:
    from conftest import make_qmodel

    path = ivit.freeze(make_qmodel("vit_test", depth=1, calib_batches=1, **kw)).save(tmp_path / "m.ivit")
    code = main(["eval", str(path), "--data", "digits", "--limit", "1"])
    assert_one_line_error(code, capsys.readouterr().err, match)


def test_eval_non_ivit_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "photo.ivit"
    Image.new("RGB", (8, 8)).save(img, format="PNG")
    code = main(["eval", str(img), "--data", "digits"])
    assert_one_line_error(code, capsys.readouterr().err, "ivit")


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", str(model_file)])
    out = capsys.readouterr().out
    assert code == 0
    assert "vit_test" in out and "int32 logits" in out
    for op in ("linear", "shiftmax", "shiftgelu", "layernorm", "requantize"):
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


def test_inspect_truncated_files(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = model_file.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    for off in (0, 1, 7, 8, 100, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, len(data) - 1):
        path = tmp_path / "t.ivit"
        path.write_bytes(data[:off])
        code = main(["inspect", str(path)])
        cap = capsys.readouterr()
        assert_one_line_error(code, cap.err)
        assert cap.out == "", off


def test_inspect_corrupted_tensor_data(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "c.ivit").write_bytes(bytes(data))
    code = main(["inspect", str(tmp_path / "c.ivit")])
    assert_one_line_error(code, capsys.readouterr().err, "checksum")


def test_inspect_directory_and_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_error(main(["inspect", str(tmp_path)]), capsys.readouterr().err, "not a file")
    assert_one_line_error(
        main(["inspect", str(tmp_path / "nope.ivit")]), capsys.readouterr().err, "no such file"
    )


# ---------------------------------------------------------------------------------------------
# bench, models, arguments


def test_bench_prints_float_and_int_rows(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", str(model_file), "--batch", "2", "--iters", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "torch fp32" in out and "ivit int" in out and "median ms" in out


def test_models_lists_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "deit_"]) == 0
    names = capsys.readouterr().out.split()
    assert "deit_tiny_patch16_224" in names and all("deit_" in n for n in names)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["quantize", "vit_test"],
        ["quantize", "vit_test", "-o", "x.ivit"],
        ["bench", "m.ivit", "--batch", "0"],
        ["bench", "m.ivit", "--batch", "two"],
        ["bench", "m.ivit", "--iters", "-1"],
        ["bench", "m.ivit", "--threads", "-1"],
        ["eval", "m.ivit", "--data", "digits", "--limit", "-1"],
        ["quantize", "vit_test", "-o", "x.ivit", "--data", "random", "--qat-epochs", "-1"],
        ["eval", "m.ivit", "--data", "digits", "--split", "holdout"],
        ["eval", "m.ivit", "--data", "digits", "--backend", "gpu"],
        ["inspect"],
        ["inspect", "a.ivit", "--bogus-flag"],
        ["demo", "--model", "resnet"],
    ],
)
def test_argument_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(main(argv), capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("quantize", "eval", "inspect", "bench", "demo", "models"):
        assert cmd in out


# ---------------------------------------------------------------------------------------------
# The real executable: exit codes and stderr as a user sees them


def test_subprocess_bad_inputs(tmp_path: Path, model_file: Path) -> None:
    data = model_file.read_bytes()
    (tmp_path / "trunc.ivit").write_bytes(data[: len(data) // 2])
    r = run_cli("inspect", "trunc.ivit", cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr)
    assert r.stdout == ""
    r = run_cli("quantize", "unknown_model", "-o", "x.ivit", "--data", "random", cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, "unknown model")
    assert not (tmp_path / "x.ivit").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunc.ivit"]


def test_subprocess_inspect_ok(model_file: Path) -> None:
    r = run_cli("inspect", str(model_file))
    assert r.returncode == 0, r.stderr
    assert "integer-only: yes" in r.stdout and "Traceback" not in r.stderr
