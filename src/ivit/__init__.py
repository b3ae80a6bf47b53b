"""ivit: integer-only Vision Transformers (I-ViT) - quantize, train, freeze and run integer programs.

Public API::

    model = ivit.create_model("deit_small_patch16_224")       # float timm model
    qmodel = ivit.quantize(model, ivit.QuantConfig())          # integer I-ViT model (trainable, STE)
    ivit.calibrate(qmodel, batches)                            # PTQ ranges (or train it: QAT)
    program = ivit.freeze(qmodel)                              # immutable integer program
    program.save("model.ivit"); engine = ivit.load("model.ivit")
    logits = engine(uint8_images)                              # int32 logits
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import calibrate, create_model, freeze_ranges, list_models, quantize
from .config import QuantConfig
from .engine import Engine, load, verify_integer_only
from .errors import IvitError
from .freeze import freeze
from .program import Program, load_program, save_program
from .qtensor import QTensor

__all__ = [
    "__version__",
    "QuantConfig",
    "QTensor",
    "IvitError",
    "create_model",
    "quantize",
    "calibrate",
    "freeze_ranges",
    "list_models",
    "freeze",
    "Program",
    "save_program",
    "load_program",
    "Engine",
    "load",
    "verify_integer_only",
]
