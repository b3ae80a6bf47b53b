"""Training and evaluation loops: float training, QAT of the integer model, accuracy of each form.

Datasets yield uint8 images; the float model sees ``(x / 255 - mean) / std`` (``normalize``), the
integer model and engine see the uint8 pixels themselves (normalization is folded in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .models.base import QModel

__all__ = ["normalize", "FloatWrapper", "TrainConfig", "train", "evaluate", "predict_int", "cosine_lr"]


def normalize(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 ``(B, C, H, W)`` -> float ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - m) / s


class FloatWrapper(nn.Module):
    """A float timm model that takes uint8 pixels (normalizing with its pretrained_cfg mean/std)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(normalize(pixels, self.mean, self.std))


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, min_ratio: float = 0.01) -> float:
    """Linear warmup then cosine decay to ``min_ratio * base``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class TrainConfig:
    """Optimizer/schedule settings (AdamW + cosine, label smoothing, optional distillation)."""

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    distill_alpha: float = 0.0  # weight of the KL term to the teacher's soft labels
    distill_tau: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(model, QModel):
        if out.value is None:
            return out.dequantize()
        return out.value
    return out


def train(model: nn.Module, loader: DataLoader, cfg: TrainConfig, teacher: nn.Module | None = None,
          progress: bool = True, desc: str = "train",
          on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` (float ``FloatWrapper`` or integer ``QModel``: QAT with STE) on uint8 batches.

    Returns the mean training loss per epoch.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    device = next(model.parameters()).device
    losses: list[float] = []
    step = 0
    if teacher is not None:
        teacher.eval()
    for epoch in range(cfg.epochs):
        model.train()
        running, count = 0.0, 0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, cfg.lr, warmup)
            logits = _logits(model, x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if teacher is not None and cfg.distill_alpha > 0:
                with torch.no_grad():
                    t_logits = teacher(x)
                tau = cfg.distill_tau
                kl = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                              reduction="batchmean", log_target=True) * tau * tau
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            running += loss.item() * x.shape[0]
            count += x.shape[0]
            bar.set_postfix(loss=f"{running / count:.3f}")
        losses.append(running / max(1, count))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]],
             topk: tuple[int, ...] = (1, 5), progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Top-k accuracy (fractions) of ``predict(uint8 images) -> logits`` over ``(images, labels)`` batches."""
    from tqdm.auto import tqdm

    correct = {k: 0 for k in topk}
    n = 0
    for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False):
        logits = predict(x)
        for k in topk:
            kk = min(k, logits.shape[-1])
            top = logits.topk(kk, dim=-1).indices
            correct[k] += int((top == y.view(-1, 1)).any(dim=-1).sum())
        n += y.shape[0]
    return {f"top{k}": correct[k] / max(1, n) for k in topk} | {"n": n}


def predict_int(qmodel: QModel) -> Callable[[Tensor], Tensor]:
    """The integer model's eval forward as a ``predict`` function (int32 logits)."""
    def fn(x: Tensor) -> Tensor:
        qmodel.eval()
        return qmodel.logits(x.to(next(qmodel.parameters()).device))
    return fn


def loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)
