"""``kdkit precompute CONFIG`` / ``kdkit cache check CONFIG``: a teacher cache from the very
config ``kdkit train`` reads.

The cache must replay what the run would have computed: the same teacher (model, kwargs,
weights, precision), the same training images in the same order (image folders with their
unlabeled folders, STL-10, Fashion-MNIST), the same normalisation and the same views
(``data.views`` with ``train.seed`` as the view seed). Building all of them through the run's
own builders (:mod:`kdkit.run.data`, :mod:`kdkit.run.models`) is what makes the cache fit the
run by construction. The cache records the config it was made from (``source.config``), so
``kdkit cache check`` of a training config whose teacher is ``cache:DIR`` can rebuild the
live teacher from it.

Unreadable image files (skipped by the training loaders) get a black placeholder row: the
row exists, so indices keep their meaning, and training never reads it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from kdkit._device import check_device
from kdkit.config import RunConfig, TeacherConfig, to_dict
from kdkit.data.unreadable import Unreadable, UnreadableLog
from kdkit.errors import KDError
from kdkit.run.data import build_data, build_views, run_views
from kdkit.run.models import live_teacher, run_teacher
from kdkit.run.recipes.base import default_cache_dir

__all__ = [
    "DATASETS",
    "CachePlan",
    "cache_plan",
    "default_cache_dir",
    "live_teacher_config",
    "load_teacher_file",
    "named_dataset",
]

#: the datasets the older flags name (``--data fashion-mnist:train``)
DATASETS = ("fashion-mnist",)

log = logging.getLogger(__name__)


class _Placeholders(torch.utils.data.Dataset):
    """``dataset`` with each :class:`Unreadable` item replaced by a black image (same shape as
    the readable ones), counted and named once in :attr:`unreadable`."""

    def __init__(self, dataset: Any, shape: tuple[int, ...]) -> None:
        self.dataset, self.shape = dataset, tuple(shape)
        self.classes = getattr(dataset, "classes", None)
        self.unreadable = UnreadableLog()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if isinstance(item, Unreadable):
            self.unreadable.record([item], kept=1)
            label = int(self.dataset.samples[i][1])
            return torch.zeros(self.shape, dtype=torch.uint8), label, i
        return item


@dataclasses.dataclass
class CachePlan:
    """What a cache of ``cfg`` is computed from: teacher, training dataset, views, mean/std."""

    teacher: Any
    dataset: Any
    views: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: dict[str, Any]
    features: tuple[str, ...] = ()  # the teacher layers the config's pairs name


def live_teacher_config(cfg: RunConfig) -> TeacherConfig:
    """The live teacher of ``cfg``: its ``teacher:`` section, or for a ``cache:DIR`` teacher
    the section recorded in that cache by ``kdkit precompute CONFIG``."""
    if cfg.teacher is None:
        raise KDError("config key 'teacher' is null: a cache needs a teacher to precompute")
    return live_teacher(cfg.teacher)


def cache_plan(cfg: RunConfig, *, num_views: int | None = None, trust_code: bool = False):
    """Teacher, dataset and views of ``cfg``'s run (``num_views`` overrides
    ``data.views.num_views``; a cache stores a fixed number of views per sample), and the
    teacher features its ``distill.pairs`` name (stored beside the logits)."""

    views_cfg = run_views(cfg)
    if views_cfg is not None:
        k = num_views or views_cfg.num_views
        if k is None:
            raise KDError(
                "a cache stores a fixed number of views per sample: set config key "
                "data.views.num_views (or pass --views K)"
            )
        views_cfg = dataclasses.replace(views_cfg, num_views=k)
    elif num_views:
        raise KDError("--views K needs augmentation: the config's data.views is null")
    data = build_data(cfg.data, seed=cfg.train.seed)
    dataset = getattr(data.train_loader, "dataset", data.train_dataset)
    if getattr(dataset, "skip_unreadable", False):
        dataset = _Placeholders(dataset, data.input_shape)
    views = build_views(views_cfg, cfg.train.seed, data.input_shape[-1])
    tc = live_teacher_config(cfg)
    teacher = run_teacher(tc, cfg, data, views, trust_code)
    source = {"config": {**to_dict(cfg), "teacher": to_dict(tc)}}
    features = tuple(dict.fromkeys(p.teacher for p in cfg.distill.pairs if p.teacher))
    return CachePlan(teacher, dataset, views, data.mean, data.std, source, features)


def load_teacher_file(path: str, arch: str, device: str | None, trust_code: bool = False) -> Any:
    """A Teacher for ``path`` (the older flags of ``kdkit precompute`` / ``kdkit cache check``):
    ``.onnx`` / ``.engine`` files and checkpoints that name their model (``<role>_spec``) go
    through :func:`kdkit.make_teacher`; a file holding only
    weights (a kdkit checkpoint without a spec, or a plain state dict) is loaded into
    ``arch``, a registered model spec. Nothing a file names is imported without
    ``trust_code``."""
    import torch

    from kdkit.load import load_weights, spec_from_text
    from kdkit.registry import build_model
    from kdkit.teachers import TorchTeacher, make_teacher

    check_device(device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if path.endswith((".onnx", ".engine", ".plan")):
        return make_teacher(path)
    from kdkit.load import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except KDError as err:
        if "not a kdkit checkpoint" not in str(err):
            raise
        ckpt = None  # a plain state dict: weights for --arch
    if ckpt is not None and any(ckpt.get(f"{r}_spec") for r in ("student", "teacher")):
        return make_teacher(path, trust_code=trust_code).to(device)
    spec = spec_from_text(arch, where="--arch")
    model = build_model(spec, trust_code=trust_code, where="--arch")
    load_weights(model, path)
    return TorchTeacher(model.eval()).to(device)


def named_dataset(spec: str) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """``(dataset, mean, std)`` for ``name[:split]``."""
    name, _, split = spec.partition(":")
    if name not in DATASETS:
        raise KDError(f"unknown dataset {name!r}; available: {list(DATASETS)}")
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

    return load_fashion_mnist(split or "train"), FASHION_MNIST_MEAN, FASHION_MNIST_STD
