"""Datasets and loaders that yield raw ``uint8`` RGB images and ``int64`` labels.

The integer model takes ``uint8`` pixels ``(N, 3, H, W)`` and folds the float normalization
(mean/std) into its first layer, so nothing here normalizes: every dataset returns
``(image uint8 (3, H, W), label int64 ())`` and a batch from :func:`make_loader` is
``(uint8 (B, 3, H, W), int64 (B,))``.

Sources:

* :func:`digits` - scikit-learn's 8x8 digits, upsampled (no download, for tests and demos).
* :func:`fashion_mnist` - the IDX files of the Debian package ``dataset-fashion-mnist``.
* :func:`image_folder` - an ImageNet-layout folder, with timm's eval resize/center-crop geometry.

:func:`build_dataset` picks one of them by name, as the CLI does.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ivit.errors import IvitError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "TensorImageDataset",
    "ImageFolderDataset",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "digits",
    "fashion_mnist",
    "image_folder",
    "BUILTIN_DATASETS",
    "build_dataset",
    "num_classes",
    "train_augment",
    "timm_augment",
    "make_loader",
]

Transform = Callable[[Tensor], Tensor]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


class TensorImageDataset(Dataset):
    """In-memory image dataset: ``uint8`` images ``(N, 3, H, W)`` with ``int64`` labels ``(N,)``.

    Attributes:
        images: ``uint8`` tensor ``(N, 3, H, W)`` (may be a channel-expanded view of grey data).
        labels: ``int64`` tensor ``(N,)`` with values in ``[0, len(classes))``.
        classes: class names, index = label.
        transform: optional per-sample callable on the ``uint8 (3, H, W)`` image (e.g.
            :func:`train_augment`); it must return a ``uint8`` tensor. May be set after creation.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, classes: list[str], transform: Transform | None = None
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be int64 ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index].contiguous()  # (3, H, W); materializes an expanded grey view
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


# ---------------------------------------------------------------------------------------------
# helpers


def _resize_uint8(images: Tensor, size: int, antialias: bool, chunk: int = 4096) -> Tensor:
    """Bilinear resize of ``uint8 (N, C, h, w)`` to ``(N, C, size, size)``, rounded half-to-even, clamped."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):  # chunks bound the float32 working memory
        x = images[start : start + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        out[start : start + chunk] = y.round().clamp_(0, 255).to(torch.uint8)
    return out


def _grey_to_rgb(images: Tensor) -> Tensor:
    """``(N, 1, H, W)`` -> ``(N, 3, H, W)`` as a stride-0 view (no copy: Fashion-MNIST stays small)."""
    return images.expand(-1, 3, -1, -1)


def _check_size(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size < 1:
        raise IvitError(f"img_size must be a positive integer, got {img_size!r}")


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise IvitError(f"unknown split {split!r}: expected one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def digits(split: str, img_size: int = 16) -> TensorImageDataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as ``uint8`` RGB.

    The split is a fixed stratified 80/20 split (``train_test_split(random_state=0)``): 1437 train
    and 360 test images; each split keeps the original sample order. Pixels ``v`` in ``0..16``
    become ``round(v * 255 / 16)`` (half to even), are resized to ``img_size`` with bilinear
    interpolation (``align_corners=False``, no antialias), rounded and clamped back to ``uint8``,
    and the grey channel is replicated to 3 channels.

    Args:
        split: ``"train"`` or ``"test"``.
        img_size: output height and width.

    Returns:
        A :class:`TensorImageDataset` with classes ``"0"`` .. ``"9"``.

    Raises:
        IvitError: unknown split or bad ``img_size``.
    """
    _check_split(split, ("train", "test"))
    _check_size(img_size)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x, y = bunch.images, bunch.target  # (1797, 8, 8) float 0..16, (1797,) int
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    idx = np.sort(train_idx if split == "train" else test_idx)
    grey = torch.from_numpy(np.rint(x[idx] * 255.0 / 16.0).astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8)
    grey = _resize_uint8(grey, img_size, antialias=False)
    labels = torch.from_numpy(y[idx].astype(np.int64))
    return TensorImageDataset(_grey_to_rgb(grey).contiguous(), labels, [str(d) for d in range(10)])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)


def _find_idx(root: Path, stem: str, kind: str) -> Path:
    """Locate ``{stem}-{kind}-ubyte`` (or ``{stem}-{kind}.ubyte`` variants), gzipped or not."""
    names = [f"{stem}-{kind}-ubyte", f"{stem}-{kind.replace('-idx', '.idx')}-ubyte"]
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise IvitError(
        f"Fashion-MNIST file {names[0]}[.gz] not found in {root}; "
        f"install the dataset with `apt-get install dataset-fashion-mnist` or pass its folder as root"
    )


def _read_idx(path: Path, ndim: int) -> Tensor:
    """Read an unsigned-byte IDX file (gzipped or raw) with ``ndim`` dimensions into a ``uint8`` tensor.

    IDX layout: magic ``00 00 08 ndim`` (``08`` = unsigned byte), ``ndim`` big-endian uint32 sizes,
    then ``prod(sizes)`` bytes of data.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise IvitError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IvitError(f"{path}: corrupted or truncated gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IvitError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08 or raw[3] != ndim:
        raise IvitError(
            f"{path}: expected an unsigned-byte IDX file with {ndim} dimension(s), "
            f"got magic 0x{int.from_bytes(raw[:4], 'big'):08x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IvitError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "has trailing bytes"
        raise IvitError(
            f"{path}: {what}: shape {shape} needs {expected} data bytes, found {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(data.copy())


def fashion_mnist(split: str, img_size: int = 28, root: str = FASHION_MNIST_ROOT) -> TensorImageDataset:
    """Fashion-MNIST from IDX files (60000 train / 10000 test grey 28x28 images, 10 classes).

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``root`` (the Debian package
    ``dataset-fashion-mnist`` installs them gzipped in ``/usr/share/datasets/fashion-mnist``). Images
    whose stored size differs from ``img_size`` are resized bilinearly (antialiased when shrinking),
    rounded half to even; grey is replicated to 3 channels as a view, so the dataset holds
    ``N * img_size**2`` bytes.

    Args:
        split: ``"train"`` or ``"test"``.
        img_size: output height and width.
        root: folder with the IDX files.

    Returns:
        A :class:`TensorImageDataset` with :data:`FASHION_MNIST_CLASSES`.

    Raises:
        IvitError: files absent (the message names ``apt-get install dataset-fashion-mnist``),
            corrupted/truncated files, image/label count mismatch, labels out of range.
    """
    _check_split(split, ("train", "test"))
    _check_size(img_size)
    folder = Path(root)
    if not folder.is_dir():
        raise IvitError(
            f"Fashion-MNIST folder {root} not found; "
            f"install the dataset with `apt-get install dataset-fashion-mnist` or pass its folder as root"
        )
    stem = "train" if split == "train" else "t10k"
    images_path = _find_idx(folder, stem, "images-idx3")
    labels_path = _find_idx(folder, stem, "labels-idx1")
    images = _read_idx(images_path, 3)  # (N, H, W)
    labels = _read_idx(labels_path, 1).to(torch.int64)  # (N,)
    if images.shape[0] != labels.shape[0]:
        raise IvitError(
            f"{images_path}: {images.shape[0]} images but {labels_path.name} has {labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise IvitError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    grey = images.unsqueeze(1)  # (N, 1, H, W)
    grey = _resize_uint8(grey, img_size, antialias=img_size < min(grey.shape[-2:]))
    return TensorImageDataset(_grey_to_rgb(grey), labels, FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------
# ImageNet-layout folders


def _load_rgb(path: str) -> PILImage:
    """Decode an image file to an RGB PIL image; any decoding failure is an ``IvitError`` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # forces the full decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise IvitError(f"cannot decode image {path}: {e}") from None


class ImageFolderDataset(Dataset):
    """An ImageNet-layout folder (``root/<class>/<image>``) yielding ``uint8 (3, S, S)`` images.

    Built on ``torchvision.datasets.ImageFolder`` (same class order and sample list); each image is
    decoded to RGB, resized so its shorter side is ``int(img_size / crop_pct)`` with the given PIL
    interpolation, center-cropped to ``img_size`` (timm's eval geometry) and converted to ``uint8``
    without normalization.

    Attributes:
        root: the folder.
        classes: class folder names, index = label.
        samples: ``(path, label)`` pairs.
        targets: labels, in sample order.
        preprocess: the decode-free geometry (PIL image -> ``uint8`` tensor).
        transform: optional per-sample callable on the ``uint8`` tensor, applied after ``preprocess``.
    """

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        transform: Transform | None = None,
    ) -> None:
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import IMG_EXTENSIONS
        from torchvision.transforms import InterpolationMode, v2

        _check_size(img_size)
        if not 0.0 < crop_pct <= 1.0:
            raise IvitError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if interpolation not in _INTERPOLATIONS:
            raise IvitError(
                f"unknown interpolation {interpolation!r}: expected one of {', '.join(_INTERPOLATIONS)}"
            )
        if not os.path.isdir(root):
            raise IvitError(f"image folder {root} not found")
        rejected: list[str] = []

        def is_valid_file(path: str) -> bool:
            name = os.path.basename(path)
            if name.startswith("."):  # .DS_Store and friends
                return False
            if name.lower().endswith(IMG_EXTENSIONS):
                return True
            rejected.append(path)
            return False

        try:
            folder = ImageFolder(root, loader=_load_rgb, is_valid_file=is_valid_file)
        except FileNotFoundError as e:  # no class folders, or a class folder without images
            if not rejected:
                raise IvitError(f"image folder {root}: {str(e).strip()}") from None
        if rejected:
            more = f" (and {len(rejected) - 1} more)" if len(rejected) > 1 else ""
            raise IvitError(
                f"{rejected[0]}{more} is not an image file (expected {', '.join(IMG_EXTENSIONS)})"
            )
        self.root = root
        self.classes: list[str] = folder.classes
        self.class_to_idx: dict[str, int] = folder.class_to_idx
        self.samples: list[tuple[str, int]] = folder.samples
        self.targets: list[int] = folder.targets
        self.img_size = img_size
        self.preprocess = v2.Compose(
            [
                v2.Resize(int(img_size / crop_pct), interpolation=InterpolationMode(interpolation)),
                v2.CenterCrop(img_size),
                v2.PILToTensor(),
            ]
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path, target = self.samples[index]
        image = self.preprocess(_load_rgb(path))  # uint8 (3, img_size, img_size)
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(target, dtype=torch.int64)


def image_folder(
    root: str,
    img_size: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    transform: Transform | None = None,
) -> ImageFolderDataset:
    """An ImageNet-layout folder with timm's eval geometry, yielding ``uint8 (3, img_size, img_size)``.

    Args:
        root: folder with one sub-folder per class.
        img_size: output height and width (center crop).
        crop_pct: the shorter side is first resized to ``int(img_size / crop_pct)``.
        interpolation: PIL resampling for the resize (``"bicubic"``, ``"bilinear"``, ...).
        transform: optional per-sample callable on the ``uint8`` tensor.

    Returns:
        An :class:`ImageFolderDataset`.

    Raises:
        IvitError: missing root, no class folders, a class folder with no images, a non-image file
            in a class folder (at creation), an image that cannot be decoded (when it is read).
    """
    return ImageFolderDataset(root, img_size, crop_pct, interpolation, transform)


# ---------------------------------------------------------------------------------------------
# selection, augmentation, loading

#: The built-in datasets by name (``--data NAME``): ``loader(split, img_size)``.  Their training recipes
#: (normalization, augmentation) are in ``ivit.workflows.recipes``.
BUILTIN_DATASETS: dict[str, Callable[[str, int], TensorImageDataset]] = {
    "digits": digits,
    "fashion-mnist": fashion_mnist,
}


def build_dataset(name: str, split: str, img_size: int) -> Dataset:
    """Dataset by name: one of :data:`BUILTIN_DATASETS`, or a folder with ``train/`` and ``val/``.

    Args:
        name: dataset name or path to an ImageNet-layout folder.
        split: ``"train"``, or ``"test"``/``"val"`` (synonyms: the held-out split).
        img_size: output height and width.

    Returns:
        A dataset yielding ``(uint8 (3, img_size, img_size), int64 ())``.

    Raises:
        IvitError: unknown name, missing split folder, bad split, or any error of the chosen source.
    """
    _check_split(split, ("train", "test", "val"))
    held_out = split != "train"
    if name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name]("test" if held_out else "train", img_size)
    options = f"expected one of {', '.join(BUILTIN_DATASETS)}, or a folder containing train/ and val/"
    if not os.path.isdir(name):
        raise IvitError(f"unknown dataset {name!r}: {options}")
    sub = os.path.join(name, "val" if held_out else "train")
    if not os.path.isdir(sub):
        raise IvitError(f"dataset folder {name} has no {os.path.basename(sub)}/ subfolder: {options}")
    return image_folder(sub, img_size)


def num_classes(ds: Dataset) -> int:
    """Number of classes of a dataset from this module (also through ``Subset`` wrappers)."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    classes = getattr(ds, "classes", None)
    if classes is None:
        raise TypeError(f"{type(ds).__name__} has no .classes attribute")
    return len(classes)


def train_augment(img_size: int, flip: bool = True, generator: torch.Generator | None = None) -> Transform:
    """Light training augmentation on ``uint8 (3, H, W)`` images: zero-pad + random crop, random h-flip.

    The padding is ``max(1, round(2 * img_size / 16))`` pixels per side (2 pixels at 16x16, the
    CIFAR-style 4 pixels at 32x32); a random ``H x W`` window of the padded image is kept, then the
    image is mirrored left-right with probability 1/2 when ``flip``.

    Args:
        img_size: nominal image size (sets the padding).
        flip: enable the random horizontal flip.
        generator: random source; ``None`` uses torch's global generator (seed it with
            ``torch.manual_seed`` for reproducible epochs).

    Returns:
        A callable ``uint8 (3, H, W) -> uint8 (3, H, W)``.
    """
    _check_size(img_size)
    pad = max(1, round(2 * img_size / 16))

    def augment(image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        padded = image.new_zeros((*image.shape[:-2], h + 2 * pad, w + 2 * pad))  # (3, H+2p, W+2p)
        padded[..., pad : pad + h, pad : pad + w] = image
        top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        out = padded[..., top : top + h, left : left + w]
        if flip and bool(torch.rand((), generator=generator) < 0.5):
            out = out.flip(-1)
        return out.contiguous()

    return augment


class _Uint8RandomErasing:
    """timm's ``RandomErasing`` applied to a uint8 image: done in normalized space (so ``pixel`` mode
    draws normal noise there, as timm does), then mapped back to rounded uint8 pixels."""

    def __init__(self, prob: float, mean: tuple[float, ...], std: tuple[float, ...], mode: str = "pixel",
                 count: int = 1) -> None:
        from timm.data.random_erasing import RandomErasing

        self.erase = RandomErasing(prob, mode=mode, max_count=count, device="cpu")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        x = (img.to(torch.float32) / 255.0 - self.mean) / self.std
        x = self.erase(x)
        return ((x * self.std + self.mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def timm_augment(img_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 from_tensor: bool = False) -> Callable:
    """The DeiT training augmentation through timm, ending in uint8 ``(3, S, S)`` pixels:
    RandomResizedCrop(scale 0.08-1, bicubic), h-flip, RandAugment ``rand-m9-mstd0.5-inc1``, color
    jitter 0.4, then random erasing (p 0.25, pixel mode, drawn in the model's normalized space).

    Args:
        img_size: output height and width.
        mean, std: the model's normalization (random erasing draws its noise in that space).
        from_tensor: the input is a uint8 ``(3, H, W)`` tensor (else a PIL image).
    """
    from timm.data.transforms_factory import transforms_imagenet_train
    from torchvision.transforms import v2

    _check_size(img_size)
    tf = transforms_imagenet_train(img_size, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                                   interpolation="bicubic", mean=mean, std=std, normalize=False)
    steps: list[Callable] = [v2.ToPILImage()] if from_tensor else []
    steps += [tf, _Uint8RandomErasing(0.25, mean, std)]
    return v2.Compose(steps)


def make_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process ``DataLoader`` with reproducible order.

    With ``distributed`` and an initialized ``torch.distributed`` process group, a
    ``DistributedSampler(shuffle, seed, drop_last)`` shards the data across ranks (call
    ``loader.sampler.set_epoch(epoch)`` each epoch); otherwise the shuffle order comes from a
    ``torch.Generator`` seeded with ``seed`` (the same sequence of epochs on every run).

    Args:
        ds: the dataset.
        batch_size: samples per batch.
        shuffle: shuffle every epoch.
        seed: seed of the shuffle order.
        distributed: shard across ranks when a process group is initialized.
        drop_last: drop the last incomplete batch.

    Returns:
        A ``DataLoader`` with ``num_workers=0``.

    Raises:
        IvitError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise IvitError(f"batch size must be >= 1, got {batch_size}")
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=0)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last, num_workers=0
    )
