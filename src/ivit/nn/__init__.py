"""Quantized modules: each forward computes exact integer ops of the op set (``ivit.ir.trace.call``).

The integer path is the same in training and in eval; in training (grad enabled) each output also
carries a float value whose gradient is the float surrogate's (straight-through estimator,
``ivit.qtensor.carry``).  Activation ranges come from ``RangeObserver`` (running min/max, EMA
momentum 0.95), which updates only in training mode (calibration and QAT) and never once frozen.
"""

from .act import QAct
from .attention import QAttention
from .embed import QEmbed
from .gelu import QShiftGELU
from .linear import QLinear, QPatchEmbed
from .mlp import QMlp
from .norm import QLayerNorm
from .observers import NotCalibratedError, RangeObserver
from .residual import QResidualAdd
from .softmax import QShiftmax

__all__ = ["QAct", "QAttention", "QEmbed", "QShiftGELU", "QLinear", "QPatchEmbed", "QMlp", "QLayerNorm",
           "NotCalibratedError", "RangeObserver", "QResidualAdd", "QShiftmax"]
