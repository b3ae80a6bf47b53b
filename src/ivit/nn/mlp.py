"""``QMlp``: fc1 -> int8 -> ShiftGELU -> int8 -> fc2."""

from __future__ import annotations

from torch import nn

from ..config import QuantConfig
from ..qtensor import QTensor
from .act import QAct
from .gelu import QShiftGELU
from .linear import QLinear

__all__ = ["QMlp"]


class QMlp(nn.Module):
    """fc1 (int32) -> ``act_in`` int8 -> ShiftGELU int32 -> ``act_out`` int8 -> fc2 (int32 accumulator out)."""

    def __init__(self, dim: int, hidden: int, cfg: QuantConfig, quick_gelu: bool = False) -> None:
        super().__init__()
        pc = cfg.per_channel_weights
        self.fc1 = QLinear(dim, hidden, True, pc)
        self.act_in = QAct(cfg.act_bits, cfg.momentum)
        self.gelu = QShiftGELU(cfg.gelu_sigmoid_bits, cfg.shiftgelu_n_max, quick_gelu)
        self.act_out = QAct(cfg.act_bits, cfg.momentum)
        self.fc2 = QLinear(hidden, dim, True, pc)

    def forward(self, x: QTensor) -> QTensor:
        return self.fc2(self.act_out(self.gelu(self.act_in(self.fc1(x)))))
