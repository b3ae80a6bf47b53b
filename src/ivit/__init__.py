"""ivit: integer-only Vision Transformers (I-ViT) - quantize, train, freeze and run integer programs.

Public API::

    model = ivit.create_model("deit_small_patch16_224")       # float timm model
    qmodel = ivit.quantize(model, ivit.QuantConfig())          # integer I-ViT model (trainable, STE)
    ivit.calibrate(qmodel, batches)                            # PTQ ranges (or ivit.ptq: with the search)
    program = ivit.freeze(qmodel)                              # immutable integer program (traced forward)
    program.save("model.ivit"); engine = ivit.load("model.ivit")
    logits = engine(uint8_images)                              # int32 logits
"""

from __future__ import annotations

__version__ = "0.2.0"

from .backends import Engine, load
from .config import LayerNormImpl, Probs, QuantConfig
from .errors import IvitError
from .ir import Limits, Program, ProgramError, load_program, save_program
from .models import create_model, list_models
from .qtensor import QTensor
from .quant import calibrate, freeze, freeze_ranges, quantize
from .quant.ptq import ptq
from .verify import IntegerProof, verify_integer_only

__all__ = [
    "__version__",
    "QuantConfig",
    "Probs",
    "LayerNormImpl",
    "QTensor",
    "IvitError",
    "ProgramError",
    "Limits",
    "create_model",
    "list_models",
    "quantize",
    "calibrate",
    "ptq",
    "freeze_ranges",
    "freeze",
    "Program",
    "save_program",
    "load_program",
    "Engine",
    "load",
    "verify_integer_only",
    "IntegerProof",
]
