"""``QuantConfig``: the bit widths and free parameters of an I-ViT model (a frozen, JSON-able dataclass)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from .errors import IvitError

__all__ = ["QuantConfig"]


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths and approximation parameters.

    Attributes:
        act_bits: signed width of activations between linear layers (int8 GEMM inputs). Fixed at 8.
        residual_bits: signed width of the residual stream (and patch/position embedding sum).
        score_bits: signed width of attention scores fed to Shiftmax.
        softmax_bits: Shiftmax output width ``k_out``; probabilities at scale ``2**-(k_out-1)``.
        gelu_sigmoid_bits: width of ShiftGELU's sigmoid (``k_out``), scale ``2**-(k-1)``.
        shiftmax_n_max: largest ShiftExp shift ``n`` for Shiftmax (reduced per layer to bound sums).
        shiftgelu_n_max: largest ShiftExp shift ``n`` for ShiftGELU.
        momentum: EMA momentum of the running min/max observers.
        per_channel_weights: per-output-channel int8 weight scales (the classifier head is always
            per-tensor, so that argmax of its int32 logits is the prediction).
    """

    act_bits: int = 8
    residual_bits: int = 16
    score_bits: int = 16
    softmax_bits: int = 8
    gelu_sigmoid_bits: int = 16
    shiftmax_n_max: int = 15
    shiftgelu_n_max: int = 23
    momentum: float = 0.95
    per_channel_weights: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):  # JSON gives any type: reject 16.5 bits or a string momentum up front
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            want = {"float": (int, float), "bool": (bool,)}.get(kind, (int,))
            if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
                raise IvitError(f"QuantConfig.{f.name} must be {kind}, got {v!r}")
        if self.act_bits != 8 or self.softmax_bits != 8:
            raise IvitError("act_bits and softmax_bits must be 8 (int8 GEMM inputs)")
        if not 9 <= self.residual_bits <= 24:
            raise IvitError("residual_bits must be in [9, 24]")
        if not 9 <= self.score_bits <= 24:
            raise IvitError("score_bits must be in [9, 24]")
        if not 8 <= self.gelu_sigmoid_bits <= 16:
            raise IvitError("gelu_sigmoid_bits must be in [8, 16]")
        if not 8 <= self.shiftmax_n_max <= 30 or not 8 <= self.shiftgelu_n_max <= 30:
            raise IvitError("ShiftExp n_max must be in [8, 30]")
        if not 0.0 <= self.momentum < 1.0:
            raise IvitError("momentum must be in [0, 1)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise IvitError(f"unknown QuantConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> QuantConfig:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise IvitError(f"bad QuantConfig JSON: {e}") from None
        if not isinstance(d, dict):
            raise IvitError("QuantConfig JSON must be an object")
        return cls.from_dict(d)
