"""``ModelSpec``: validation, JSON round trip, building on the meta device, size limits, one-line errors for
unknown timm arguments and mismatched checkpoints, and rebuilding the float network from a program's meta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import ivit
from ivit.errors import IvitError
from ivit.workflows.spec import ModelSpec, checkpoint_spec, parse_model_args, spec_from_program

GEOMETRY = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 2, "num_heads": 2, "in_chans": 3,
            "num_classes": 10}
ROOT = Path(__file__).resolve().parents[2]


def test_json_round_trip_and_description() -> None:
    spec = ModelSpec("vit_tiny_patch16_224", {**GEOMETRY, "img_size": [28, 28]}, checkpoint="w.safetensors",
                     mean=[0.5, 0.5, 0.5], std=(0.25, 0.25, 0.25))
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.model_args["img_size"] == (28, 28) and again.mean == (0.5, 0.5, 0.5)
    assert json.loads(spec.to_json())["model_args"]["img_size"] == [28, 28]
    assert spec.describe().startswith("vit_tiny_patch16_224(img_size=[28, 28], patch_size=7, embed_dim=96")
    assert spec.cli_args().startswith("vit_tiny_patch16_224 --model-args '{\"img_size\": [28, 28]")
    assert ModelSpec("vit_test").describe() == "vit_test"
    assert spec.program_meta(123) == {"model_args": {**GEOMETRY, "img_size": [28, 28]}, "float_params": 123}


@pytest.mark.parametrize("kwargs,match", [
    (dict(model_args={"img_size": float("nan")}), "non-finite"),
    (dict(model_args={"pretrained": True}), "not allowed"),
    (dict(model_args={"bad key": 1}), "not an identifier"),
    (dict(model_args={"x": {"nested": 1}}), "must be a JSON number"),
    (dict(model_args={"x": [[[[1]]]]}), "nested at most 3 deep"),
    (dict(model_args=[1, 2]), "must be a JSON object"),
    (dict(num_classes=0), "num_classes must be an integer"),
    (dict(num_classes=5, model_args={"num_classes": 10}), "num_classes is 5 but model_args says 10"),
    (dict(pretrained=True, checkpoint="w.pth"), "either --pretrained or --checkpoint"),
    (dict(mean=(0.5,) * 3), "mean and std go together"),
    (dict(mean=(0.5,) * 3, std=(0.0,) * 3), "std must be positive"),
])
def test_bad_specs_are_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(IvitError, match=match) as e:
        ModelSpec("vit_test", **kwargs)
    assert "\n" not in str(e.value)


def test_unknown_fields_in_json() -> None:
    with pytest.raises(IvitError, match="unknown model spec fields"):
        ModelSpec.from_dict({"name": "vit_test", "arch": 1})
    with pytest.raises(IvitError, match="model spec JSON is not valid JSON"):
        ModelSpec.from_json("{")


def test_parse_model_args(tmp_path: Path) -> None:
    assert parse_model_args(None) == {} and parse_model_args("") == {}
    assert parse_model_args('{"img_size": 28, "depths": [2, 2]}') == {"img_size": 28, "depths": (2, 2)}
    f = tmp_path / "model.json"
    f.write_text(json.dumps(GEOMETRY))
    assert parse_model_args(f"@{f}") == GEOMETRY
    for text, match in (("{img_size: 28}", "not valid JSON"), ("[1]", "must be a JSON object"),
                        ('{"a": NaN}', "not valid JSON"), (f"@{tmp_path / 'nope.json'}", "cannot read")):
        with pytest.raises(IvitError, match=match):
            parse_model_args(text)


def test_meta_device_count_matches_the_real_model_and_the_limit() -> None:
    spec = ModelSpec("vit_tiny_patch16_224", GEOMETRY)
    model = spec.create()
    assert spec.num_params() == sum(p.numel() for p in model.parameters())
    assert model.patch_embed.img_size == (28, 28) and len(model.blocks) == 2 and model.embed_dim == 96
    with pytest.raises(IvitError, match="limit max_float_params=1,000"):
        spec.create(ivit.Limits(max_float_params=1000))
    big = ModelSpec("vit_huge_patch14_224")
    with pytest.raises(IvitError, match="630,764,800 parameters"):  # counted on the meta device: no 2.5 GB allocated
        big.check_size(ivit.Limits(max_float_params=10**8))


@pytest.mark.parametrize("args,match", [
    ({"patch_sz": 7}, "vit_tiny_patch16_224 takes no model argument 'patch_sz'"),
    ({"embed_dim": 97}, "cannot build vit_tiny_patch16_224.*divisible"),
])
def test_unknown_or_inconsistent_timm_arguments_are_one_line(args: dict, match: str) -> None:
    with pytest.raises(IvitError, match=match) as e:
        ModelSpec("vit_tiny_patch16_224", args).create()
    assert "\n" not in str(e.value)


def test_checkpoint_errors_name_the_expected_geometry(tmp_path: Path) -> None:
    from ivit.workflows.common import save_state_dict

    torch.manual_seed(0)
    custom = ModelSpec("vit_tiny_patch16_224", GEOMETRY)
    w = tmp_path / "model.safetensors"
    save_state_dict(custom.create(), w, custom)
    assert checkpoint_spec(w) == custom
    assert ModelSpec("vit_tiny_patch16_224", GEOMETRY, checkpoint=str(w)).create() is not None
    with pytest.raises(IvitError) as e:  # the geometry given only by the name
        ModelSpec("vit_tiny_patch16_224", checkpoint=str(w)).create()
    msg = str(e.value)
    assert "\n" not in msg and "does not match the model vit_tiny_patch16_224" in msg
    assert "120 missing, 0 unexpected, 32 shape mismatches" in msg
    assert "cls_token is (1, 1, 96) in the checkpoint but (1, 1, 192) in the model" in msg
    assert "geometry comes from the model name and its model arguments (--model-args) only" in msg
    assert "the checkpoint was written for vit_tiny_patch16_224 --model-args '{\"depth\": 2, \"embed_dim\": 96" in msg
    # a foreign state dict (no ivit record): the mismatch and the expected geometry, nothing invented
    foreign = timm.create_model("vit_tiny_patch16_224", **GEOMETRY).state_dict()
    save_file({k: v.contiguous() for k, v in foreign.items()}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(IvitError, match=r"does not match the model vit_tiny_patch16_224\(img_size=35") as e:
        ModelSpec("vit_tiny_patch16_224", {**GEOMETRY, "img_size": 35}, checkpoint=str(tmp_path / "foreign.safetensors")
                  ).create()
    assert "written for" not in str(e.value)


def test_checkpoint_normalization_travels_with_the_weights(tmp_path: Path) -> None:
    from ivit.workflows.common import save_state_dict

    spec = ModelSpec("vit_test", mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    save_state_dict(spec.create(), tmp_path / "m.safetensors", spec)
    model = ModelSpec("vit_test", checkpoint=str(tmp_path / "m.safetensors")).create()
    cfg = model.pretrained_cfg
    assert tuple(cfg["mean"]) == (0.2, 0.3, 0.4) and tuple(cfg["std"]) == (0.5, 0.6, 0.7)
    assert ivit.quantize(model).meta["mean"] == [0.2, 0.3, 0.4]  # folded into the integer patch embedding


def test_nan_checkpoint_is_one_line(tmp_path: Path) -> None:
    sd = {k: v.clone().contiguous() for k, v in ivit.create_model("vit_test").state_dict().items()}
    sd["head.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(IvitError, match="non-finite values .* in head.weight"):
        ModelSpec("vit_test", checkpoint=str(tmp_path / "nan.safetensors")).create()


def test_spec_from_program_meta() -> None:
    v1 = ivit.load_program(ROOT / "tests" / "fixtures" / "vit_test_v1.ivit")  # ivit 0.1: no model_args
    spec = spec_from_program(v1.meta)
    assert spec == ModelSpec("vit_test", {}, num_classes=10)
    meta = {"model": "vit_tiny_patch16_224", "model_args": GEOMETRY, "input_shape": [3, 28, 28],
            "num_classes": 10, "arch": {"depth": 2, "embed_dim": 96, "num_heads": 2, "patch_size": 7}}
    assert spec_from_program(meta) == ModelSpec("vit_tiny_patch16_224", GEOMETRY)
    timm_meta = {"model": "deit_tiny_patch16_224", "input_shape": [3, 64, 64], "num_classes": 7}
    assert spec_from_program(timm_meta) == ModelSpec("deit_tiny_patch16_224", {"img_size": 64}, num_classes=7)
    with pytest.raises(IvitError, match="model_args say depth=2000 but it was frozen with depth=2"):
        spec_from_program({**meta, "model_args": {**GEOMETRY, "depth": 2000}})
    with pytest.raises(IvitError, match="model argument 'x' must be a JSON number"):
        spec_from_program({**meta, "model_args": {"x": {"y": 1}}})
    with pytest.raises(IvitError, match="does not name its model"):
        spec_from_program({**meta, "model": 3})
