"""The public workflow: ``create_model`` -> ``quantize`` -> ``calibrate`` (PTQ) / train (QAT) -> ``freeze``.

    model = ivit.create_model("deit_small_patch16_224", pretrained=True)
    qmodel = ivit.quantize(model, ivit.QuantConfig())
    ivit.calibrate(qmodel, loader)             # running min/max of every activation
    program = ivit.freeze(qmodel)              # integer program
    program.save("deit_s.ivit"); engine = ivit.load("deit_s.ivit")
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import IvitError
from ..models import converter_for
from ..models.base import QModel
from ..nn import RangeObserver

__all__ = ["quantize", "calibrate", "freeze_ranges"]

def quantize(model: nn.Module, config: QuantConfig | None = None) -> QModel:
    """Convert a float timm model into an integer I-ViT ``QModel`` (weights copied).

    The result must be calibrated (``calibrate``) or trained (QAT, train mode) before eval or freeze.
    """
    if isinstance(model, QModel):
        return model
    config = config or QuantConfig()
    conv = converter_for(model)
    if conv is None:
        raise IvitError(f"cannot quantize {type(model).__name__}: not a supported timm model family "
                        "(see 'ivit models')")
    q = conv(model, config)
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if name:
        q.meta["name"] = name
    return q.to(next(model.parameters()).device)


def _images(batch: Any) -> Tensor:
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise IvitError("calibration batches must be uint8 tensors or (images, labels) pairs")
    return batch


def calibrate(qmodel: QModel, batches: Iterable[Any], max_batches: int | None = None,
              progress: bool = False) -> QModel:
    """Post-training calibration: run batches in train mode without gradients so that every
    observer records running min/max; leaves the model in eval mode.  Returns ``qmodel``."""
    from tqdm.auto import tqdm

    qmodel.train()
    n = 0
    device = next(qmodel.parameters()).device
    with torch.no_grad():
        it = tqdm(batches, desc="calibrate", disable=not progress, leave=False)
        for batch in it:
            qmodel(_images(batch).to(device))
            n += 1
            if max_batches is not None and n >= max_batches:
                break
    if n == 0:
        raise IvitError("no calibration data")
    qmodel.eval()
    return qmodel


def freeze_ranges(qmodel: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) the running min/max updates of every observer."""
    for m in qmodel.modules():
        if isinstance(m, RangeObserver):
            m.frozen.fill_(frozen)
