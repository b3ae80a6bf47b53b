"""Post-training quantization with a per-layer choice of the free parameters.

Plain calibration (``ivit.calibrate``) fixes every activation range at the running min/max and every
ShiftExp shift at ``QuantConfig``'s ``n_max``.  :func:`search` then visits the quantizers in forward
order and, greedily (each choice sees the choices made upstream), picks per layer:

* the clipping range ``amax`` of every observer (``QAct``, ``QLayerNorm``, ``QResidualAdd``,
  ``QEmbed``, and whatever other module owns a ``RangeObserver`` as ``.observer``) among
  ``running amax * clip_factors`` and the largest magnitude seen, minimizing the squared error of the
  module's dequantized output against the float signal its observer sees (the unclipped, unrounded
  value: e.g. the float LayerNorm of the integer input, or the sum of both residual branches);
* the ShiftExp ``n_max`` of every ``QShiftmax`` (error against the float softmax of the same
  integer scores) and ``QShiftGELU`` (error against the float GELU of the same input).

Before that, :func:`balance_layernorms` may rescale the channels of every LayerNorm that feeds a
linear layer (``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1``): ``gamma_c, beta_c /= s_c`` and
``W[:, c] *= s_c`` leave the float function unchanged but shrink the outlier channels that make a
per-tensor 8-bit LayerNorm output useless (the systematic post-LayerNorm outliers of DeiT-B / ViT-B).
``s_c = max(1, (r_c / median(r))**alpha)`` with ``r_c`` the channel's range on the calibration data;
``alpha`` in ``BALANCE_ALPHAS`` is chosen per layer by the error of the linear layer's output.

Choices are written where ``ivit.freeze`` reads them: the parameters themselves (balancing),
``observer.clip`` (a buffer, so checkpoints carry it) and the modules' ``n_max`` attribute.  Everything
runs in eval mode without gradients, in a fixed order, on fixed batches: the search is deterministic.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Probs
from ..errors import IvitError
from ..ir.opset import expand_window_mask
from ..models.base import QModel
from ..nn import QLayerNorm, QLinear, QShiftGELU, QShiftmax, RangeObserver
from ..qtensor import QTensor
from .api import _images, calibrate

__all__ = ["CLIP_FACTORS", "SHIFTMAX_N", "SHIFTGELU_N", "BALANCE_ALPHAS", "LayerChoice", "SearchReport", "search",
           "balance_layernorms", "reset_observers", "ptq"]

#: Candidate clipping ranges, as fractions of the running amax (the largest magnitude seen is added).
CLIP_FACTORS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
#: Candidate ShiftExp ``n_max`` for Shiftmax (the effective n is also bounded by the row-sum limit).
SHIFTMAX_N: tuple[int, ...] = (8, 10, 12, 14, 15, 16, 18, 20, 22, 24)
#: Candidate ShiftExp ``n_max`` for ShiftGELU.
SHIFTGELU_N: tuple[int, ...] = (10, 12, 14, 16, 18, 20, 23, 26, 30)
#: Candidate migration strengths of LayerNorm channel balancing (0: unchanged).
BALANCE_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class LayerChoice:
    """The value chosen for one free parameter: ``kind`` is ``"clip"`` (activation amax), ``"n"``
    (ShiftExp shift) or ``"balance"`` (LayerNorm channel-balancing strength ``alpha``)."""

    module: str
    kind: str
    default: float
    choice: float
    mse_default: float
    mse: float


@dataclass
class SearchReport:
    """All per-layer choices of one search, in forward order."""

    choices: list[LayerChoice] = field(default_factory=list)

    def changed(self) -> list[LayerChoice]:
        return [c for c in self.choices if c.choice != c.default]

    def summary(self) -> str:
        clips = [c for c in self.choices if c.kind == "clip"]
        ns = [c for c in self.choices if c.kind == "n"]
        bal = [c for c in self.choices if c.kind == "balance"]
        balanced = f"{sum(c.choice > 0 for c in bal)} of {len(bal)} LayerNorms balanced, " if bal else ""
        clipped = [c for c in clips if c.choice < c.default]
        widened = [c for c in clips if c.choice > c.default]
        n_changed = [c for c in ns if c.choice != c.default]
        gain = [c.mse_default / c.mse for c in self.choices if c.mse > 0 and c.choice != c.default]
        avg = f", median error reduction {sorted(gain)[len(gain) // 2]:.2f}x" if gain else ""
        return (f"PTQ search: {balanced}{len(clips)} activation ranges ({len(clipped)} clipped, "
                f"{len(widened)} widened), {len(ns)} ShiftExp shifts ({len(n_changed)} changed){avg}")

    def to_json(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.choices]


class _Stop(Exception):
    """Raised by a capture hook to cut a forward pass short."""


def _targets(model: QModel, x: Tensor) -> list[tuple[str, nn.Module]]:
    """Modules with a free parameter, in the order the forward pass first calls them."""
    named = [(n, m) for n, m in model.named_modules()
             if isinstance(getattr(m, "observer", None), RangeObserver) or isinstance(m, QShiftGELU)
             or (isinstance(m, QShiftmax) and m.probs == Probs.SHIFTMAX8)]
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
             for n, m in named]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    by_name = dict(named)
    return [(n, by_name[n]) for n in order]


def _segments(model: nn.Module) -> list[nn.Module]:
    """Sequential stages of the forward whose output the search can cache: the children of every ``blocks``
    ModuleList and Swin's ``downsample`` modules (each maps one tensor to the next)."""
    segs: list[nn.Module] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "blocks":
            segs.extend(m)
        elif name.rsplit(".", 1)[-1] == "downsample":
            segs.append(m)
    return segs


class _SegmentCache:
    """Outputs of the forward's segments that no remaining search step can change.

    The search visits quantizers in forward order, so once it reaches a quantizer, every segment that
    ended before that quantizer's first call is final: its output for each calibration batch is computed
    once, stored, and replayed (the segment's forward is bypassed) in every later partial forward.  This
    turns the search from quadratic into linear in the depth, with the same choices as without the cache.
    """

    def __init__(self, model: QModel, x: Tensor, targets: Sequence[nn.Module]) -> None:
        self.segments = _segments(model)
        events: list[tuple[str, int]] = []
        ids = {id(m): i for i, m in enumerate(self.segments)}
        tids = {id(m): i for i, m in enumerate(targets)}
        hooks = []
        for m in self.segments:
            hooks.append(m.register_forward_hook(lambda mod, a, o: events.append(("end", ids[id(mod)]))))
        for m in targets:
            hooks.append(m.register_forward_pre_hook(lambda mod, a: events.append(("start", tids[id(mod)]))))
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        #: segments finished before each target's first call
        self.before: dict[int, list[int]] = {}
        ended: list[int] = []
        for kind, i in events:
            if kind == "end" and i not in ended:
                ended.append(i)
            elif kind == "start" and i not in self.before:
                self.before[i] = list(ended)
        self.targets = {id(m): i for i, m in enumerate(targets)}
        self.outputs: dict[int, list[Any]] = {}

    @contextmanager
    def replay(self, target: nn.Module, batch: list[int]) -> Iterator[None]:
        """While active, segments final for ``target`` return their stored output of batch ``batch[0]``
        (outputs not stored yet are recorded)."""
        final = self.before.get(self.targets.get(id(target), -1), [])
        hooks = []
        patched: list[nn.Module] = []
        for i in final:
            seg = self.segments[i]
            if i in self.outputs:
                store = self.outputs[i]
                seg.forward = lambda *a, _s=store, **k: _s[batch[0]]  # instance attribute shadows the method
                patched.append(seg)
            else:
                rec: list[Any] = []
                self.outputs[i] = rec
                hooks.append(seg.register_forward_hook(lambda mod, a, o, _r=rec: _r.append(o)))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for seg in patched:
                del seg.forward


def _capture(model: QModel, module: nn.Module, batches: Sequence[Tensor],
             cache: _SegmentCache | None = None) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of ``module``'s first call for every batch (forward stopped right there)."""
    store: list[tuple[tuple, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        store.append((args, kwargs))
        raise _Stop

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    batch = [0]
    try:
        with cache.replay(module, batch) if cache is not None else contextlib.nullcontext():
            for i, x in enumerate(batches):
                batch[0] = i
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        h.remove()
    if cache is not None:  # a segment recorded but cut short (the stop fired inside it) is not final
        for i, outs in list(cache.outputs.items()):
            if len(outs) != len(batches):
                del cache.outputs[i]
    return store


@contextmanager
def _tap(obs: RangeObserver) -> Iterator[list[Tensor]]:
    """Record the float signal the observer would observe (without updating its range)."""
    seen: list[Tensor] = []
    training, frozen = obs.training, obs.frozen.clone()
    obs.observe = lambda x: seen.append(x.detach().to(torch.float32))  # instance attribute shadows the method
    obs.training = True
    obs.frozen.fill_(False)
    try:
        yield seen
    finally:
        del obs.observe
        obs.training = training
        obs.frozen.copy_(frozen)


def _sq_err(out: Any, ref: Tensor) -> float | None:
    if not isinstance(out, QTensor) or tuple(out.q.shape) != tuple(ref.shape):
        return None
    d = out.dequantize().to(torch.float64) - ref.to(torch.float64)
    return float((d * d).sum())


def _search_clip(module: nn.Module, inputs: list[tuple[tuple, dict]], factors: Sequence[float]) -> LayerChoice | None:
    obs: RangeObserver = module.observer
    refs: list[Tensor] = []
    for args, kwargs in inputs:
        with _tap(obs) as seen:
            module(*args, **kwargs)
        if not seen:
            return None
        refs.append(seen[0])
    old_clip = float(obs.clip)
    obs.clip.zero_()
    base = float(obs.amax())
    seen_max = max(float(r.abs().max()) for r in refs)
    cands = [base * f for f in factors]
    if seen_max > 0 and all(not math.isclose(seen_max, c, rel_tol=1e-9) for c in cands):
        cands.insert(1, seen_max)
    cands = [c for c in cands if c > 0]
    errs: list[float] = []
    for c in cands:
        obs.clip.fill_(c if c != base else 0.0)
        total = 0.0
        for (args, kwargs), ref in zip(inputs, refs, strict=True):
            e = _sq_err(module(*args, **kwargs), ref)
            if e is None:
                obs.clip.fill_(old_clip)
                return None
            total += e
        errs.append(total)
    best = min(range(len(cands)), key=lambda i: (errs[i], i))  # ties keep the earlier (default first)
    obs.clip.fill_(cands[best] if best != 0 else 0.0)
    numel = sum(r.numel() for r in refs)
    return LayerChoice("", "clip", base, cands[best], errs[0] / numel, errs[best] / numel)


def _search_n(module: QShiftmax | QShiftGELU, inputs: list[tuple[tuple, dict]], cands: Sequence[int]) -> LayerChoice:
    refs: list[Tensor] = []
    for args, kwargs in inputs:
        x: QTensor = args[0]
        v = x.dequantize()
        if isinstance(module, QShiftmax):  # output: softmax(scores) @ values
            values: QTensor = args[1] if len(args) > 1 else kwargs["v"]
            mask = args[2] if len(args) > 2 else kwargs.get("mask")
            if mask is not None:
                v = v.masked_fill(expand_window_mask(mask, v.shape), float("-inf"))
            refs.append(torch.softmax(v, dim=-1).nan_to_num(0.0) @ values.dequantize())
        else:
            refs.append(F.gelu(v))
    default = int(module.n_max)
    order = [default] + [n for n in cands if n != default]
    errs: list[float] = []
    effective: dict[int, float] = {}
    for n in order:
        module.n_max = n
        args0 = inputs[0][0]
        if isinstance(module, QShiftmax):
            eff = module.consts(args0[0].scale, args0[0].q.shape[-1])[1]
        else:
            eff = module.consts(args0[0].scale)[1]
        if eff in effective:  # same effective shift as an earlier candidate: same outputs
            errs.append(effective[eff])
            continue
        total = 0.0
        for (args, kwargs), ref in zip(inputs, refs, strict=True):
            total += _sq_err(module(*args, **kwargs), ref) or 0.0
        effective[eff] = total
        errs.append(total)
    best = min(range(len(order)), key=lambda i: (errs[i], i))
    module.n_max = order[best]
    numel = sum(r.numel() for r in refs)
    return LayerChoice("", "n", default, order[best], errs[0] / numel, errs[best] / numel)


def reset_observers(qmodel: nn.Module) -> None:
    """Forget every observed range and clip (before a fresh calibration)."""
    for m in qmodel.modules():
        if isinstance(m, RangeObserver):
            m.running_min.zero_()
            m.running_max.zero_()
            m.initialized.fill_(False)
            m.clip.zero_()


def _norm_linear_pairs(qmodel: nn.Module) -> list[tuple[str, QLayerNorm, QLinear]]:
    pairs = []
    for name, m in qmodel.named_modules():
        for norm_attr, lin_path in (("norm1", ("attn", "qkv")), ("norm2", ("mlp", "fc1"))):
            norm = getattr(m, norm_attr, None)
            lin = getattr(getattr(m, lin_path[0], None), lin_path[1], None)
            if isinstance(norm, QLayerNorm) and type(lin) is QLinear:
                pairs.append((f"{name}.{norm_attr}" if name else norm_attr, norm, lin))
    return pairs


def balance_layernorms(qmodel: QModel, batches: Iterable[Any], alphas: Sequence[float] = BALANCE_ALPHAS,
                       progress: bool = False) -> SearchReport:
    """Rescale the channels of every LayerNorm feeding a linear layer (float function unchanged; see the
    module doc), choosing ``alpha`` per layer by the squared error of the linear layer's output against
    the float ``linear(LayerNorm(x))``.  ``qmodel`` must be calibrated; afterwards its LayerNorm ranges
    are stale: :func:`ptq` re-calibrates."""
    from tqdm.auto import tqdm

    device = next(qmodel.parameters()).device
    xs = [_images(b).to(device) for b in batches]
    report = SearchReport()
    qmodel.eval()
    pairs = _norm_linear_pairs(qmodel)
    with torch.no_grad():
        cache = _SegmentCache(qmodel, xs[0], [norm for _, norm, _ in pairs]) if xs else None
        for name, norm, lin in tqdm(pairs, desc="ptq balance", disable=not progress, leave=False):
            inputs = _capture(qmodel, norm, xs, cache)
            if not inputs:
                continue
            refs = []
            for args, kwargs in inputs:
                with _tap(norm.observer) as seen:
                    norm(*args, **kwargs)
                refs.append(seen[0])
            r = torch.stack([t.abs().reshape(-1, t.shape[-1]).amax(0) for t in refs]).amax(0).to(torch.float64)
            r = r.clamp(min=1e-8)
            ratio = r / r.median()
            w0, b0 = lin.weight.detach().clone(), norm.weight.detach().clone()
            beta0 = norm.bias.detach().clone()
            targets = [F.linear(t, w0.to(t.dtype), None if lin.bias is None else lin.bias.to(t.dtype)) for t in refs]
            old_clip = float(norm.observer.clip)
            errs: list[float] = []
            for alpha in alphas:
                sc = ratio.pow(alpha).clamp(min=1.0).to(w0.dtype)
                norm.weight.copy_(b0 / sc)
                norm.bias.copy_(beta0 / sc)
                lin.weight.copy_(w0 * sc)
                norm.observer.clip.fill_(max(float((t / sc).abs().max()) for t in refs))
                total = 0.0
                for (args, kwargs), tgt in zip(inputs, targets, strict=True):
                    out = lin(norm(*args, **kwargs))
                    d = out.dequantize().to(torch.float64) - tgt.to(torch.float64)
                    total += float((d * d).sum())
                errs.append(total)
            best = min(range(len(alphas)), key=lambda i: (errs[i], i))
            sc = ratio.pow(alphas[best]).clamp(min=1.0).to(w0.dtype)
            norm.weight.copy_(b0 / sc)
            norm.bias.copy_(beta0 / sc)
            lin.weight.copy_(w0 * sc)
            norm.observer.clip.fill_(old_clip)
            numel = sum(t.numel() for t in targets)
            report.choices.append(LayerChoice(name, "balance", 0.0, float(alphas[best]), errs[0] / numel,
                                              errs[best] / numel))
    return report


def search(qmodel: QModel, batches: Iterable[Any], clip_factors: Sequence[float] = CLIP_FACTORS,
           shiftmax_n: Sequence[int] = SHIFTMAX_N, shiftgelu_n: Sequence[int] = SHIFTGELU_N,
           progress: bool = False) -> SearchReport:
    """Choose every layer's clipping range and ShiftExp shift on calibration ``batches`` (see module doc).

    ``qmodel`` must be calibrated; it is left in eval mode with the choices applied.  Pass few batches
    (a few hundred images): every quantizer costs a partial forward pass over all of them.
    """
    from tqdm.auto import tqdm

    if not isinstance(qmodel, QModel):
        raise IvitError(f"search expects an ivit quantized model, got {type(qmodel).__name__}")
    device = next(qmodel.parameters()).device
    xs = [_images(b).to(device) for b in batches]
    if not xs:
        raise IvitError("no calibration data for the PTQ search")
    qmodel.eval()
    report = SearchReport()
    with torch.no_grad():
        targets = _targets(qmodel, xs[0])
        cache = _SegmentCache(qmodel, xs[0], [m for _, m in targets])
        for name, module in tqdm(targets, desc="ptq search", disable=not progress, leave=False):
            inputs = _capture(qmodel, module, xs, cache)
            if not inputs:
                continue
            if isinstance(module, (QShiftmax, QShiftGELU)):
                choice: LayerChoice | None = _search_n(module, inputs,
                                                       shiftmax_n if isinstance(module, QShiftmax) else shiftgelu_n)
            else:
                choice = _search_clip(module, inputs, clip_factors)
            if choice is not None:
                choice.module = name
                report.choices.append(choice)
    return report


def ptq(qmodel: QModel, batches: Iterable[Any], search_params: bool = True, search_batches: int | None = None,
        balance: bool = True, progress: bool = False) -> SearchReport | None:
    """Post-training quantization: calibrate on ``batches``; with ``search_params``, balance the
    LayerNorm channels (``balance``), re-calibrate, then :func:`search` clipping ranges and shifts, both on
    the first ``search_batches`` batches (all when None).  Returns the report (None without search)."""
    xs = [_images(b) for b in batches]
    calibrate(qmodel, xs, progress=progress)
    if not search_params:
        return None
    few = xs[:search_batches] if search_batches else xs
    report = SearchReport()
    if balance:
        report = balance_layernorms(qmodel, few, progress=progress)
        if any(c.choice > 0 for c in report.choices):
            reset_observers(qmodel)
            calibrate(qmodel, xs, progress=progress)
    report.choices += search(qmodel, few, progress=progress).choices
    return report
