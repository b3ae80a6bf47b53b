"""One definition of each default: the recipes, and the CLI, the dataclasses, the demo and the README all
agreeing with them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import ivit
from ivit.cli import parse_run
from ivit.training.trainer import TrainConfig
from ivit.workflows import PTQRun, QATRun, TrainRun, recipes
from ivit.workflows.demo import DemoRun

ROOT = Path(__file__).resolve().parents[2]
SPEC = ivit.ModelSpec("vit_test")


def test_the_qat_recipe_is_the_papers() -> None:
    q = recipes.QAT_TRAINING
    assert (q.lr, q.weight_decay, q.label_smoothing, q.warmup_epochs, q.epochs, q.batch_size) == (
        1e-6, 0.05, 0.1, 0.0, 90, 64)
    assert recipes.FLOAT_TRAINING == TrainConfig()  # TrainConfig's defaults are the float recipe, not a third set
    f = recipes.FLOAT_TRAINING
    assert (f.lr, f.weight_decay, f.label_smoothing, f.warmup_epochs, f.epochs) == (1e-3, 0.05, 0.1, 1.0, 30)
    assert recipes.CALIBRATION_IMAGES == 512 and recipes.CALIBRATION_BATCH == 64 and recipes.SEARCH_IMAGES == 128


def _base(cmd: str) -> list[str]:
    out = ["--out", "run"] if cmd in ("train", "qat") else ["-o", "m.ivit"]
    return [cmd, "vit_test", "--data", "digits", *out]


def test_cli_defaults_are_the_recipes() -> None:
    _, train = parse_run(_base("train"))
    assert isinstance(train, TrainRun) and train.train == recipes.FLOAT_TRAINING
    _, qat = parse_run(_base("qat"))
    assert isinstance(qat, QATRun) and qat.train == recipes.QAT_TRAINING
    assert (qat.calib_images, qat.calib_batch, qat.search_images) == (recipes.CALIBRATION_IMAGES,
                                                                      recipes.CALIBRATION_BATCH, recipes.SEARCH_IMAGES)
    _, ptq = parse_run(_base("ptq"))
    api = PTQRun(SPEC, "digits", "m.ivit")
    assert isinstance(ptq, PTQRun) and dataclasses.replace(ptq, model=SPEC) == api
    _, quantize = parse_run(_base("quantize"))  # calibration only: the same calibration as ptq
    assert dataclasses.replace(quantize, model=SPEC) == dataclasses.replace(api, search=False)
    _, quantize_qat = parse_run([*_base("quantize"), "--qat-epochs", "3"])
    assert quantize_qat.train == dataclasses.replace(recipes.QAT_TRAINING, epochs=3)  # the same QAT recipe
    assert QATRun(SPEC, "digits", "run").train == recipes.QAT_TRAINING
    assert TrainRun(SPEC, "digits", "run").train == recipes.FLOAT_TRAINING
    _, distill = parse_run([*_base("qat"), "--distill"])
    assert distill.train.distill_alpha == recipes.DISTILL_ALPHA
    assert DemoRun().float_training == recipes.DEMO_FLOAT and DemoRun().qat == recipes.DEMO_QAT


def test_cli_options_reach_the_config() -> None:
    _, qat = parse_run([*_base("qat"), "--lr", "2e-6", "--epochs", "3", "--batch", "16", "--weight-decay", "0",
                        "--model-args", '{"depth": 1}', "--img-size", "32", "--calib-images", "100"])
    assert (qat.train.lr, qat.train.epochs, qat.train.batch_size, qat.train.weight_decay) == (2e-6, 3, 16, 0.0)
    assert qat.model.model_args == {"depth": 1, "img_size": 32} and qat.calib_images == 100


def test_augmentation_per_dataset() -> None:
    assert recipes.resolve_augment("digits", "auto") is recipes.Augment.PAD_CROP
    assert recipes.resolve_augment("fashion-mnist", "auto") is recipes.Augment.PAD_CROP_FLIP
    assert recipes.resolve_augment("/data/imagenet", "auto") is recipes.Augment.TIMM
    assert recipes.augmentation("digits", "none", 16, (0.5,), (0.5,)) is None
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[:, :, :4] = 255  # a bright left edge: a flip moves it to the right
    torch.manual_seed(0)
    digits = recipes.augmentation("digits", "auto", 16, (0.5,), (0.5,))
    fashion = recipes.augmentation("fashion-mnist", "auto", 16, (0.5,), (0.5,))
    assert all(int(digits(img)[:, :, 12:].sum()) == 0 for _ in range(40))  # never mirrored
    assert any(int(fashion(img)[:, :, 12:].sum()) > 0 for _ in range(40))
    with pytest.raises(ivit.IvitError, match="unknown augmentation 'cutmix'"):
        recipes.resolve_augment("digits", "cutmix")


def _num(x: float) -> str:
    return (f"{x:.0e}" if 0 < x < 0.01 else f"{x:g}").replace("e-0", "e-")  # 0.001 -> 1e-3, as written


def test_readme_quotes_the_recipes() -> None:
    text = (ROOT / "README.md").read_text()
    for r in (recipes.QAT_TRAINING, recipes.FLOAT_TRAINING):
        assert f"lr {_num(r.lr)}, weight decay {_num(r.weight_decay)}, label smoothing {_num(r.label_smoothing)}" \
            in text
    assert f"{recipes.CALIBRATION_IMAGES} training images" in text
    assert "pad-crop + flip" in text and re.search(r"digits: pad-crop\b", text)
    for name in ("run_train", "run_ptq", "run_qat", "run_eval", "ModelSpec", "TrainRun", "PTQRun", "QATRun", "ptq("):
        assert name in text, name


def test_the_public_api_exports_what_the_readme_shows() -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Python API\n")
    section = text[start:text.index("\n## ", start + 5)]
    used = set(re.findall(r"\bivit\.([A-Za-z_]\w*)", section))
    assert {"run_train", "run_ptq", "run_qat", "run_eval", "run_bench", "ModelSpec", "Trainer", "FloatWrapper",
            "ptq", "recipes"} <= used
    missing = sorted(n for n in used if n not in ivit.__all__ and n not in ("data",))
    assert not missing, f"the README's Python section uses ivit.{missing} but ivit.__all__ does not export it"
    assert all(hasattr(ivit, n) for n in ivit.__all__)
