"""``QuantConfig``: the bit widths and free parameters of an I-ViT model (a frozen, JSON-able dataclass)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from enum import Enum

from .errors import IvitError

__all__ = ["QuantConfig", "Probs", "LayerNormImpl"]


class Probs(str, Enum):
    """How attention probabilities are represented and consumed.

    ``REL8``: ``shiftmax_rel`` probabilities relative to the row maximum (uint8 ``[0, 255]``), ``p @ v``
    as a u8 x s8 GEMM, then ``attn_normalize`` divides by the row sum (precise at any sequence length).
    ``SHIFTMAX8``: the I-ViT paper's Shiftmax, absolute probabilities in ``[0, 127]`` at ``2**-7`` (loses
    most of a flat row beyond ~50 tokens; kept for comparison and for older programs).
    """

    REL8 = "rel8"
    SHIFTMAX8 = "shiftmax8"


class LayerNormImpl(str, Enum):
    """``INT32``: ``ops.ilayernorm32`` (32-bit intermediates, exportable to TOSA and microcontrollers);
    ``INT64``: ``ops.ilayernorm``, the original with a 64-bit variance."""

    INT32 = "int32"
    INT64 = "int64"


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
        probs: attention probabilities (``Probs``); the default ``rel8`` keeps 8 bits relative to each
            row's maximum (measured in ``tests/test_ops.py`` and ``benchmarks/accuracy.py``).
        layernorm: I-LayerNorm arithmetic (``LayerNormImpl``).
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
    probs: Probs = Probs.REL8
    layernorm: LayerNormImpl = LayerNormImpl.INT32

    def __post_init__(self) -> None:
        for name, enum in (("probs", Probs), ("layernorm", LayerNormImpl)):
            v = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(v))
            except (ValueError, TypeError):
                choices = ", ".join(e.value for e in enum)
                raise IvitError(f"QuantConfig.{name} must be one of {choices}, got {v!r}") from None
        for f in fields(self):  # JSON gives any type: reject 16.5 bits or a string momentum up front
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind in ("Probs", "LayerNormImpl"):
                continue
            want = {"float": (int, float), "bool": (bool,)}.get(kind, (int,))
            if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
                raise IvitError(f"QuantConfig.{f.name} must be {kind}, got {v!r}")
        if self.act_bits != 8 or self.softmax_bits != 8:
            raise IvitError("act_bits and softmax_bits must be 8 (int8 GEMM inputs)")
        if not 9 <= self.residual_bits <= 16:
            raise IvitError("residual_bits must be in [9, 16] (I-LayerNorm reads int16)")
        if not 9 <= self.score_bits <= 24:
            raise IvitError("score_bits must be in [9, 24]")
        if not 8 <= self.gelu_sigmoid_bits <= 16:
            raise IvitError("gelu_sigmoid_bits must be in [8, 16]")
        if not 8 <= self.shiftmax_n_max <= 30 or not 8 <= self.shiftgelu_n_max <= 30:
            raise IvitError("ShiftExp n_max must be in [8, 30]")
        if not 0.0 <= self.momentum < 1.0:
            raise IvitError("momentum must be in [0, 1)")

    def to_json(self) -> str:
        d = asdict(self)
        d["probs"], d["layernorm"] = self.probs.value, self.layernorm.value
        return json.dumps(d, sort_keys=True)

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
