"""The recipes: every default of the workflows, defined once.

The CLI, the Python API (``ivit.run_train``, ``ivit.run_qat``, ``ivit.run_ptq``, ...), the demo and the
benchmarks all read their defaults from here; the README quotes the same numbers.

* :data:`FLOAT_TRAINING`: float training of a small model from scratch (``ivit train``): AdamW, 1 warmup
  epoch then cosine decay, lr 1e-3, weight decay 0.05, label smoothing 0.1, batch 64, 30 epochs.
* :data:`QAT_TRAINING`: the I-ViT paper's QAT recipe (DeiT fine-tuning setup; ``ivit qat`` and
  ``ivit quantize --qat-epochs``): AdamW, cosine decay, no warmup, lr 1e-6, weight decay 0.05, label
  smoothing 0.1, batch 64 per process, 90 epochs.
* Calibration (PTQ, and the starting point of QAT): :data:`CALIBRATION_IMAGES` training images (a seeded
  shuffle, no augmentation) in batches of :data:`CALIBRATION_BATCH`; the per-layer search looks at the first
  :data:`SEARCH_IMAGES` of them.
* Data: :data:`DATASETS` gives, per built-in dataset (``ivit.data.BUILTIN_DATASETS``), the normalization a
  model trained from scratch on it uses and its training augmentation; ImageNet-layout folders use timm's
  DeiT augmentation (:data:`FOLDER_AUGMENT`) and the model's own normalization.
* :data:`DEMO_FLOAT` / :data:`DEMO_QAT`: the demo's short schedules for a tiny model (``ivit demo``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from torch import Tensor

from .. import data
from ..errors import IvitError
from ..training.trainer import TrainConfig

__all__ = ["FLOAT_TRAINING", "QAT_TRAINING", "DISTILL_ALPHA", "CALIBRATION_IMAGES", "CALIBRATION_BATCH",
           "SEARCH_IMAGES", "BITEXACT_IMAGES", "Augment", "DataRecipe", "DATASETS", "FOLDER_AUGMENT",
           "data_recipe", "resolve_augment", "augmentation", "DEMO_MODELS", "DEMO_FLOAT", "DEMO_QAT"]

#: Float training from scratch (the defaults of ``TrainConfig``).
FLOAT_TRAINING = TrainConfig()
#: The I-ViT paper's QAT recipe: AdamW + cosine, lr 1e-6 (the authors' range 2e-7 .. 2e-6), weight decay
#: 0.05, label smoothing 0.1, no warmup, batch 64 per process, 90 epochs.
QAT_TRAINING = replace(FLOAT_TRAINING, epochs=90, lr=1e-6, warmup_epochs=0.0)
#: Weight of the distillation term when QAT distills from the float model (``--distill``).
DISTILL_ALPHA = 0.5

#: Training images that calibrate the activation ranges (PTQ, and before QAT).
CALIBRATION_IMAGES = 512
#: Images per calibration batch (the running min/max observers update once per batch).
CALIBRATION_BATCH = 64
#: Calibration images the per-layer PTQ search evaluates its candidates on (the first ones).
SEARCH_IMAGES = 128
#: Held-out images on which a workflow checks the engine against the PyTorch integer model (0: all).
BITEXACT_IMAGES = 128


class Augment(str, Enum):
    """Training augmentation of uint8 images.

    ``PAD_CROP``: zero-pad then a random crop of the original size (``ivit.data.train_augment``);
    ``PAD_CROP_FLIP``: the same plus a random horizontal flip; ``TIMM``: the DeiT recipe through timm
    (RandomResizedCrop, flip, RandAugment, color jitter, random erasing: ``ivit.data.timm_augment``);
    ``NONE``: the images as they are.
    """

    PAD_CROP = "pad-crop"
    PAD_CROP_FLIP = "pad-crop-flip"
    TIMM = "timm"
    NONE = "none"


@dataclass(frozen=True)
class DataRecipe:
    """How models are trained on one dataset: the normalization of a model trained from scratch on it and
    the training augmentation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment


#: Built-in datasets.  Digits keep no flip (a mirrored digit is another shape); clothes flip freely.
DATASETS: dict[str, DataRecipe] = {
    "digits": DataRecipe((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), Augment.PAD_CROP),
    "fashion-mnist": DataRecipe((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), Augment.PAD_CROP_FLIP),
}
#: Augmentation of ImageNet-layout folders.
FOLDER_AUGMENT = Augment.TIMM

if set(DATASETS) != set(data.BUILTIN_DATASETS):  # pragma: no cover - a new dataset needs its recipe
    raise RuntimeError("ivit.workflows.recipes.DATASETS must cover ivit.data.BUILTIN_DATASETS")


def data_recipe(name: str) -> DataRecipe | None:
    """The recipe of a built-in dataset, None for a folder (``name`` is a path)."""
    return DATASETS.get(name)


def resolve_augment(name: str, augment: Augment | str) -> Augment:
    """``"auto"`` -> the augmentation of dataset ``name``'s recipe (:data:`FOLDER_AUGMENT` for folders)."""
    if augment == "auto":
        rec = data_recipe(name)
        return rec.augment if rec is not None else FOLDER_AUGMENT
    try:
        return Augment(augment)
    except ValueError:
        choices = ", ".join(["auto", *(a.value for a in Augment)])
        raise IvitError(f"unknown augmentation {augment!r}; choose from {choices}") from None


def augmentation(name: str, augment: Augment | str, img_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], from_tensor: bool = True) -> Callable[[Tensor], Tensor] | None:
    """The training transform of dataset ``name`` (``augment="auto"``: the dataset's recipe), or None.

    ``mean``/``std`` are the model's normalization (timm's random erasing draws its noise in that space);
    ``from_tensor`` tells the timm recipe that its input is a uint8 tensor (False: a PIL image).
    """
    aug = resolve_augment(name, augment)
    if aug is Augment.NONE:
        return None
    if aug is Augment.TIMM:
        return data.timm_augment(img_size, mean, std, from_tensor=from_tensor)
    return data.train_augment(img_size, flip=aug is Augment.PAD_CROP_FLIP)


#: ``ivit demo --model KIND`` -> the tiny model it trains on digits.
DEMO_MODELS: dict[str, str] = {"vit": "vit_digits", "swin": "swin_digits"}
#: The demo's float training: 40 epochs at lr 2e-3 (a tiny model, 1437 images).
DEMO_FLOAT = replace(FLOAT_TRAINING, epochs=40, lr=2e-3)
#: The demo's QAT: 2 epochs at lr 5e-5 without weight decay (a short schedule: the paper's lr 1e-6 is for
#: 90 epochs of fine-tuning a pretrained DeiT).
DEMO_QAT = replace(QAT_TRAINING, epochs=2, lr=5e-5, weight_decay=0.0)
