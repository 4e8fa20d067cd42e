"""Config ``data:`` section -> training and validation loaders.

Fashion-MNIST lives in memory (:class:`~kdkit.data.FastLoader`); image folders stream from
disk (:class:`~kdkit.data.epoch_loader.EpochLoader`), each image decoded to ``image_size``
(shorter side resized, center crop) as uint8. Augmentation is not done here: the
:class:`~kdkit.data.ViewSampler` built from ``data.views`` crops and flips on the device, the
same view for teacher and student, as a pure function of (seed, epoch, index), which is what
makes a killed run resume to the same weights.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.config import DataConfig, RunConfig, SourceConfig, ViewsConfig
from kdkit.errors import KDError

__all__ = ["RunData", "build_data", "build_views", "eval_transform", "run_views"]

log = logging.getLogger(__name__)

_FOLDER_LAYOUT = "expected <folder>/<class_name>/<image>.jpg (one folder per class)"


@dataclass
class RunData:
    """Loaders plus what the models need to know about the images."""

    train_loader: Any
    val_loader: Any | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    classes: list[str] | None
    train_dataset: Any
    #: an image-folder run's ``val: {split: F}`` members, relative to the training folder:
    #: recorded in the run's checkpoints so ``kdkit eval`` scores the same images later
    val_files: list[str] | None = None


def build_views(
    views: DataConfig | ViewsConfig | None, seed: int, size: int, *, flip_p: float | None = None
):
    """The device-side augmentation of a ``data.views`` section (None when disabled): the one
    ViewSampler builder of every front door (``kdkit train``, ``kdkit precompute``, the demo).
    ``flip_p`` overrides the flip probability (``flip: true`` is 0.5)."""
    from kdkit.data.views import ViewSampler

    v = views.views if isinstance(views, DataConfig) else views
    p = (0.5 if v.flip else 0.0) if v is not None and flip_p is None else flip_p
    if v is None or (v.crop == "none" and not p and not (v.mixup or v.cutmix)):
        return None
    return ViewSampler(
        seed=seed,
        num_views=v.num_views,
        crop=v.crop,
        scale=tuple(v.scale),
        pad=v.pad,
        size=size,
        flip_p=p,
        mixup=v.mixup,
        cutmix=v.cutmix,
    )


class _ToMode:
    """PIL image -> ``mode`` (grey, RGBA and palette photos become the model's channels)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):
        return image if image.mode == self.mode else image.convert(self.mode)


def build_data(
    d: DataConfig,
    *,
    seed: int,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = False,
    classes: list[str] | None = None,
    val_files: list[str] | None = None,
    keep_unlabeled: bool = True,
) -> RunData:
    """Loaders for ``d``; ``seed`` (``train.seed``) orders the batches, ``d.seed`` the splits.

    ``keep_unlabeled``: the training images ``d.labeled`` hides stay in the loader as
    unlabeled rows (label -1) for a teacher; False drops them, so a run with no teacher
    (``teacher: null``) trains on the ``d.labeled`` images alone (the scratch baseline of a
    KD run, with the same labels chosen by the same ``d.seed``).

    ``drop_last`` (the run builder sets it when ``train.compile`` is on) drops the partial
    last training batch, which a compiled student would otherwise compile again for, when
    the data holds at least one whole batch per rank. ``classes``: the label order of image
    folders when it is known already (a checkpoint's class names: ``kdkit eval`` on a folder
    that lacks some classes keeps their indices). ``val_files``: the members a run's
    ``val: {split: F}`` had when it trained (:attr:`RunData.val_files`, from its checkpoint):
    the split is those images, not a new carve of a folder that has changed since."""
    if d.train.fashion_mnist is not None or d.train.stl10 is not None:
        return _arrays(d, seed, rank, world, drop_last, keep_unlabeled)
    return _folders(d, seed, rank, world, drop_last, classes, keep_unlabeled, val_files)


def _drop_last(wanted: bool, n: int, batch_size: int, world: int) -> bool:
    return wanted and n >= batch_size * world


def eval_transform(size: int, channels: int = 3):
    """PIL image -> uint8 (C, size, size): shorter side resized to ``size``, center crop. What
    every image-folder run trains and evaluates on (augmentation is on the device), and what
    ``kdkit predict`` applies to a photo."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            _ToMode("L" if channels == 1 else "RGB"),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.PILToTensor(),
        ]
    )


# -- in-memory / memory-mapped arrays: Fashion-MNIST, STL-10 --------------------------------


@dataclass(frozen=True)
class _ArraySource:
    """What differs between the array datasets: how to load a split, and their constants."""

    name: str
    load: Any  # (SourceConfig) -> ArrayDataset
    size: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]


def _array_source(src: SourceConfig) -> _ArraySource:
    from kdkit import data

    if src.fashion_mnist is not None:
        return _ArraySource(
            "fashion_mnist",
            lambda s: data.load_fashion_mnist(s.fashion_mnist),
            28,
            (1, 28, 28),
            data.FASHION_MNIST_MEAN,
            data.FASHION_MNIST_STD,
            list(data.FASHION_MNIST_CLASSES),
        )
    return _ArraySource(
        "stl10",
        lambda s: data.load_stl10(s.root, s.stl10),
        96,
        (3, 96, 96),
        data.IMAGENET_MEAN,
        data.IMAGENET_STD,
        list(data.STL10_CLASSES),
    )


def _arrays(
    d: DataConfig, seed: int, rank: int, world: int, drop_last: bool, keep_unlabeled: bool
) -> RunData:
    from kdkit.data import FastLoader, concat, holdout, split_labeled

    source = _array_source(d.train)
    if d.image_size not in (None, source.size):
        raise KDError(
            f"config key 'data.image_size': {source.name} images are {source.size} px, "
            f"got {d.image_size}"
        )
    train = source.load(d.train)
    val = None
    if d.val is not None:
        if d.val.split is not None:
            train, val = holdout(train, max(1, round(d.val.split * len(train))), seed=d.seed)
        elif getattr(d.val, source.name) is not None:
            val = source.load(d.val)
        else:
            raise KDError(
                f"config key 'data.val': a {source.name} run validates on {source.name} "
                f"(or {{split: F}}), got {source_of(d.val)}"
            )
    if d.labeled is not None:
        _check_labeled(d.labeled, len(train))
        labeled, unlabeled = split_labeled(train, d.labeled, seed=d.seed)
        train = concat(labeled, unlabeled) if len(unlabeled) and keep_unlabeled else labeled
    drop = _drop_last(drop_last, len(train), d.batch_size, world)
    loader = FastLoader(
        train, d.batch_size, True, drop, seed=seed, num_replicas=world, rank=rank
    )  # fmt: skip
    val_loader = None if val is None else FastLoader(val, d.val_batch_size or d.batch_size, False)
    return RunData(
        loader,
        val_loader,
        tuple(d.mean or source.mean),
        tuple(d.std or source.std),
        source.shape,
        source.classes,
        train,
    )


def _check_labeled(n: int, total: int) -> None:
    if n > total:
        raise KDError(f"config key 'data.labeled' is {n} but the training set has {total} images")


# -- image folders --------------------------------------------------------------------------


def _classes(folder: str) -> dict[str, list[Path]]:
    from kdkit.data.folder import scan_folder

    return scan_folder(Path(folder), _FOLDER_LAYOUT)


def _carve(
    samples: list[tuple[Path, int]], fraction: float, gen: torch.Generator
) -> tuple[list, list]:
    """Per class, ``fraction`` of the samples (at least one of classes with two or more)."""
    keep, carved = [], []
    for label in sorted({y for _, y in samples}):
        rows = [s for s in samples if s[1] == label]
        k = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        pick = set(torch.randperm(len(rows), generator=gen)[:k].tolist())
        carved += [r for i, r in enumerate(rows) if i in pick]
        keep += [r for i, r in enumerate(rows) if i not in pick]
    return keep, carved


def _recorded_split(
    samples: list[tuple[Path, int]], root: str, members: list[str]
) -> tuple[list, list]:
    """The split a run recorded: its members (paths relative to ``root``) and the rest."""
    wanted = set(members)
    keep, carved = [], []
    for sample in samples:
        (carved if Path(sample[0]).relative_to(root).as_posix() in wanted else keep).append(sample)
    if len(carved) != len(wanted):
        raise KDError(
            f"{len(wanted) - len(carved)} of the {len(wanted)} images the run validated on "
            f"(val: split) are no longer in {root}; score it on a folder with --data "
            "val.image_folder=DIR"
        )
    return keep, carved


def _folders(
    d: DataConfig,
    seed: int,
    rank: int,
    world: int,
    drop_last: bool,
    known: list[str] | None,
    keep_unlabeled: bool,
    members: list[str] | None = None,
) -> RunData:
    from kdkit.data import IMAGENET_MEAN, IMAGENET_STD
    from kdkit.data.epoch_loader import EpochLoader
    from kdkit.data.folder import ImageFolderDataset, collate_items, find_images

    size = d.image_size or 224
    transform = eval_transform(size)
    files = _classes(d.train.image_folder)
    classes = list(known) if known else list(files)
    index = {c: i for i, c in enumerate(classes)}
    _check_known(d.train.image_folder, files, classes)
    samples = [(p, index[c]) for c, paths in files.items() for p in paths]
    gen = torch.Generator().manual_seed(d.seed)
    val_samples, split_files = None, None
    if d.val is not None:
        if d.val.split is not None and members is not None:
            samples, val_samples = _recorded_split(samples, d.train.image_folder, members)
        elif d.val.split is not None:
            samples, val_samples = _carve(samples, d.val.split, gen)
        if d.val.split is not None:
            root = d.train.image_folder
            split_files = sorted(Path(p).relative_to(root).as_posix() for p, _ in val_samples)
        elif d.val.image_folder is not None:
            val_files = _classes(d.val.image_folder)
            _check_known(d.val.image_folder, val_files, classes, d.train.image_folder)
            val_samples = [(p, index[c]) for c, paths in val_files.items() for p in paths]
        else:
            raise KDError(
                f"config key 'data.val': {source_of(d.val)} cannot validate an image-folder run"
            )
    if d.labeled is not None:
        _check_labeled(d.labeled, len(samples))
        keep = set(torch.randperm(len(samples), generator=gen)[: d.labeled].tolist())
        samples = [(p, y if i in keep else -1) for i, (p, y) in enumerate(samples)]
        if not keep_unlabeled:
            samples = [(p, y) for p, y in samples if y >= 0]
    for folder in d.unlabeled:
        samples += [(p, -1) for p in find_images(folder)]
    draft = (size, size)
    train = ImageFolderDataset(samples, classes, transform, draft_size=draft, skip_unreadable=True)
    drop = _drop_last(drop_last, len(train), d.batch_size, world)
    loader = EpochLoader(
        train, d.batch_size, True, drop, seed, workers=d.workers, collate_fn=collate_items,
        num_replicas=world, rank=rank,
    )  # fmt: skip
    val_loader = None
    if val_samples:
        val = ImageFolderDataset(
            val_samples, classes, transform, draft_size=draft, skip_unreadable=True
        )
        val_loader = EpochLoader(
            val,
            d.val_batch_size or d.batch_size,
            False,
            workers=d.workers,
            collate_fn=collate_items,
        )
    log.info(
        "data: %d training images (%d labeled), %d validation, %d classes, %d px",
        len(train),
        sum(y >= 0 for _, y in samples),
        len(val_samples or ()),
        len(classes),
        size,
    )
    return RunData(
        loader,
        val_loader,
        tuple(d.mean or IMAGENET_MEAN),
        tuple(d.std or IMAGENET_STD),
        (3, size, size),
        classes,
        train,
        split_files,
    )


def _check_known(folder: str, files: dict, classes: list[str], train: str | None = None) -> None:
    unknown = sorted(set(files) - set(classes))
    if unknown:
        where = train or "the checkpoint's class names"
        raise KDError(f"{folder} has classes missing from {where}: {unknown[:5]}")


def source_of(src: SourceConfig | None) -> str:
    """A short description of a source for reports."""
    if src is None:
        return "none"
    if src.image_folder is not None:
        return src.image_folder
    if src.fashion_mnist is not None:
        return f"Fashion-MNIST {src.fashion_mnist}"
    if src.stl10 is not None:
        return f"STL-10 {src.stl10} ({src.root})"
    return f"{src.split:.0%} of train"


def run_views(cfg: RunConfig):
    """The run's ``data.views``; with a ``cache:`` teacher and no ``num_views`` set, the
    cache's own number of views (the config need not repeat what the cache says)."""
    v = cfg.data.views
    model = cfg.teacher.model if cfg.teacher is not None else ""
    prefix, _, cache_dir = model.partition(":")
    if v is not None and v.num_views is None and prefix == "cache":
        from kdkit.cache import read_meta

        meta = read_meta(cache_dir)
        if meta.get("views") is not None:
            v = dataclasses.replace(v, num_views=int(meta["num_views"]))
    return v
