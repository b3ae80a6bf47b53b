"""Tests for ``ivit.nn.observers``: running min/max with EMA momentum 0.95, freezing, PTQ clipping and the
error raised when a module is used before calibration."""

from __future__ import annotations

import pytest
import torch

from ivit.nn import NotCalibratedError, RangeObserver


def test_observer_first_batch_sets_range_then_ema_with_momentum_095() -> None:
    obs = RangeObserver(8)
    assert obs.momentum == 0.95
    obs.train()
    a = torch.tensor([-2.0, 1.0, 3.0])
    b = torch.tensor([-10.0, 0.5, 7.0])
    obs.observe(a)
    assert bool(obs.initialized)
    assert float(obs.running_min) == -2.0 and float(obs.running_max) == 3.0
    obs.observe(b)
    assert float(obs.running_min) == pytest.approx(0.95 * -2.0 + 0.05 * -10.0, rel=1e-15)
    assert float(obs.running_max) == pytest.approx(0.95 * 3.0 + 0.05 * 7.0, rel=1e-15)
    # scale = max(|min|, |max|) / qmax
    amax = max(abs(0.95 * -2.0 + 0.05 * -10.0), 0.95 * 3.0 + 0.05 * 7.0)
    assert float(obs.scale()) == pytest.approx(amax / 127, rel=1e-15)


def test_observer_custom_momentum() -> None:
    obs = RangeObserver(16, momentum=0.5).train()
    obs.observe(torch.tensor([0.0, 4.0]))
    obs.observe(torch.tensor([0.0, 8.0]))
    assert float(obs.running_max) == 6.0
    assert float(obs.scale()) == pytest.approx(6.0 / (2**15 - 1))


def test_observer_ignores_eval_and_frozen() -> None:
    obs = RangeObserver(8).train()
    obs.observe(torch.tensor([-1.0, 1.0]))
    obs.eval()
    obs.observe(torch.tensor([-100.0, 100.0]))
    assert float(obs.running_max) == 1.0
    obs.train()
    obs.frozen.fill_(True)
    assert not obs.observing
    obs.observe(torch.tensor([-100.0, 100.0]))
    assert float(obs.running_max) == 1.0 and float(obs.running_min) == -1.0
    obs.frozen.fill_(False)
    obs.observe(torch.tensor([-100.0, 100.0]))
    assert float(obs.running_max) > 1.0


def test_observer_before_calibration_raises() -> None:
    obs = RangeObserver(8)
    with pytest.raises(NotCalibratedError, match="calibrat"):
        obs.scale()


def test_observer_rejects_non_finite() -> None:
    obs = RangeObserver(8).train()
    with pytest.raises(FloatingPointError):
        obs.observe(torch.tensor([1.0, float("nan")]))
    assert not bool(obs.initialized)


def test_observer_clip_overrides_running_range() -> None:
    obs = RangeObserver(8).train()
    obs.observe(torch.tensor([-5.0, 5.0]))
    obs.clip.fill_(2.0)
    assert float(obs.amax()) == 2.0
    assert float(obs.scale()) == pytest.approx(2.0 / 127)


def test_observer_state_is_in_state_dict() -> None:
    obs = RangeObserver(8).train()
    obs.observe(torch.tensor([-3.0, 2.0]))
    other = RangeObserver(8)
    other.load_state_dict(obs.state_dict())
    assert float(other.scale()) == float(obs.scale())


def test_observer_amax_has_a_floor_and_scale_uses_bits() -> None:
    obs = RangeObserver(16).train()
    obs.observe(torch.zeros(4))  # an all-zero signal still gives a usable (tiny) scale
    assert float(obs.amax()) == 1e-8
    assert float(obs.scale()) == pytest.approx(1e-8 / (2**15 - 1))
    assert obs.scale().dtype == torch.float64


def test_not_calibrated_error_is_a_runtime_error() -> None:
    assert issubclass(NotCalibratedError, RuntimeError)
