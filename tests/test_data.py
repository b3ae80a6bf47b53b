"""Tests for ivit.data: uint8 datasets (digits, Fashion-MNIST IDX, image folders), augmentation, loaders."""

from __future__ import annotations

import gzip
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from ivit.data import (
    BUILTIN_DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    TensorImageDataset,
    build_dataset,
    digits,
    fashion_mnist,
    image_folder,
    make_loader,
    num_classes,
    timm_augment,
    train_augment,
)
from ivit.errors import IvitError

# ------------------------------------------------------------------------------------------ digits


def test_digits_shapes_dtypes_ranges() -> None:
    ds = digits("train", img_size=16)
    assert isinstance(ds, TensorImageDataset)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (1437, 3, 16, 16)
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (1437,)
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert set(ds.labels.tolist()) == set(range(10))
    assert ds.classes == [str(d) for d in range(10)] and num_classes(ds) == 10
    # grey replicated to 3 channels
    assert torch.equal(ds.images[:, 0], ds.images[:, 1]) and torch.equal(ds.images[:, 0], ds.images[:, 2])
    image, label = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert label.dtype == torch.int64 and label.dim() == 0 and int(label) == int(ds.labels[5])


def test_digits_split_is_a_stratified_partition() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = digits("train", img_size=8), digits("test", img_size=8)
    assert len(train) == 1437 and len(test) == 360 and len(train) + len(test) == 1797
    # at native size the pixels are exactly round(v * 255 / 16): the two splits together are the
    # full data set, each sample exactly once (multiset equality of (pixels, label) rows)
    full = np.rint(bunch.images.reshape(1797, 64) * 255 / 16).astype(np.int64)
    full_rows = sorted(map(tuple, np.concatenate([full, bunch.target[:, None]], axis=1).tolist()))
    split_rows = []
    for ds in (train, test):
        pix = ds.images[:, 0].reshape(len(ds), 64).to(torch.int64)
        split_rows += torch.cat([pix, ds.labels[:, None]], dim=1).tolist()
    assert sorted(map(tuple, split_rows)) == full_rows
    # stratified: each class contributes ~20% of its samples to the test split
    for c in range(10):
        n_c = int((bunch.target == c).sum())
        assert abs(int((test.labels == c).sum()) - 0.2 * n_c) <= 1


def test_digits_deterministic_and_bilinear() -> None:
    a, b = digits("test", img_size=16), digits("test", img_size=16)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    small = digits("test", img_size=8).images[:, 0].double()  # (N, 8, 8)
    big = a.images[:, 0].double()  # (N, 16, 16)
    # 2x bilinear (align_corners=False): output (2i+1, 2j+1) weighs rows i, i+1 and cols j, j+1 by 3/4, 1/4
    w = torch.tensor([0.75, 0.25], dtype=torch.float64)
    for i, j in [(0, 0), (3, 4), (6, 2)]:
        patch = small[:, i : i + 2, j : j + 2]
        expected = torch.einsum("nab,a,b->n", patch, w, w)
        assert (big[:, 2 * i + 1, 2 * j + 1] - expected).abs().max() <= 0.5 + 1e-9


def test_digits_bad_split() -> None:
    with pytest.raises(IvitError, match="split"):
        digits("validation")


# ------------------------------------------------------------------------------------ fashion-mnist


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(root: Path, n: int = 6, gz: bool = True, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for stem in ("train", "t10k"):
        for name, arr in ((f"{stem}-images-idx3-ubyte", images), (f"{stem}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_fashion(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = fashion_mnist(split, root=str(tmp_path))
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (6, 3, 28, 28)
        assert ds.labels.dtype == torch.int64
        for ch in range(3):
            assert torch.equal(ds.images[:, ch], torch.from_numpy(images))
        assert ds.labels.tolist() == labels.tolist()
        assert ds.classes == FASHION_MNIST_CLASSES and len(ds.classes) == 10
        image, label = ds[2]
        assert image.shape == (3, 28, 28) and image.is_contiguous() and int(label) == 2


def test_fashion_mnist_resize(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    ds = fashion_mnist("train", img_size=32, root=str(tmp_path))
    assert ds.images.shape == (6, 3, 32, 32) and ds.images.dtype == torch.uint8
    const = tmp_path / "const"  # a constant image stays constant through the resize
    _write_fashion(const)
    path = const / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.full((2, 28, 28), 77, dtype=np.uint8))))
    (const / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.array([1, 2]))))
    for size in (14, 40):
        ds = fashion_mnist("train", img_size=size, root=str(const))
        assert ds.images.shape == (2, 3, size, size) and bool((ds.images == 77).all())


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(IvitError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=str(tmp_path / "nowhere"))
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(IvitError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("test", root=str(tmp_path / "empty"))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_truncated(tmp_path: Path, gz: bool) -> None:
    _write_fashion(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IvitError, match=name.replace(".", r"\.")) as info:
        fashion_mnist("train", root=str(tmp_path))
    assert "\n" not in str(info.value) and "truncated" in str(info.value)


def test_fashion_mnist_corrupted(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[3] = 1  # claims one dimension: an idx1 file where idx3 is expected
    path.write_bytes(bytes(data))
    with pytest.raises(IvitError, match="magic"):
        fashion_mnist("test", root=str(tmp_path))
    path.write_bytes(b"hello world, not idx")
    with pytest.raises(IvitError, match="magic"):
        fashion_mnist("test", root=str(tmp_path))
    # labels count must match images count
    _write_fashion(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([0, 1, 2])))
    with pytest.raises(IvitError, match="6 images but"):
        fashion_mnist("test", root=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([0, 1, 2, 3, 4, 10])))
    with pytest.raises(IvitError, match="out of range"):
        fashion_mnist("test", root=str(tmp_path))


@pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_debian_files() -> None:
    test = fashion_mnist("test")
    assert test.images.shape == (10000, 3, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert int(test.images.max()) == 255 and int(test.images.min()) == 0
    assert len(fashion_mnist("train")) == 60000
    assert len(build_dataset("fashion-mnist", "val", 28)) == 10000


# ------------------------------------------------------------------------------------- image folder


def _gradient_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 40)], axis=-1)
    arr = (arr + rng.integers(0, 8, size=arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _write_folder(root: Path) -> None:
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    _gradient_image(40, 30, 0).save(root / "cat" / "a.png")
    _gradient_image(30, 50, 1).convert("L").save(root / "cat" / "b.png")  # grey: converted to RGB
    _gradient_image(64, 48, 2).save(root / "dog" / "c.jpg", quality=90)
    _gradient_image(20, 20, 3).save(root / "dog" / "d.jpeg")


def test_image_folder_geometry(tmp_path: Path) -> None:
    from timm.data.transforms_factory import transforms_imagenet_eval

    _write_folder(tmp_path)
    ds = image_folder(str(tmp_path), img_size=16, crop_pct=0.5, interpolation="bicubic")
    assert ds.classes == ["cat", "dog"] and num_classes(ds) == 2 and len(ds) == 4
    # timm's eval transform without normalization is the reference: shorter side -> 32, center crop 16
    ref = transforms_imagenet_eval(16, crop_pct=0.5, interpolation="bicubic", use_prefetcher=True)
    for i, (path, target) in enumerate(ds.samples):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
        assert label.dtype == torch.int64 and int(label) == target
        with Image.open(path) as pil:
            expected = torch.as_tensor(np.asarray(ref(pil.convert("RGB"))))
        assert torch.equal(image, expected), path
    # a plain center crop without rescale (crop_pct=1, image already img_size on its short side)
    ds20 = image_folder(str(tmp_path), img_size=20, crop_pct=1.0)
    d = ds20[ds20.samples.index((str(tmp_path / "dog" / "d.jpeg"), 1))][0]
    with Image.open(tmp_path / "dog" / "d.jpeg") as pil:
        assert torch.equal(d, torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1))
    batch_x, batch_y = next(iter(make_loader(ds, batch_size=4, shuffle=False)))
    assert batch_x.dtype == torch.uint8 and batch_x.shape == (4, 3, 16, 16)
    assert batch_y.dtype == torch.int64 and batch_y.tolist() == [0, 0, 1, 1]


def test_image_folder_non_image_file(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden files are ignored
    with pytest.raises(IvitError, match="notes.txt") as info:
        image_folder(str(tmp_path), img_size=16)
    assert "\n" not in str(info.value)


def test_image_folder_undecodable_image(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"this is not a png")
    jpg = (tmp_path / "dog" / "c.jpg").read_bytes()
    (tmp_path / "dog" / "half.jpg").write_bytes(jpg[: len(jpg) // 2])
    ds = image_folder(str(tmp_path), img_size=16)
    for name in ("broken.png", "half.jpg"):
        index = [os.path.basename(p) for p, _ in ds.samples].index(name)
        with pytest.raises(IvitError, match=name.replace(".", r"\.")) as info:
            ds[index]
        assert "\n" not in str(info.value)


def test_image_folder_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(IvitError, match="not found"):
        image_folder(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    _gradient_image(8, 8, 0).save(tmp_path / "flat" / "x.png")  # images but no class folders
    with pytest.raises(IvitError, match="class folder"):
        image_folder(str(tmp_path / "flat"))
    (tmp_path / "emptyclass" / "a").mkdir(parents=True)
    with pytest.raises(IvitError, match="no valid file"):
        image_folder(str(tmp_path / "emptyclass"))
    with pytest.raises(IvitError, match="interpolation"):
        image_folder(str(tmp_path / "flat"), interpolation="cubic-ish")
    with pytest.raises(IvitError, match="crop_pct"):
        image_folder(str(tmp_path / "flat"), crop_pct=1.5)


# ------------------------------------------------------------------------------------ build_dataset


def test_build_dataset() -> None:
    ds = build_dataset("digits", "val", 16)
    assert torch.equal(ds.images, digits("test", 16).images)
    assert len(build_dataset("digits", "train", 12)) == 1437
    with pytest.raises(IvitError, match="unknown dataset 'imagenet-42'") as info:
        build_dataset("imagenet-42", "train", 16)
    assert "digits" in str(info.value) and "fashion-mnist" in str(info.value)
    with pytest.raises(IvitError, match="split"):
        build_dataset("digits", "dev", 16)


def test_builtin_datasets_are_one_registry() -> None:
    from ivit.workflows import recipes

    assert list(BUILTIN_DATASETS) == ["digits", "fashion-mnist"]
    assert BUILTIN_DATASETS["digits"] is digits and BUILTIN_DATASETS["fashion-mnist"] is fashion_mnist
    assert set(recipes.DATASETS) == set(BUILTIN_DATASETS)  # every built-in dataset has its training recipe


def test_build_dataset_folder(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train")
    with pytest.raises(IvitError, match="val/"):
        build_dataset(str(tmp_path), "val", 16)
    _write_folder(tmp_path / "val")
    (tmp_path / "val" / "cat" / "a.png").unlink()
    train, val = build_dataset(str(tmp_path), "train", 16), build_dataset(str(tmp_path), "test", 16)
    assert len(train) == 4 and len(val) == 3
    assert val[0][0].shape == (3, 16, 16)


# ------------------------------------------------------------------------------ augment and loaders


def test_train_augment_is_a_shifted_window() -> None:
    image = torch.randint(1, 256, (3, 16, 16), dtype=torch.uint8)  # no zeros: padding is visible
    pad = 2
    padded = torch.zeros(3, 20, 20, dtype=torch.uint8)
    padded[:, pad:-pad, pad:-pad] = image
    windows = [padded[:, i : i + 16, j : j + 16] for i, j in itertools.product(range(5), range(5))]
    for flip in (False, True):
        aug = train_augment(16, flip=flip, generator=torch.Generator().manual_seed(0))
        seen = set()
        for _ in range(60):
            out = aug(image)
            assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
            candidates = windows + ([w.flip(-1) for w in windows] if flip else [])
            hits = [k for k, w in enumerate(candidates) if torch.equal(out, w)]
            assert hits, "output is not a padded crop (or its mirror) of the input"
            seen.add(hits[0])
        assert len(seen) > 5  # the crop offset (and flip) really vary
    # seeded generators reproduce
    a = train_augment(16, generator=torch.Generator().manual_seed(3))
    b = train_augment(16, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a(image), b(image)) for _ in range(5))


def test_train_augment_in_dataset() -> None:
    ds = digits("test", img_size=32)
    ds.transform = train_augment(32)
    x, y = next(iter(make_loader(ds, batch_size=8, shuffle=True)))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32) and y.dtype == torch.int64


def test_timm_augmentation_yields_uint8() -> None:
    torch.manual_seed(0)
    tf = timm_augment(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), from_tensor=True)
    img = digits("train", 40).images[0]
    outs = [tf(img) for _ in range(4)]
    assert all(o.dtype == torch.uint8 and o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random
    with pytest.raises(IvitError, match="img_size"):
        timm_augment(0, (0.5,), (0.5,))


def test_make_loader_reproducible() -> None:
    ds = digits("test", img_size=8)

    def order(seed: int) -> list[int]:
        loader = make_loader(ds, batch_size=64, shuffle=True, seed=seed)
        return [int(y) for _, ys in loader for y in ys] + [int(y) for _, ys in loader for y in ys]

    assert order(0) == order(0) and order(0) != order(1)
    plain = make_loader(ds, batch_size=64, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in plain]), ds.labels)
    assert len(make_loader(ds, batch_size=64, shuffle=False, drop_last=True)) == 360 // 64
    # distributed without an initialized process group falls back to a plain loader
    assert len(make_loader(ds, batch_size=64, shuffle=True, distributed=True)) == 6
    with pytest.raises(IvitError, match="batch size"):
        make_loader(ds, batch_size=0, shuffle=False)
    assert num_classes(Subset(ds, [0, 1, 2])) == 10
