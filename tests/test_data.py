"""Tests for kdkit.data: Fashion-MNIST loading, FastLoader, splits and image folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from kdkit.compat import ImageNetManager
from kdkit.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ArrayDataset,
    FastLoader,
    ImageFolderManager,
    concat,
    holdout,
    load_fashion_mnist,
    split_labeled,
    to_float,
)
from kdkit.data import fashion_mnist as fm
from kdkit.errors import KDError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {DEBIAN_DIR} (sudo apt-get install "
    "dataset-fashion-mnist)",
)


# ---------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write ``array`` (uint8) in idx format; gzipped when ``path`` ends in .gz."""
    magic = magic if magic is not None else 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def tiny_fashion(directory: Path, split: str = "train", n: int = 5, gz: bool = True) -> np.ndarray:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 251
    write_idx(directory / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return images


@pytest.fixture
def no_system_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide the Debian copy, the download cache and $KDKIT_DATA."""
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (tmp_path / "no-system",))
    monkeypatch.setattr(fm, "DOWNLOAD_DIR", tmp_path / "no-cache")
    monkeypatch.delenv("KDKIT_DATA", raising=False)


@needs_fashion_mnist
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDKIT_DATA", raising=False)
    train = load_fashion_mnist("train", download=False)
    test = load_fashion_mnist("test", download=False)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28) and test.labels.dtype == torch.int64
    assert train.classes == list(FASHION_MNIST_CLASSES) and train.num_classes == 10
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train[59999][2] == 59999
    assert load_fashion_mnist("train", download=False) is train  # parsed once per process
    pixels = train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(FASHION_MNIST_MEAN[0], abs=1e-4)
    assert pixels.std().item() == pytest.approx(FASHION_MNIST_STD[0], abs=1e-4)


def test_kdkit_data_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    expected = tiny_fashion(tmp_path / "env", "test", n=7)
    monkeypatch.setenv("KDKIT_DATA", str(tmp_path / "env"))
    ds = load_fashion_mnist("test", download=False)
    assert ds.images.shape == (7, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(expected.astype(np.uint8)))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_root_with_fashion_mnist_subdir(no_system_data: None, tmp_path: Path) -> None:
    tiny_fashion(tmp_path / "root" / "fashion-mnist", "train", n=3, gz=False)
    ds = load_fashion_mnist("train", root=tmp_path / "root", download=False)
    assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 2]


def test_missing_data_names_the_apt_command(no_system_data: None) -> None:
    with pytest.raises(KDError, match="sudo apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist("train", download=False)
    assert "KDKIT_DATA" in str(err.value)


def test_failed_download_is_wrapped(monkeypatch: pytest.MonkeyPatch, no_system_data: None) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", offline)
    with pytest.raises(KDError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test")


def test_corrupt_idx_files(no_system_data: None, tmp_path: Path) -> None:
    tiny_fashion(tmp_path, "train", n=2)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(2), magic=0x0803)  # wrong magic
    with pytest.raises(KDError, match="train-labels-idx1-ubyte"):
        load_fashion_mnist("train", root=tmp_path, download=False)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:20])  # truncated gzip stream
    with pytest.raises(KDError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist("train", root=tmp_path, download=False)
    with pytest.raises(KDError, match="'train' or 'test'"):
        load_fashion_mnist("validation")


# ---------------------------------------------------------------- ArrayDataset, FastLoader


def numbered(n: int = 23, classes: int = 4) -> ArrayDataset:
    """Image i is filled with the value i, label i % classes: batches are easy to check."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ArrayDataset(images, torch.arange(n) % classes, [f"c{k}" for k in range(classes)])


def epoch(loader: FastLoader) -> torch.Tensor:
    return torch.cat([indices for _, _, indices in loader])


def test_array_dataset_items_and_validation() -> None:
    ds = numbered()
    image, label, index = ds[5]
    assert image.shape == (1, 2, 2) and int(label) == 1 and index == 5
    with pytest.raises(KDError, match="uint8"):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(KDError, match="labels must lie"):
        ArrayDataset(ds.images, torch.full((23,), 4), ["a", "b", "c", "d"])


def test_fingerprint_is_content_sensitive() -> None:
    a, b = numbered(), numbered()
    assert a.fingerprint() == b.fingerprint()
    changed = b.images.clone()
    changed[3, 0, 1, 1] += 1
    assert ArrayDataset(changed, b.labels).fingerprint() != a.fingerprint()
    assert a.subset([1, 2]).fingerprint() != a.subset([2, 1]).fingerprint()
    assert a.without_labels().fingerprint() == a.fingerprint()  # a teacher never sees labels


def test_fast_loader_covers_every_index_once() -> None:
    ds = numbered()
    loader = FastLoader(ds, batch_size=5)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and loader.dataset is ds
    images, labels, indices = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert sorted(indices.tolist()) == list(range(23))
    assert torch.equal(images[:, 0, 0, 0].long(), indices) and torch.equal(labels, indices % 4)
    assert images.dtype == torch.uint8 and indices.dtype == labels.dtype == torch.int64
    dropped = FastLoader(ds, batch_size=5, drop_last=True)
    assert len(dropped) == 4 and len(epoch(dropped).unique()) == 20
    assert epoch(FastLoader(ds, batch_size=5, shuffle=False)).tolist() == list(range(23))


def test_fast_loader_order_depends_on_seed_and_epoch() -> None:
    ds = numbered()
    first, second = FastLoader(ds, 4, seed=3), FastLoader(ds, 4, seed=3)
    e0 = epoch(first)
    assert torch.equal(e0, epoch(second))
    assert not torch.equal(e0, epoch(FastLoader(ds, 4, seed=4)))
    first.set_epoch(1)
    e1 = epoch(first)
    assert not torch.equal(e0, e1) and sorted(e1.tolist()) == list(range(23))
    second.set_epoch(1)
    assert torch.equal(e1, epoch(second))
    first.set_epoch(0)
    assert torch.equal(e0, epoch(first))


def test_iter_from_resumes_mid_epoch() -> None:
    loader = FastLoader(numbered(), batch_size=4, seed=1)
    loader.set_epoch(2)
    full = [indices for _, _, indices in loader]
    resumed = [indices for _, _, indices in loader.iter_from(2)]
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed, strict=True))
    assert list(loader.iter_from(len(loader))) == []
    with pytest.raises(KDError, match="batch_index"):
        loader.iter_from(len(loader) + 1)


def test_subsets_yield_original_indices() -> None:
    ds = numbered()
    sub = ds.subset([3, 7, 11, 19])
    for loader in (FastLoader(sub, 3), FastLoader(Subset(ds, [3, 7, 11, 19]), 3)):
        images, _, indices = (torch.cat(p) for p in zip(*loader, strict=True))
        assert sorted(indices.tolist()) == [3, 7, 11, 19]
        assert torch.equal(images[:, 0, 0, 0].long(), indices)
    nested = Subset(Subset(ds, [2, 4, 6, 8]), [1, 3])
    assert sorted(epoch(FastLoader(nested, 2)).tolist()) == [4, 8]
    assert sub.subset([0, 2]).indices.tolist() == [3, 11] and sub.subset([0]).base is ds


def test_fast_loader_shards_across_replicas() -> None:
    ds = numbered()
    ranks = [FastLoader(ds, 4, seed=5, num_replicas=2, rank=r) for r in range(2)]
    orders = [epoch(r) for r in ranks]
    assert len(orders[0]) == len(orders[1]) == 12  # 23 padded to 24
    assert set(torch.cat(orders).tolist()) == set(range(23))
    with pytest.raises(KDError, match="rank"):
        FastLoader(ds, 4, num_replicas=2, rank=2)
    with pytest.raises(KDError, match=r"\.images and \.labels"):
        FastLoader([1, 2, 3], 2)


def test_to_float() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).repeat(2, 2, 1, 1)
    out = to_float(images, mean=(0.2, 0.5), std=(0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == (2, 2, 1, 3)
    assert torch.allclose(out[0, 0, 0], torch.tensor([-0.4, 0.0, 1.6]), atol=1e-6)
    assert torch.allclose(out[1, 1, 0], torch.tensor([-2.0, -1.2, 2.0]), atol=1e-6)
    floats = torch.full((1, 1, 2, 2), 0.5)
    assert torch.allclose(to_float(floats, (0.5,), (1.0,)), torch.zeros(1, 1, 2, 2))
    assert floats.eq(0.5).all()  # input untouched
    with pytest.raises(KDError, match="channels"):
        to_float(images, (0.1, 0.2, 0.3), (1.0,))


# ---------------------------------------------------------------- splits


def test_split_labeled_is_stratified_disjoint_and_hidden() -> None:
    ds = numbered(100, classes=4)
    labeled, unlabeled = split_labeled(ds, 20, seed=1)
    assert len(labeled) == 20 and len(unlabeled) == 80
    assert labeled.labels.bincount().tolist() == [5, 5, 5, 5]
    assert torch.equal(labeled.labels, labeled.indices % 4)  # labels kept, matching indices
    assert (unlabeled.labels == -1).all()
    both = torch.cat([labeled.indices, unlabeled.indices])
    assert sorted(both.tolist()) == list(range(100))
    assert torch.equal(unlabeled.images[:, 0, 0, 0].long(), unlabeled.indices)
    again, _ = split_labeled(ds, 20, seed=1)
    other, _ = split_labeled(ds, 20, seed=2)
    assert torch.equal(again.indices, labeled.indices)
    assert not torch.equal(other.indices, labeled.indices)
    assert len(split_labeled(ds, 7, stratified=False)[0]) == 7


def test_stratified_split_respects_small_classes() -> None:
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    ds = ArrayDataset(torch.zeros(22, 1, 1, 1, dtype=torch.uint8), labels)
    labeled, _ = split_labeled(ds, 12)
    assert labeled.labels.bincount().tolist() == [2, 5, 5]
    counts = split_labeled(ds, 13, seed=4)[0].labels.bincount().tolist()
    assert counts[0] == 2 and sorted(counts[1:]) == [5, 6]


def test_split_errors_and_holdout() -> None:
    ds = numbered(40, classes=4)
    with pytest.raises(KDError, match="n_labeled=41"):
        split_labeled(ds, 41)
    _, unlabeled = split_labeled(ds, 8)
    with pytest.raises(KDError, match="0 labeled samples"):
        split_labeled(unlabeled, 1)  # hidden labels are never selected as labeled
    train, val = holdout(ds, 8, seed=0)
    assert len(train) == 32 and len(val) == 8 and (val.labels >= 0).all()
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert val.labels.bincount().tolist() == [2, 2, 2, 2]


def test_concat_labeled_and_unlabeled() -> None:
    ds = numbered(30)
    labeled, unlabeled = split_labeled(ds, 8)
    mixed = concat(labeled, unlabeled)
    assert len(mixed) == 30 and mixed.base is ds
    assert sorted(epoch(FastLoader(mixed, 7)).tolist()) == list(range(30))
    assert int((mixed.labels >= 0).sum()) == 8
    with pytest.raises(KDError, match="same dataset"):
        concat(labeled, numbered(5))


# ---------------------------------------------------------------- image folders

COLORS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fish": (0, 0, 255)}


def make_tree(root: Path, per_class: dict[str, int]) -> Path:
    for split, count in per_class.items():
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                Image.new("RGB", (40, 30), color).save(folder / f"img{k}.png")
    return root


def test_image_folder_manager_batches(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"train": 4, "val": 2})
    Image.new("L", (40, 30), 7).save(root / "train" / "cat" / "gray.PNG")  # 1 channel, caps
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    manager = ImageFolderManager(root, size=(16, 24), batch_size=4, workers=0)
    assert manager.classes == ["cat", "dog", "fish"] and manager.num_classes == 3
    assert len(manager.train_dataset) == 13 and len(manager.train_loader) == 3
    images, labels, indices = next(iter(manager.train_loader))
    assert images.shape == (4, 3, 16, 24) and images.dtype == torch.uint8
    assert labels.dtype == indices.dtype == torch.int64 and labels.max() < 3
    val = list(manager.val_loader)
    images = torch.cat([b.images for b in val])
    labels = torch.cat([b.labels for b in val])
    assert images.shape == (6, 3, 16, 24)
    assert torch.cat([b.indices for b in val]).tolist() == list(range(6))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    for image, label in zip(images, labels, strict=True):  # solid colours survive the crop
        expected = torch.tensor(COLORS[manager.classes[label]], dtype=torch.uint8)
        assert torch.equal(image[:, 8, 12], expected)
    assert manager.mean == (0.485, 0.456, 0.406) and len(manager.std) == 3


def test_imagenet_manager_darklight_aliases(tmp_path: Path) -> None:
    manager = ImageNetManager(make_tree(tmp_path, {"train": 2, "val": 1}), size=8, bsize=2)
    assert manager.batch_size == 2 and manager.size == (8, 8)
    assert manager.valid_loader is manager.val_loader
    assert next(iter(manager.valid_loader)).images.shape == (2, 3, 8, 8)


def test_image_folder_errors_show_the_layout(tmp_path: Path) -> None:
    with pytest.raises(KDError, match="does not exist"):
        ImageFolderManager(tmp_path / "missing", workers=0)
    root = make_tree(tmp_path / "a", {"train": 1})
    with pytest.raises(KDError, match=r"(?s)no folder .*val.*<class_name>"):
        ImageFolderManager(root, workers=0)
    root = make_tree(tmp_path / "b", {"train": 1, "val": 1})
    (root / "train" / "empty").mkdir()
    with pytest.raises(KDError, match="empty holds no images"):
        ImageFolderManager(root, workers=0)
    root = make_tree(tmp_path / "c", {"train": 1, "val": 1})
    (root / "val" / "bird").mkdir()
    Image.new("RGB", (4, 4)).save(root / "val" / "bird" / "x.png")
    with pytest.raises(KDError, match="bird"):
        ImageFolderManager(root, workers=0)
    flat = tmp_path / "d"
    (flat / "train").mkdir(parents=True)
    with pytest.raises(KDError, match="no class folders"):
        ImageFolderManager(flat, workers=0)
