"""Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) from local idx files.

The data is looked for, in order, in the ``root`` argument, in ``$KDKIT_DATA``, in Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), in kdkit's
download cache, and only then downloaded with torchvision. Each place may hold the idx
files directly (gzipped or not), in a ``fashion-mnist/`` subfolder, or in torchvision's
``FashionMNIST/raw/`` layout. The files are parsed with numpy, checked, and kept in memory
per process, so loading twice is free.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from kdkit.data.arrays import ArrayDataset
from kdkit.errors import KDError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
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
)
# Measured on the 60,000 training images in [0, 1] units (pixel mean and std over all pixels).
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)

INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
ENV_VAR = "KDKIT_DATA"
# Module-level so tests (and unusual systems) can point the search elsewhere.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
DOWNLOAD_DIR = Path.home() / ".cache" / "kdkit" / "data"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension
_CACHE: dict[tuple, ArrayDataset] = {}


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None, *, download: bool = True
) -> ArrayDataset:
    """Fashion-MNIST as an :class:`ArrayDataset`: uint8 images (N, 1, 28, 28), labels 0..9.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000). Tune on a
            :func:`~kdkit.data.holdout` split of train, never on test.
        root: a directory to look in first.
        download: fall back to downloading with torchvision (into ``root`` if given, else
            ``~/.cache/kdkit/data``) when no local copy is found.

    The returned dataset is shared by every caller in the process: do not modify it in place.
    """
    if split not in _FILES:
        raise KDError(f"Fashion-MNIST split must be 'train' or 'test'; got {split!r}")
    searched = _search_dirs(root)
    for directory in searched:
        paths = _find_split(directory, split)
        if paths is not None:
            return _load_cached(*paths)
    if download:
        target = Path(root) if root is not None else DOWNLOAD_DIR
        paths = _download(target, split)
        return _load_cached(*paths)
    raise KDError(_missing_message(split, searched))


def _search_dirs(root: str | os.PathLike | None) -> list[Path]:
    bases = [Path(root)] if root is not None else []
    env = os.environ.get(ENV_VAR)
    if env:
        bases.append(Path(env))
    bases.extend(SYSTEM_DIRS)
    bases.append(DOWNLOAD_DIR)
    dirs: list[Path] = []
    for base in bases:
        for d in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _find_split(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` in ``directory``, gzipped or not, or None."""
    found = []
    for stem in _FILES[split]:
        candidates = [directory / stem, directory / f"{stem}.gz"]
        existing = [p for p in candidates if p.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def _missing_message(split: str, searched: list[Path]) -> str:
    places = "\n".join(f"  {d}" for d in searched)
    return (
        f"Fashion-MNIST ({split}) not found. Install it with:\n"
        f"  {INSTALL_HINT}\n"
        f"or set {ENV_VAR} to a directory holding {_FILES[split][0]}[.gz] and "
        f"{_FILES[split][1]}[.gz]. Searched:\n{places}"
    )


def _download(target: Path, split: str) -> tuple[Path, Path]:
    """Download with torchvision (needs internet), then return the raw idx files."""
    logger.info("Fashion-MNIST not found locally; downloading into %s", target)
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(target), train=split == "train", download=True)
    except Exception as exc:  # no internet, proxy, disk full: all end in the same advice
        raise KDError(
            f"could not download Fashion-MNIST into {target} ({type(exc).__name__}: {exc}). "
            f"Install it locally with:\n  {INSTALL_HINT}\nor set {ENV_VAR} to a directory "
            "holding the idx files."
        ) from exc
    paths = _find_split(target / "FashionMNIST" / "raw", split)
    if paths is None:
        raise KDError(f"torchvision's download into {target} left no idx files for {split}")
    return paths


def _load_cached(images_path: Path, labels_path: Path) -> ArrayDataset:
    key = tuple(
        (str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size)
        for p in (images_path, labels_path)
    )
    if key not in _CACHE:
        images = _read_idx(images_path, _IMAGES_MAGIC)
        labels = _read_idx(labels_path, _LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise KDError(
                f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                f"{labels.shape[0]} labels; one of the files is from another split or corrupt"
            )
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise KDError(f"{labels_path} has label {labels.max()} (> 9): the file is corrupt")
        _CACHE[key] = ArrayDataset(
            torch.from_numpy(images[:, None]),  # (N, 1, H, W)
            torch.from_numpy(labels.astype(np.int64)),
            list(FASHION_MNIST_CLASSES),
        )
        logger.info("loaded Fashion-MNIST from %s (%d images)", images_path.parent, len(labels))
    return _CACHE[key]


_MAX_IDX = 64 << 20  # bytes of an idx file, decompressed


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format): big-endian magic, dims, then uint8 data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read(_MAX_IDX + 1)  # a .gz bomb decompresses no further than this
    except (OSError, EOFError, zlib.error) as exc:
        raise KDError(f"cannot read {path} ({exc}); the file is corrupt, reinstall it") from exc
    if len(raw) > _MAX_IDX:
        raise KDError(
            f"{path} holds more than {_MAX_IDX:,} bytes (Fashion-MNIST's largest file has "
            "47,040,016); the file is not Fashion-MNIST"
        )
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else "nothing"
        raise KDError(
            f"{path} is not an idx file of the expected kind (magic {magic:#010x}, found "
            f"{found}); the file is corrupt or misnamed"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) + header
    if len(raw) != expected:
        raise KDError(
            f"{path} is {len(raw)} bytes but its header {dims} implies {expected}; the file is "
            "truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()
