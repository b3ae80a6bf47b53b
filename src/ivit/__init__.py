"""ivit: integer-only Vision Transformers (I-ViT) - quantize, train, freeze and run integer programs.

Public API, step by step::

    model = ivit.create_model("deit_small_patch16_224")       # float timm model
    qmodel = ivit.quantize(model, ivit.QuantConfig())          # integer I-ViT model (trainable, STE)
    ivit.calibrate(qmodel, batches)                            # PTQ ranges (or ivit.ptq: with the search)
    program = ivit.freeze(qmodel)                              # immutable integer program (traced forward)
    program.save("model.ivit"); engine = ivit.load("model.ivit")
    logits = engine(uint8_images)                              # int32 logits

and as workflows (what the ``ivit`` commands run; every default in ``ivit.recipes``)::

    spec = ivit.ModelSpec("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7, "embed_dim": 96})
    ivit.run_train(ivit.TrainRun(spec, "fashion-mnist", "runs/float"))
    ivit.run_ptq(ivit.PTQRun(spec, "fashion-mnist", "vit.ivit", evaluate=True))
    ivit.run_qat(ivit.QATRun(spec, "fashion-mnist", "runs/qat"))
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
from .quant.ptq import SearchReport, ptq
from .training.trainer import FloatWrapper, TrainConfig, Trainer
from .verify import IntegerProof, verify_integer_only
from .workflows import (
    BenchResult,
    BenchRun,
    DemoResult,
    DemoRun,
    EvalResult,
    EvalRun,
    ModelSpec,
    PTQResult,
    PTQRun,
    QATResult,
    QATRun,
    TrainResult,
    TrainRun,
    recipes,
    run_bench,
    run_demo,
    run_eval,
    run_ptq,
    run_qat,
    run_train,
)

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
    "SearchReport",
    "TrainConfig",
    "Trainer",
    "FloatWrapper",
    "ModelSpec",
    "recipes",
    "TrainRun",
    "TrainResult",
    "run_train",
    "PTQRun",
    "PTQResult",
    "run_ptq",
    "QATRun",
    "QATResult",
    "run_qat",
    "EvalRun",
    "EvalResult",
    "run_eval",
    "BenchRun",
    "BenchResult",
    "run_bench",
    "DemoRun",
    "DemoResult",
    "run_demo",
]
