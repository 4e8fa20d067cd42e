"""STL-10 (Coates, Ng, Lee 2011) from its official binary files, memory-mapped.

The Jetson tutorial's dataset: 96x96 RGB, 10 classes, 5,000 labeled training images, 8,000
test images and 100,000 unlabeled ones (2.8 GB). The ``*_X.bin`` files hold uint8 images one
after another, each stored channel by channel and, within a channel, column by column (the
MATLAB order); ``*_y.bin`` holds one byte per image, classes 1..10.

:func:`load_stl10` maps the image file with ``numpy.memmap`` (copy-on-write, so the tensor is
writable in-process and the file is never modified) and wraps it with ``torch.from_numpy``:
no image is read until a batch gathers it, and the column-major layout is a transposed *view*
(N, 3, H, W), not a copy. The result is an :class:`~kdkit.data.ArrayDataset`, so
:class:`~kdkit.data.FastLoader` and the Trainer take it as they take Fashion-MNIST. Its
fingerprint (for teacher caches) is hashed in chunks, equal to the in-memory one, without
loading the file whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from kdkit.data.arrays import FINGERPRINT_VERSION, ArrayDataset
from kdkit.errors import KDError

__all__ = ["STL10_CLASSES", "STL10_SPLITS", "load_stl10"]

log = logging.getLogger(__name__)

STL10_CLASSES: tuple[str, ...] = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)
STL10_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
IMAGE_SHAPE = (3, 96, 96)
IMAGE_BYTES = 3 * 96 * 96
OFFICIAL_COUNTS = {"train": 5000, "test": 8000, "unlabeled": 100000}
_CHUNK_ROWS = 2048


class _MappedDataset(ArrayDataset):
    """An ArrayDataset over a memory-mapped tensor, fingerprinted chunk by chunk."""

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256(FINGERPRINT_VERSION)
            for tensor in (self.images, self.indices):
                digest.update(f"{tuple(tensor.shape)}{tensor.numpy().dtype.str};".encode())
                for start in range(0, tensor.shape[0], _CHUNK_ROWS):
                    chunk = np.ascontiguousarray(tensor[start : start + _CHUNK_ROWS].numpy())
                    digest.update(memoryview(chunk).cast("B"))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def _folder(root: str | os.PathLike) -> Path:
    """``root`` itself, or torchvision's ``root/stl10_binary``."""
    root = Path(root)
    for d in (root, root / "stl10_binary"):
        if (
            (d / "train_X.bin").is_file()
            or (d / "test_X.bin").is_file()
            or (d / "unlabeled_X.bin").is_file()
        ):
            return d
    raise KDError(
        f"no STL-10 binary files in {root} or {root / 'stl10_binary'}: expected train_X.bin, "
        "train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin (the official "
        "stl10_binary.tar.gz, unpacked)"
    )


def _labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise KDError(f"missing STL-10 label file {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size and (raw.min() < 1 or raw.max() > 10):
        raise KDError(f"{path} holds labels in [{raw.min()}, {raw.max()}]; STL-10 uses 1..10")
    return raw.astype(np.int64) - 1


def _images(path: Path, count: int | None) -> torch.Tensor:
    """(N, 3, 96, 96) uint8 view of ``path``; ``count`` is what the label file says."""
    if not path.is_file():
        raise KDError(f"missing STL-10 image file {path}")
    size = path.stat().st_size
    n = count if count is not None else size // IMAGE_BYTES
    expected = n * IMAGE_BYTES
    if size != expected or n == 0:
        why = "as many images as its label file has labels" if count is not None else "whole images"
        raise KDError(
            f"{path} has {size:,} bytes but {expected:,} were expected ({n:,} images of "
            f"3x96x96 = {IMAGE_BYTES:,} bytes, {why}); the file is truncated or not STL-10: "
            "download and unpack it again"
        )
    mapped = np.memmap(path, dtype=np.uint8, mode="c", shape=(n, *IMAGE_SHAPE))
    return torch.from_numpy(mapped).transpose(2, 3)  # column-major -> (N, C, H, W), a view


def _class_names(folder: Path) -> tuple[str, ...]:
    path = folder / "class_names.txt"
    if path.is_file():
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if len(names) == len(STL10_CLASSES):
            return names
    return STL10_CLASSES


def _split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split == "unlabeled":
        images = _images(folder / "unlabeled_X.bin", None)
        labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
    else:
        y = _labels(folder / f"{split}_y.bin")
        images = _images(folder / f"{split}_X.bin", len(y))
        labels = torch.from_numpy(y)
    official = OFFICIAL_COUNTS[split]
    if images.shape[0] != official:
        log.warning(
            "STL-10 %s in %s has %d images; the official split has %d",
            split,
            folder,
            images.shape[0],
            official,
        )
    return images, labels


def load_stl10(root: str | os.PathLike, split: str = "train") -> ArrayDataset:
    """STL-10 ``split`` as an :class:`ArrayDataset` of uint8 (N, 3, 96, 96), labels 0..9.

    Args:
        root: the folder holding the ``*.bin`` files, or its parent (torchvision's
            ``root/stl10_binary/`` layout).
        split: ``"train"`` (5k), ``"test"`` (8k), ``"unlabeled"`` (100k, every label -1) or
            ``"train+unlabeled"`` (the tutorial's distillation set: train rows keep their
            labels, indices 0..4,999, then the unlabeled rows, 5,000..104,999).

    Single splits stay memory-mapped. ``"train+unlabeled"`` is one tensor, so it is read into
    memory (2.9 GB); a loader with ``device=`` moves it to the GPU once.
    A file whose size does not fit (truncated download) is a :class:`KDError` naming it.
    """
    if split not in STL10_SPLITS:
        raise KDError(f"STL-10 split must be one of {list(STL10_SPLITS)}; got {split!r}")
    folder = _folder(root)
    classes = _class_names(folder)
    if split == "train+unlabeled":
        parts = [_split(folder, "train"), _split(folder, "unlabeled")]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        return ArrayDataset(images, labels, classes)
    images, labels = _split(folder, split)
    return _MappedDataset(images, labels, classes)
