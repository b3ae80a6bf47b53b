"""The training loop (float training and QAT of the integer model) and accuracy of each form.

Datasets yield uint8 images; the float model sees ``(x / 255 - mean) / std`` (``normalize``), the
integer model and engine see the uint8 pixels themselves (normalization is folded in).

``Trainer`` is the one training loop (behind ``ivit train`` / ``ivit qat``, the demo and the benchmarks):
checkpoints (``ivit.training.checkpoint``) every N steps and epoch, exact resume, per-epoch logs and
plot (``ivit.training.runlog``), and ``DistributedDataParallel`` under ``torchrun``
(``ivit.training.distributed``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..errors import IvitError
from ..models.base import QModel
from ..models.factory import normalization
from . import distributed as D

__all__ = ["normalize", "FloatWrapper", "TrainConfig", "evaluate", "predict_int", "cosine_lr",
           "make_optimizer", "LogitsModule", "EpochSampler", "Trainer", "CHECKPOINT_NAME", "evaluate_dataset"]


def normalize(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 ``(B, C, H, W)`` -> float ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - m) / s


class FloatWrapper(nn.Module):
    """A float timm model that takes uint8 pixels (normalizing with its pretrained_cfg mean/std, see
    ``ivit.models.factory.normalization``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = normalization(model)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(normalize(pixels, self.mean, self.std))


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, min_ratio: float = 0.01) -> float:
    """Linear warmup then cosine decay to ``min_ratio * base``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule of a training run: AdamW (weight decay on matrices only), linear warmup then
    cosine decay per step, label-smoothed cross entropy, optional distillation, gradient clipping.

    The defaults are the float-training recipe (``ivit.workflows.recipes.FLOAT_TRAINING``: small models
    trained from scratch); ``recipes.QAT_TRAINING`` is the I-ViT paper's QAT recipe.

    Attributes:
        epochs: passes over the training set (>= 1).
        lr: peak learning rate.
        weight_decay: AdamW weight decay of the weight matrices (biases, norms: none).
        batch_size: images per step and process.
        warmup_epochs: linear warmup length (fractions allowed).
        label_smoothing: in ``[0, 1)``.
        distill_alpha: weight in ``[0, 1]`` of the KL term to a teacher's soft labels (0: no distillation).
        distill_tau: distillation temperature (> 0).
        grad_clip: max gradient norm (0: off).
        seed: data order and augmentation seed.
        min_lr_ratio: the cosine schedule ends at ``min_lr_ratio * lr``.
    """

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    distill_alpha: float = 0.0
    distill_tau: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    min_lr_ratio: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            ok = (isinstance(v, int) if kind == "int" else isinstance(v, (int, float)) and math.isfinite(v))
            if not ok or isinstance(v, bool):
                raise IvitError(f"TrainConfig.{f.name} must be a finite {kind}, got {v!r}")
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.distill_alpha <= 1, "distill_alpha must be in [0, 1]"),
            (self.distill_tau > 0, "distill_tau must be > 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0: off)"),
            (0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise IvitError(f"TrainConfig.{msg}")


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (no decay on biases, norms, embeddings' 1-D params)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(model, QModel):
        if out.value is None:
            return out.dequantize()
        return out.value
    return out


def _loss(logits: Tensor, y: Tensor, x: Tensor, cfg: TrainConfig, teacher: nn.Module | None) -> Tensor:
    """Label-smoothed cross entropy, mixed with the KL divergence to the teacher's soft labels."""
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher is not None and cfg.distill_alpha > 0:
        with torch.no_grad():
            t_logits = teacher(x)
        tau = cfg.distill_tau
        kl = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                      reduction="batchmean", log_target=True) * tau * tau
        loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kl
    return loss


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


# ---------------------------------------------------------------------------------------------
# Resumable, distributed training runs

#: File name of the rolling training checkpoint inside a run's output folder.
CHECKPOINT_NAME = "checkpoint.safetensors"
#: ``accuracy.png`` is redrawn after an epoch when this many seconds have passed since the last drawing, and
#: always after the last epoch (``log.jsonl`` / ``log.csv`` are rewritten after every epoch).
PLOT_SECONDS = 30.0


class LogitsModule(nn.Module):
    """Tensor-in, tensor-out view of a model (``DistributedDataParallel`` needs tensor outputs; a
    ``QModel`` returns a ``QTensor``): float logits of a float model, the STE carrier of a ``QModel``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return _logits(self.model, x)


class EpochSampler(Sampler[int]):
    """Reproducible, shardable, resumable order of one epoch.

    The order of epoch ``e`` is ``randperm(n, seed + e)`` (``arange(n)`` without shuffle), cut to
    ``world_size * (n // world_size)`` indices, of which rank ``r`` takes every ``world_size``-th from
    ``r``, keeping whole batches only (every rank runs the same number of steps).  ``set_epoch(e,
    skip)`` drops the first ``skip`` batches: a resumed run continues in the same order.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0

    @property
    def batches_per_epoch(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        per_rank = self.n // self.world_size
        mine = order[: per_rank * self.world_size][self.rank:: self.world_size]
        return iter(mine[self.skip * self.batch_size: self.batches_per_epoch * self.batch_size].tolist())

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip) * self.batch_size


def _fingerprint(model: nn.Module) -> list[float]:
    """Per-parameter float64 sums: equal on every rank iff (almost surely) the weights are equal."""
    with torch.no_grad():
        return [float(p.detach().to(torch.float64).sum()) + float(p.detach().to(torch.float64).abs().sum())
                for p in model.parameters()]


def evaluate_dataset(model: nn.Module, ds: Dataset, batch_size: int = 128, num_workers: int = 0,
                     progress: bool = False) -> dict[str, float]:
    """Top-1/top-5 of ``model`` on ``ds``, sharded over ranks under torchrun (counts summed).

    Keys ``int_top1``/``int_top5`` for a ``QModel`` (its integer eval path, int32 logits) and
    ``float_top1``/``float_top5`` otherwise (a model taking uint8 pixels, e.g. ``FloatWrapper``).
    """
    rank, world = D.rank(), D.world_size()
    device = next(model.parameters()).device
    model.eval()
    if world > 1:
        ds = Subset(ds, range(rank, len(ds), world))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if isinstance(model, QModel):
        prefix, int_logits = "int", predict_int(model)

        def predict(x: Tensor) -> Tensor:
            return int_logits(x).cpu()
    else:
        prefix = "float"

        def predict(x: Tensor) -> Tensor:
            return model(x.to(device)).cpu()
    show = progress and rank == 0
    res = evaluate(predict, loader, progress=show, desc=f"eval {prefix}") if len(ds) else {"top1": 0.0, "top5": 0.0,
                                                                                             "n": 0}
    n = res["n"]
    c1, c5, n = D.all_reduce_sum([round(res["top1"] * n), round(res["top5"] * n), float(n)])
    return {f"{prefix}_top1": c1 / max(1.0, n), f"{prefix}_top5": c5 / max(1.0, n)}


class Trainer:
    """A resumable training run of a float model (``FloatWrapper``) or of an integer ``QModel`` (QAT).

    AdamW + linear warmup + cosine decay per step, label smoothing, optional distillation from a float
    ``teacher``, gradient clipping.  Under ``torchrun`` the model is wrapped in
    ``DistributedDataParallel`` (buffers, i.e. observer ranges, follow rank 0) and the data is sharded
    by :class:`EpochSampler`; metrics are averaged over ranks and only rank 0 writes files.

    With ``out_dir`` the run writes ``out_dir/checkpoint.safetensors`` (see ``ivit.training.checkpoint``)
    every ``save_every`` steps and after every epoch, ``log.jsonl`` / ``log.csv`` after every epoch and
    ``accuracy.png`` at most every ``PLOT_SECONDS`` and after the last epoch.  ``fit(resume=path)``
    restores model, observers, optimizer, schedule position, data position and random states, so that
    (with ``num_workers=0``) a run killed at any moment and resumed ends with exactly the weights of an
    uninterrupted run.

    Args:
        model: a ``FloatWrapper`` or a calibrated ``QModel``, already on its device.
        train_ds: dataset of ``(uint8 image, label)``; its ``transform`` is the augmentation.
        cfg: optimizer/schedule settings (``batch_size`` is per process).
        eval_ds: held-out dataset evaluated after each epoch (``float_top1`` / ``int_top1``).
        teacher: float model (uint8 in, logits out) for distillation when ``cfg.distill_alpha > 0``.
        out_dir: folder for the checkpoint and logs (must exist); None: no files.
        save_every: also checkpoint every this many steps (0: only at epoch ends).
        identity: JSON-able description of the run (model name, architecture, ``QuantConfig``); a
            checkpoint with another identity is refused with one ``IvitError`` line.
        history: records to start the history with (e.g. the epoch-0 baselines of a QAT run).
        progress: tqdm bars for epochs and steps (rank 0 only).
        num_workers: data loader workers (exact resume needs 0).
        eval_batch_size: batch size of evaluation (default ``2 * batch_size``).
        desc: label of the progress bars.
        title: title of the accuracy plot.
        on_step: called after every step (and after a step checkpoint) with the trainer.
    """

    def __init__(self, model: nn.Module, train_ds: Dataset, cfg: TrainConfig, *, eval_ds: Dataset | None = None,
                 teacher: nn.Module | None = None, out_dir: str | Path | None = None, save_every: int = 0,
                 identity: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
                 progress: bool = True, num_workers: int = 0, eval_batch_size: int | None = None,
                 desc: str = "train", title: str = "", on_step: Callable[[Trainer], None] | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.rank, self.world = D.rank(), D.world_size()
        self.eval_ds = eval_ds
        self.teacher = teacher
        self.out_dir = None if out_dir is None else Path(out_dir)
        if self.out_dir is not None and not self.out_dir.is_dir():
            raise IvitError(f"output folder does not exist: {self.out_dir}")
        if self.out_dir is not None and D.rank() == 0:  # a save torn by a crash leaves a temporary file
            for stale in self.out_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):
                stale.unlink(missing_ok=True)
        if save_every < 0:
            raise IvitError("--save-every must be >= 0")
        self.save_every = save_every
        kind = "qat" if isinstance(model, QModel) else "float"
        self.identity = {"kind": kind, "model_class": type(model).__name__, **(identity or {})}
        self.history: list[dict[str, Any]] = list(history or [])
        self.progress = progress
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size or 2 * cfg.batch_size
        self.desc = desc
        self.title = title
        self._last_plot = 0.0  # time of the last accuracy.png (plotting costs ~0.2 s: at most every PLOT_SECONDS)
        self.on_step = on_step

        self.sampler = EpochSampler(len(train_ds), cfg.batch_size, True, cfg.seed, self.rank, self.world)
        if self.sampler.batches_per_epoch < 1:
            raise IvitError(f"the training set ({len(train_ds)} images over {self.world} process(es)) is "
                            f"smaller than one batch of {cfg.batch_size}")
        # its own generator, so creating an epoch's iterator never draws from the global RNG
        self._loader_gen = torch.Generator()
        self.loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=self.sampler,
                                 num_workers=num_workers, generator=self._loader_gen,
                                 pin_memory=self.device.type == "cuda")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, cfg)
        net: nn.Module = LogitsModule(model)
        if D.is_distributed():
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # buffers (observer ranges) follow rank 0 at every forward; the keyword was renamed in torch 2.14
            sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else "broadcast_buffers")
            net = DDP(net, device_ids=[self.device] if self.device.type == "cuda" else None, **{sync: True})
        self.net = net

        self.epoch = 0  # finished epochs
        self.step = 0  # optimizer steps done (global position in the schedule)
        self.step_in_epoch = 0
        self.loss_sum = 0.0  # this rank's running loss of the current epoch
        self.loss_count = 0
        self.epoch_time = 0.0

    # -- schedule -------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def lr_at(self, step: int) -> float:
        total = self.cfg.epochs * self.steps_per_epoch
        warmup = int(self.cfg.warmup_epochs * self.steps_per_epoch)
        return cosine_lr(step, total, self.cfg.lr, warmup, self.cfg.min_lr_ratio)

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_NAME

    # -- training -------------------------------------------------------------------------------

    def train_step(self, x: Tensor, y: Tensor) -> float:
        """One optimizer step at the scheduled learning rate; returns the batch loss."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = _loss(self.net(x), y, x, self.cfg, self.teacher)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        return float(loss.detach())

    def fit(self, resume: str | Path | None = None) -> list[dict[str, Any]]:
        """Train up to ``cfg.epochs`` (continuing from checkpoint ``resume`` if given); returns the history."""
        from tqdm.auto import tqdm

        if resume is not None:
            self.load(resume)
        cfg = self.cfg
        show = self.progress and self.rank == 0
        if self.teacher is not None:
            self.teacher.eval()
        ebar = tqdm(total=cfg.epochs, initial=self.epoch, desc=self.desc, unit="epoch", disable=not show)
        while self.epoch < cfg.epochs:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            self._loader_gen.manual_seed(cfg.seed * 100_003 + self.epoch)
            self.model.train()
            sbar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False, unit="step",
                        desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not show)
            t0 = time.time()
            for x, y in self.loader:
                loss = self.train_step(x, y)
                self.step += 1
                self.step_in_epoch += 1
                self.loss_sum += loss * y.shape[0]
                self.loss_count += int(y.shape[0])
                sbar.update(1)
                sbar.set_postfix(loss=f"{self.loss_sum / self.loss_count:.4f}", lr=f"{self.lr_at(self.step - 1):.2e}")
                if self.save_every and self.step % self.save_every == 0 and self.step_in_epoch < self.steps_per_epoch:
                    self.epoch_time += time.time() - t0
                    t0 = time.time()
                    self.save()
                if self.on_step is not None:
                    self.on_step(self)
            sbar.close()
            self.epoch_time += time.time() - t0
            rec = self._end_epoch()
            ebar.update(1)
            ebar.set_postfix({k: (f"{v * 100:.2f}%" if k.endswith("top1") else f"{v:.4f}") for k, v in rec.items()
                              if k.endswith("top1") or k == "loss"})
        ebar.close()
        self.model.eval()
        return self.history

    def _end_epoch(self) -> dict[str, Any]:
        D.broadcast_buffers(self.model)  # every rank keeps rank 0's observer ranges
        loss_sum, count = D.all_reduce_sum([self.loss_sum, float(self.loss_count)])
        rec: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, "lr": self.lr_at(self.step - 1),
                               "loss": loss_sum / max(1.0, count)}
        if not math.isfinite(rec["loss"]):
            raise IvitError(f"training diverged in epoch {self.epoch + 1} (loss {rec['loss']}); lower --lr "
                            "(the last checkpoint is kept)")
        rec.update(self.evaluate())
        rec["time"] = round(self.epoch_time, 3)
        if self.world > 1:
            prints = D.all_gather_objects(_fingerprint(self.model))
            rec["world_size"] = self.world
            rec["ranks_in_sync"] = all(p == prints[0] for p in prints)
            if not rec["ranks_in_sync"]:
                warnings.warn("model weights differ between ranks", RuntimeWarning, stacklevel=2)
        self.history.append(rec)
        self.epoch += 1
        self.step_in_epoch = 0
        self.loss_sum, self.loss_count, self.epoch_time = 0.0, 0, 0.0
        self.save()
        if self.out_dir is not None and self.rank == 0:
            from .runlog import write_logs

            plot = self.epoch >= self.cfg.epochs or time.time() - self._last_plot >= PLOT_SECONDS
            write_logs(self.out_dir, self.history, self.title, plot=plot)
            if plot:
                self._last_plot = time.time()
        return rec

    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 of the model on ``eval_ds`` (see :func:`evaluate_dataset`)."""
        if self.eval_ds is None:
            return {}
        return evaluate_dataset(self.model, self.eval_ds, self.eval_batch_size, self.num_workers)

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write the checkpoint (collective under torchrun: every rank must call it; rank 0 writes)."""
        from .checkpoint import module_attrs, pack_optimizer, rng_state, save_checkpoint

        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            return None
        rng_t, rng_info = rng_state()
        mine = {"rng_t": rng_t, "rng": rng_info, "loss": [self.loss_sum, self.loss_count]}
        ranks = D.all_gather_objects(mine)
        if self.rank != 0:
            return None
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        opt_t, opt_info = pack_optimizer(self.opt)
        tensors.update({f"optim/{k}": v for k, v in opt_t.items()})
        for r, st in enumerate(ranks):
            tensors.update({f"rng/{r}/{k}": v for k, v in st["rng_t"].items()})
        meta = {
            "identity": self.identity,
            "train_config": asdict(self.cfg),
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world,
            "epoch_time": self.epoch_time,
            "optimizer": opt_info,
            "rng": [st["rng"] for st in ranks],
            "loss": [st["loss"] for st in ranks],
            "attrs": module_attrs(self.model),
            "history": self.history,
        }
        return save_checkpoint(path, tensors, meta)

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save` (any rank count; exact only with the same one).

        The checkpoint is verified (SHA-256) and checked completely against this model, optimizer and
        configuration before anything is applied; any defect is one ``IvitError`` line and leaves the trainer
        as it was."""
        from .checkpoint import (
            check_identity,
            check_training_state,
            load_checkpoint,
            set_module_attrs,
            set_rng_state,
            unpack_optimizer,
        )

        ck = load_checkpoint(path)
        meta = ck.meta
        if not isinstance(meta.get("identity"), dict) or not isinstance(meta.get("train_config"), dict):
            raise IvitError(f"invalid checkpoint {path}: identity and train_config must be JSON objects")
        check_identity(path, meta["identity"], self.identity)
        saved_cfg = meta["train_config"]
        for k, v in asdict(self.cfg).items():
            if k != "epochs" and saved_cfg.get(k) != v:
                raise IvitError(f"checkpoint {path} was written with {k}={saved_cfg.get(k)} but this run has "
                                f"{k}={v}; use the same options (only --epochs may change) or a new output folder")
        check_training_state(ck, path, self.model, self.opt)
        self.model.load_state_dict(ck.group("model"))
        set_module_attrs(self.model, meta["attrs"])
        unpack_optimizer(self.opt, ck.group("optim"), meta["optimizer"])
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        self.step_in_epoch = int(meta["step_in_epoch"])
        self.history = list(meta["history"])
        same_layout = int(meta["world_size"]) == self.world and int(meta["steps_per_epoch"]) == self.steps_per_epoch
        if same_layout:
            set_rng_state(ck.group(f"rng/{self.rank}"), meta["rng"][self.rank])
            self.loss_sum, self.loss_count = float(meta["loss"][self.rank][0]), int(meta["loss"][self.rank][1])
            self.epoch_time = float(meta.get("epoch_time", 0.0))
        else:
            if self.rank == 0:
                warnings.warn(f"checkpoint was written by {meta['world_size']} process(es) with "
                              f"{meta['steps_per_epoch']} steps per epoch; restarting epoch {self.epoch + 1} "
                              "(the run continues but is not bit-identical to an uninterrupted one)",
                              RuntimeWarning, stacklevel=2)
            self.step = self.epoch * self.steps_per_epoch
            self.step_in_epoch = 0
            torch.manual_seed(self.cfg.seed + 7919 * self.epoch + self.rank)
