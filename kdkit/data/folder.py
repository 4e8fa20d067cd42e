"""Image-folder datasets in the ImageNet layout, with train and validation loaders.

``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``. Loaders yield uint8 batches
``(images (B, 3, H, W), labels, indices)``; normalisation with :attr:`ImageFolderManager.mean`
and ``.std`` happens on the device (:func:`~kdkit.data.to_float`). Decoding here is PIL on CPU
worker processes, which caps throughput at a few hundred images/s per core (see DESIGN.md);
it is the simple, portable path, not the fast one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from kdkit.data.arrays import Batch
from kdkit.data.bytes_loader import folder_loaders
from kdkit.data.pixels import pil_to_rgb
from kdkit.data.unreadable import Unreadable, UnreadableLog, split_unreadable
from kdkit.errors import KDError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "ImageFolderManager",
    "UnlabeledFolderDataset",
    "find_images",
    "shard_sampler",
    "scan_folder",
    "collate_items",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _layout(root: Path, train_dir: str, val_dir: str) -> str:
    return (
        "expected an ImageNet-style tree:\n"
        f"  {root}/{train_dir}/<class_name>/<image>.jpg (or .png, .jpeg, .webp, .bmp)\n"
        f"  {root}/{val_dir}/<class_name>/<image>.jpg\n"
        "with one folder per class, the same class names in both."
    )


def scan_folder(split_dir: Path, layout: str) -> dict[str, list[Path]]:
    """Map class name -> sorted image files; an error for anything off the expected layout.

    Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``) are skipped: a hidden folder taken
    as class 0 would shift every label. Skipped entries (hidden, not an image) are logged once
    with their counts. An empty image file is kept: the loaders meet it as an unreadable
    file and count it with the others (``skipped_files`` in metrics.csv, report.md).
    """
    if not split_dir.is_dir():
        raise KDError(f"no folder {split_dir}; {layout}")
    skipped = {"hidden": 0, "not an image": 0}
    skipped["not a regular file (FIFO, socket, device)"] = 0
    entries = list(os.scandir(split_dir))
    skipped["hidden"] += sum(e.name.startswith(".") for e in entries)
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise KDError(f"{split_dir} has no class folders; {layout}")
    files: dict[str, list[Path]] = {}
    for name in classes:
        class_dir = split_dir / name
        images = []
        for e in os.scandir(class_dir):
            if e.name.startswith("."):
                skipped["hidden"] += 1
            elif e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.is_file() and not e.is_dir():
                skipped["not a regular file (FIFO, socket, device)"] += 1  # opening would block
            elif not (e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)):
                skipped["not an image"] += 1
            else:
                images.append(class_dir / e.name)
        if not images:
            raise KDError(f"class folder {class_dir} holds no images; {layout}")
        files[name] = sorted(images)
    counts = ", ".join(f"{n} {what}" for what, n in skipped.items() if n)
    if counts:
        log.warning("%s: skipped %s", split_dir, counts)
    return files


class ImageFolderDataset(Dataset):
    """Image files with labels; item ``i`` is ``(uint8 image (3, H, W), label, i)``.

    Args:
        samples: ``(path, label)`` pairs; the position is the sample's index.
        classes: class names, ``classes[label]``.
        transform: applied to the PIL image; must end in a uint8 CHW tensor.
        draft_size: for JPEGs, let the decoder skip detail below this (width, height), which
            makes decoding several times faster when images are much larger than needed.
        skip_unreadable: a file that does not decode becomes an
            :class:`~kdkit.data.unreadable.Unreadable` item (the loaders of ``kdkit train``
            drop and count it) instead of a :class:`KDError`.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        draft_size: tuple[int, int] | None = None,
        *,
        skip_unreadable: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.draft_size = draft_size
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | Unreadable:
        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                if self.draft_size is not None:
                    image.draft("RGB", self.draft_size)  # no-op for formats other than JPEG
                rgb = pil_to_rgb(image, path)  # 16-bit by value range; bombs refused
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            if self.skip_unreadable:
                return Unreadable(str(path), _reason(exc))
            raise KDError(f"cannot decode image {path}: {exc}") from None
        except KDError as exc:  # refused by its header (a decompression bomb)
            if self.skip_unreadable:
                return Unreadable(str(path), str(exc))
            raise
        return self.transform(rgb), label, i


def _reason(exc: BaseException) -> str:
    """PIL's message without the file name it repeats (``cannot identify image file '...'``)."""
    text = str(exc).split(" '", 1)[0].split(" <", 1)[0]
    return text or type(exc).__name__


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` at any depth, sorted; hidden files and folders
    (``.name``, e.g. ``.DS_Store``, ``.ipynb_checkpoints``) are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise KDError(f"no folder {root} (expected a folder of images, at any depth)")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".")
            and f.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.isfile(os.path.join(dirpath, f))  # a FIFO named x.jpg would block
        ]
    if not found:
        raise KDError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


class UnlabeledFolderDataset(ImageFolderDataset):
    """A flat folder of unlabeled images (any depth, no class folders): every label is -1,
    so only the distillation loss sees them (darklight's "wild" images)."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        draft_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__([(p, -1) for p in find_images(root)], [], transform, draft_size)


def shard_sampler(dataset: Dataset, seed: int, drop_last: bool) -> DistributedSampler | None:
    """A shuffling DistributedSampler when torch.distributed runs more than one process, else
    None (then shuffle as usual): each rank reads its own shard; call ``set_epoch`` on it
    every epoch (the Trainer does) or every epoch repeats the same order."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)


def collate_items(items: list[tuple[torch.Tensor, int, int]]) -> Batch:
    items, bad = split_unreadable(items)  # a loader without a log of its own: named here
    for f in bad:
        log.warning("skipping unreadable image %s (%s)", f.path, f.reason)
    if not items:  # a wholly unreadable batch (a lone stray file: an empty batch)
        UnreadableLog().record(bad, kept=0)
        return Batch(*(torch.empty(0, dtype=t) for t in (torch.uint8, torch.int64, torch.int64)))
    images, labels, indices = zip(*items, strict=True)
    return Batch(
        torch.stack(images),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(indices, dtype=torch.int64),
    )


class ImageFolderManager:
    """Train and validation loaders over an ImageNet-layout folder (darklight-compatible).

    Args:
        root: folder holding ``train/`` and ``val/`` (names configurable).
        size: output (height, width), or one int for square images.
        batch_size: images per batch (``bsize`` is accepted as an alias).
        workers: DataLoader worker processes (``num_workers`` is an alias).
        seed: seeds the training shuffle and the workers' augmentation.
        crop_pct: evaluation resizes the shorter side to ``max(size) / crop_pct`` and then
            center-crops ``size`` (the standard 0.875 = 224/256).
        drop_last: drop the incomplete last training batch (validation keeps everything).
        decode: ``"pil"`` (default): PIL decodes, RandomResizedCrop + flip augment, in the
            workers. ``"cpu"`` / ``"gpu"`` / ``"auto"`` (gpu on CUDA, else cpu): workers read
            bytes; torchvision's CPU decoders (in the workers) or batched nvJPEG (on
            ``device``) decode; training batches come at ``work_size`` (default square
            ``max(size) / crop_pct``) on ``device`` without augmentation, so pass
            ``views=ViewSampler(size=size)`` to the Trainer (see :mod:`kdkit.data.decode`).

    Training augmentation (``decode="pil"``) is RandomResizedCrop + horizontal flip; both
    loaders yield :class:`~kdkit.data.Batch` ``(uint8 images, int64 labels, int64 indices)``.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | Sequence[int] = (224, 224),
        batch_size: int = 128,
        workers: int = 2,
        *,
        bsize: int | None = None,
        num_workers: int | None = None,
        seed: int = 0,
        crop_pct: float = 0.875,
        drop_last: bool = True,
        train_dir: str = "train",
        val_dir: str = "val",
        decode: str = "pil",
        device: str | torch.device | None = None,
        work_size: int | Sequence[int] | None = None,
    ) -> None:
        batch_size = bsize if bsize is not None else batch_size
        workers = num_workers if num_workers is not None else workers
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if batch_size < 1 or workers < 0 or min(height, width) < 1 or not 0 < crop_pct <= 1:
            raise KDError(
                f"need batch_size >= 1, workers >= 0, a positive size and 0 < crop_pct <= 1; "
                f"got {batch_size=}, {workers=}, size={(height, width)}, {crop_pct=}"
            )
        self.root = Path(root)
        self.size = (height, width)
        self.batch_size = batch_size
        self.workers = workers
        layout = _layout(self.root, train_dir, val_dir)
        if not self.root.is_dir():
            raise KDError(f"image folder root {self.root} does not exist; {layout}")
        train_files = scan_folder(self.root / train_dir, layout)
        val_files = scan_folder(self.root / val_dir, layout)
        unknown = sorted(set(val_files) - set(train_files))
        if unknown:
            raise KDError(
                f"{self.root / val_dir} has classes missing from {train_dir}/: "
                f"{unknown[:5]}; {layout}"
            )
        self.classes = list(train_files)
        self.num_classes = len(self.classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.decode = decode
        if decode != "pil":  # bytes in the workers, batched decode (kdkit.data.bytes_loader)
            self.train_loader, self.val_loader = folder_loaders(
                self._samples(train_files),
                self._samples(val_files),
                self.classes,
                self.size,
                decode=decode,
                device=device,
                work_size=work_size,
                crop_pct=crop_pct,
                batch_size=batch_size,
                workers=workers,
                seed=seed,
                drop_last=drop_last,
            )
            self.train_dataset = self.train_loader.dataset
            self.val_dataset = self.val_loader.dataset
            return

        resize_to = round(max(height, width) / crop_pct)
        self.train_dataset = ImageFolderDataset(
            self._samples(train_files), self.classes, self.train_transform(), skip_unreadable=True
        )
        self.val_dataset = ImageFolderDataset(
            self._samples(val_files),
            self.classes,
            self.eval_transform(crop_pct),
            draft_size=(resize_to, resize_to),
            skip_unreadable=True,
        )
        common = dict(
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate_items,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )
        # Under DDP each rank reads its own shard of the training set (the Trainer calls
        # sampler.set_epoch each epoch); every rank evaluates the whole val set, so all
        # ranks agree on val top-1 and on which epoch is best.
        sampler = shard_sampler(self.train_dataset, seed, drop_last)
        self.train_loader = DataLoader(
            self.train_dataset,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
            **common,
        )
        self.val_loader = DataLoader(self.val_dataset, shuffle=False, **common)

    @property
    def valid_loader(self) -> DataLoader:
        """darklight's name for :attr:`val_loader`."""
        return self.val_loader

    def _samples(self, files: dict[str, list[Path]]) -> list[tuple[Path, int]]:
        return [(p, self.class_to_idx[name]) for name, paths in files.items() for p in paths]

    def train_transform(self) -> v2.Compose:
        """PIL image -> uint8 (3, H, W): random resized crop and horizontal flip."""
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.size, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.PILToTensor(),
            ]
        )

    def eval_transform(self, crop_pct: float = 0.875) -> v2.Compose:
        """PIL image -> uint8 (3, H, W): resize the shorter side to ``max(size) / crop_pct``,
        then center-crop ``size``."""
        resize_to = round(max(self.size) / crop_pct)
        return v2.Compose(
            [v2.Resize(resize_to, antialias=True), v2.CenterCrop(self.size), v2.PILToTensor()]
        )
