"""Tests for ``ivit.config.QuantConfig``: defaults, validation and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

import ivit
from ivit import LayerNormImpl, Probs, QuantConfig


def test_defaults_match_the_method() -> None:
    c = QuantConfig()
    assert (c.act_bits, c.residual_bits, c.softmax_bits) == (8, 16, 8)
    assert c.momentum == 0.95 and c.shiftmax_n_max == 15 and c.shiftgelu_n_max == 23
    assert c.per_channel_weights
    assert c.probs is Probs.REL8 and c.layernorm is LayerNormImpl.INT32


@pytest.mark.parametrize("probs", ["rel8", "shiftmax8", Probs.REL8, Probs.SHIFTMAX8])
@pytest.mark.parametrize("layernorm", ["int32", "int64", LayerNormImpl.INT32, LayerNormImpl.INT64])
def test_enum_fields_accept_values_and_members(probs: str | Probs, layernorm: str | LayerNormImpl) -> None:
    c = QuantConfig(probs=probs, layernorm=layernorm)
    assert type(c.probs) is Probs and c.probs == Probs(probs)
    assert type(c.layernorm) is LayerNormImpl and c.layernorm == LayerNormImpl(layernorm)
    d = json.loads(c.to_json())
    assert d["probs"] == Probs(probs).value and d["layernorm"] == LayerNormImpl(layernorm).value
    assert QuantConfig.from_json(c.to_json()) == c


def test_config_json_of_version_0_1_reads_with_the_old_numerics_fields_defaulted() -> None:
    """A config written by ivit 0.1 (before probs/layernorm existed) still parses; the new fields take their
    defaults (a format-1 program's own ops keep its numerics, see tests/backends/test_engine.py)."""
    old = {"act_bits": 8, "residual_bits": 16, "score_bits": 16, "softmax_bits": 8, "gelu_sigmoid_bits": 16,
           "shiftmax_n_max": 15, "shiftgelu_n_max": 23, "momentum": 0.95, "per_channel_weights": True}
    c = QuantConfig.from_json(json.dumps(old))
    assert c == QuantConfig() and c.probs is Probs.REL8


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(),
        QuantConfig(
            residual_bits=12,
            score_bits=20,
            gelu_sigmoid_bits=8,
            shiftmax_n_max=10,
            shiftgelu_n_max=30,
            momentum=0.0,
            per_channel_weights=False,
        ),
        QuantConfig(residual_bits=9, momentum=0.999),
        QuantConfig(probs=Probs.SHIFTMAX8, layernorm=LayerNormImpl.INT64, score_bits=24),
    ],
)
def test_json_round_trip(cfg: QuantConfig) -> None:
    s = cfg.to_json()
    assert json.loads(s) == dataclasses.asdict(cfg)
    back = QuantConfig.from_json(s)
    assert back == cfg and type(back.momentum) is float and type(back.per_channel_weights) is bool
    assert QuantConfig.from_dict(json.loads(s)) == cfg


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().momentum = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw",
    [
        dict(act_bits=16),
        dict(softmax_bits=16),
        dict(residual_bits=8),
        dict(residual_bits=17),
        dict(residual_bits=24),
        dict(score_bits=30),
        dict(gelu_sigmoid_bits=7),
        dict(gelu_sigmoid_bits=17),
        dict(shiftmax_n_max=7),
        dict(shiftgelu_n_max=31),
        dict(momentum=1.0),
        dict(momentum=-0.1),
        dict(probs="rel16"),
        dict(probs="REL8"),
        dict(layernorm="int16"),
        dict(layernorm=""),
    ],
)
def test_validation_errors(kw: dict) -> None:
    with pytest.raises(ivit.IvitError):
        QuantConfig(**kw)
    with pytest.raises(ivit.IvitError):
        QuantConfig.from_json(json.dumps(kw))


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "bad QuantConfig JSON"),
        ("[1, 2]", "must be an object"),
        ('"act_bits"', "must be an object"),
        ('{"act_bitz": 8}', "unknown QuantConfig fields"),
    ],
)
def test_bad_json(text: str, match: str) -> None:
    with pytest.raises(ivit.IvitError, match=match):
        QuantConfig.from_json(text)


@pytest.mark.parametrize(
    "kw",
    [
        dict(residual_bits=16.5),
        dict(residual_bits="16"),
        dict(act_bits=True),
        dict(momentum="0.9"),
        dict(momentum=None),
        dict(per_channel_weights=1),
        dict(per_channel_weights="yes"),
        dict(probs=8),
        dict(probs=None),
        dict(layernorm=32),
        dict(layernorm=["int32"]),
    ],
)
def test_wrong_types_are_one_line_errors(kw: dict) -> None:
    """A JSON config with a float bit width or a string momentum is rejected up front, not deep in freeze."""
    with pytest.raises(ivit.IvitError, match="must be"):
        QuantConfig.from_json(json.dumps(kw))
