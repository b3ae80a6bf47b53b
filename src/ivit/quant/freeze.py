"""``freeze``: a calibrated or trained quantized model -> its immutable integer ``Program``.

The program is the model's own forward, traced (``ivit.ir.trace``): every integer op the forward
computes is recorded with its constants.  ``freeze`` then validates the program and checks, on random
pixels, that the reference interpreter reproduces the model's eval logits bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import IvitError
from ..ir import interpret
from ..ir.program import Program
from ..ir.trace import Tracer
from ..ir.validate import validate
from ..models.base import INPUT_NAME, QModel
from ..nn import NotCalibratedError

__all__ = ["freeze"]


def _pixels(model: QModel, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, model.in_chans, *model.img_size), dtype=torch.uint8, generator=g)


def freeze(model: QModel, name: str | None = None, extra_meta: dict[str, Any] | None = None,
           self_check: bool = True) -> Program:
    """Freeze a calibrated quantized model into an integer ``Program`` (the model is not modified).

    Args:
        model: an ivit ``QModel`` (calibrated, or trained with QAT).
        name: the model name recorded in the program's metadata (default: the model's).
        extra_meta: more JSON-able metadata.
        self_check: run the program with the reference interpreter on random pixels and require
            its logits to equal the model's eval logits (``torch.equal``).

    Raises ``IvitError`` if the model was never calibrated.
    """
    from .. import __version__

    if not isinstance(model, QModel):
        raise IvitError(f"freeze expects an ivit quantized model, got {type(model).__name__}")
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        x = _pixels(model, 1, 0).to(device)
        with torch.no_grad(), Tracer(model) as tracer:
            out = model(x)
    except NotCalibratedError as e:
        raise IvitError(str(e)) from None
    finally:
        model.train(was_training)
    if out.name is None or out.scale.numel() != 1:
        raise RuntimeError("the model's output was not traced, or has a per-channel scale")
    meta: dict[str, Any] = {
        "family": model.family,
        "model": name or model.meta.get("name", model.family),
        "input_shape": [model.in_chans, *model.img_size],
        "num_classes": model.num_classes,
        "logit_scale": float(out.scale),
        "arch": model.meta,
        "config": model.config.to_json(),
        "ivit_version": __version__,
        **(extra_meta or {}),
    }
    if model.num_classes == 0:  # a headless model returns its pooled embedding: scale for dequantization
        meta["embed_scale"] = float(out.scale)
    prog = Program(nodes=tracer.nodes, consts=tracer.consts, input=INPUT_NAME, output=out.name, meta=meta)
    info = validate(prog)
    if self_check:
        steps = interpret.plan(prog, info.types, prog.consts, {})
        was = model.training
        model.eval()
        try:
            for batch, seed in ((1, 0), (3, 1)):
                px = _pixels(model, batch, seed)
                got = interpret.run(prog, steps, px)
                want = model.logits(px.to(device)).cpu()
                if not torch.equal(got, want):
                    raise RuntimeError("freeze: the traced program disagrees with the model's forward "
                                       "(an integer op computed outside ivit.ir.trace.call?)")
        finally:
            model.train(was)
    return prog
