"""Cross-field rules a type cannot say: model strings, loss/optimizer/scheduler names and
their arguments, the data sources, and (optionally) that every named file exists. Imports
torch and kdkit.losses to read names and signatures; builds nothing."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdkit._device import check_device
from kdkit.config.schema import (
    MODEL_PREFIXES,
    TEACHER_ONLY_PREFIXES,
    RunConfig,
    SourceConfig,
    TrainConfig,
)
from kdkit.errors import KDError, closest_names

__all__ = [
    "check_classify",
    "check_name",
    "check_path",
    "check_train_section",
    "looks_like_path",
]

# -- cross-field validation -----------------------------------------------------------------


def _model_string(model: str, key: str, *, teacher: bool, check_paths: bool = True) -> None:
    prefix, sep, name = model.partition(":")
    if looks_like_path(model):
        if check_paths and not Path(model).expanduser().exists():
            raise KDError(f"config key {key!r}: no kdkit checkpoint or run directory at {model}")
        return
    allowed = MODEL_PREFIXES + (TEACHER_ONLY_PREFIXES if teacher else ())
    if not sep or prefix not in allowed or not name:
        hint = ""
        if sep and prefix in TEACHER_ONLY_PREFIXES:
            hint = f"; {prefix}: is for the teacher only"
        elif sep and prefix:
            close = closest_names(prefix, allowed, 1)
            hint = f"; did you mean '{close[0]}:{name}'?" if close else ""
        raise KDError(
            f"config key {key!r} expects 'PREFIX:NAME' with PREFIX in {list(allowed)} or a "
            f"path to a kdkit checkpoint / run directory, got {model!r}{hint}"
        )
    if prefix in TEACHER_ONLY_PREFIXES:
        if check_paths and not Path(name).expanduser().exists():
            raise KDError(f"config key {key!r}: {prefix}:{name} does not exist")
        return
    if prefix in ("kdkit", "torchvision"):  # cheap to list; timm/open_clip are checked at build
        from kdkit.registry import list_models

        names = list_models(prefix)
        if name not in names:
            raise KDError(
                f"config key {key!r}: no model {name!r} under {prefix}:; did you mean "
                f"{closest_names(name, names, 1)[0]!r}?"
            )


#: model keyword arguments that are sizes: a class count or channel count below 1 builds no
#: model (torch raises deep inside the constructor)
_SIZE_KWARGS = ("num_classes", "in_channels", "in_chans")


def _check_sizes(kwargs: Mapping[str, Any], key: str) -> None:
    for name in _SIZE_KWARGS:
        value = kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KDError(f"config key '{key}.{name}' expects an integer >= 1, got {value!r}")


def looks_like_path(model: str) -> bool:
    return (
        model.endswith((".pt", ".pth", ".ckpt"))
        or os.sep in model.partition(":")[0]
        or (":" not in model and (os.sep in model or Path(model).exists()))
    )


def _check_args(cls: Any, args: Mapping[str, Any], key: str) -> None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for name in args:
        if name not in params:
            close = closest_names(name, list(params), 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KDError(
                f"unknown config key '{key}.{name}': {cls.__name__} takes {sorted(params)}{hint}"
            )


def check_path(path: str | None, key: str, *, folder: bool = False) -> None:
    if path is None:
        return
    p = Path(path)
    ok = p.is_dir() if folder else p.exists()
    if not ok:
        raise KDError(f"config key {key!r}: no {'folder' if folder else 'file'} at {path}")


def _check_source(src: SourceConfig, key: str, *, allow_split: bool) -> None:
    names = ("image_folder", "fashion_mnist", "stl10", "split")
    given = [n for n in names if getattr(src, n) is not None]
    if len(given) != 1:
        options = "image_folder, fashion_mnist, stl10" + (" or split" if allow_split else "")
        raise KDError(f"config key {key!r} needs exactly one of {options}, got {given or 'none'}")
    if (src.stl10 is None) != (src.root is None):
        raise KDError(
            f"config key '{key}': stl10 needs root (the folder of train_X.bin ...) and root "
            f"is only for stl10, e.g. {{stl10: train+unlabeled, root: data/stl10}}"
        )
    if src.split is not None and not allow_split:
        raise KDError(f"config key '{key}.split' is only for data.val (a part carved from train)")


def check_classify(cfg: RunConfig, check_paths: bool = True) -> None:
    """The ``task: classify`` rules: model strings, teacher, data sources, views, loss pairs and
    their arguments, the train section, and (``check_paths``) every file and folder named.
    Imports torch and kdkit.losses, builds nothing."""
    from kdkit.losses import LOSSES

    if cfg.train.fsdp:
        raise KDError(
            "config key 'train.fsdp' shards language models (task: lm); an image student "
            "trains with DDP under torchrun, no key needed"
        )
    if cfg.train.gradient_checkpointing:
        raise KDError(
            "config key 'train.gradient_checkpointing' recomputes a language model's decoder "
            "layers (task: lm); an image student has no such switch here"
        )
    _model_string(cfg.student.model, "student.model", teacher=False, check_paths=check_paths)
    _check_sizes(cfg.student.kwargs, "student.kwargs")
    if cfg.teacher is not None:
        _check_teacher(cfg, check_paths)
        _check_sizes(cfg.teacher.kwargs, "teacher.kwargs")
    d = cfg.data
    if cfg.teacher is None and d.unlabeled:  # data.labeled alone: those images, no others
        raise KDError(
            "config key 'data.unlabeled': unlabeled images only train through a teacher, and "
            "this config has none (teacher: null); add a teacher: section or drop the key"
        )
    _check_source(d.train, "data.train", allow_split=False)
    if d.val is not None:
        _check_source(d.val, "data.val", allow_split=True)
    if d.train.image_folder is None and d.unlabeled:
        raise KDError("config key 'data.unlabeled' (image folders) needs data.train.image_folder")
    for name, v in (("mean", d.mean), ("std", d.std)):
        if v is not None and len(v) not in (1, 3):
            raise KDError(f"config key 'data.{name}' expects 1 or 3 numbers, got {list(v)}")
        if v is not None and not all(math.isfinite(x) and (name == "mean" or x > 0) for x in v):
            what = "finite numbers" if name == "mean" else "numbers > 0 (it divides the pixels)"
            raise KDError(f"config key 'data.{name}' expects {what}, got {list(v)}")
        if v is not None and len(v) == 3 and d.train.fashion_mnist is not None:
            raise KDError(
                f"config key 'data.{name}' has 3 values but Fashion-MNIST images have 1 channel "
                f"(grey); give one value, e.g. {name}: [{v[0]}]"
            )
    views = d.views
    if views is not None and views.crop == "pad" and d.image_size and views.pad >= d.image_size:
        raise KDError(
            f"config key 'data.views.pad' ({views.pad}) must be below data.image_size "
            f"({d.image_size}), or a view could hold no pixel of the image"
        )
    if not cfg.distill.pairs:
        raise KDError("config key 'distill.pairs' is empty: name at least one loss pair")
    seen: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(cfg.distill.pairs):
        key = f"distill.pairs.{i}"
        if (pair.student, pair.teacher) in seen:
            raise KDError(
                f"config key {key!r} repeats the layers of distill.pairs."
                f"{seen[(pair.student, pair.teacher)]} ({pair.student!r}, {pair.teacher!r}); "
                "one loss per pair of layers"
            )
        seen[(pair.student, pair.teacher)] = i
        if pair.loss.startswith("python:"):
            continue
        if pair.loss not in LOSSES:
            close = closest_names(pair.loss, list(LOSSES), 1)
            raise KDError(
                f"config key '{key}.loss' expects one of {sorted(LOSSES)} or "
                f"python:pkg.module:Class, got {pair.loss!r}; did you mean {close[0]!r}?"
            )
        _check_args(LOSSES[pair.loss], pair.args, f"{key}.args")
    t = cfg.train
    if cfg.distill.start_epoch >= t.epochs:
        raise KDError(
            f"config key 'distill.start_epoch' ({cfg.distill.start_epoch}) must be below "
            f"train.epochs ({t.epochs}), or no epoch would distill"
        )
    check_train_section(t)
    if check_paths:
        for src, key in ((d.train, "data.train"), (d.val, "data.val")):
            if src is not None:
                check_path(src.image_folder, f"{key}.image_folder", folder=True)
                check_path(src.root, f"{key}.root", folder=True)
        if cfg.teacher is not None:
            check_path(cfg.teacher.weights, "teacher.weights")
            check_path(cfg.teacher.probe, "teacher.probe")
        check_path(cfg.student.weights, "student.weights")
        for i, folder in enumerate(d.unlabeled):
            check_path(folder, f"data.unlabeled.{i}", folder=True)


def _check_teacher(cfg: RunConfig, check_paths: bool) -> None:
    t = cfg.teacher
    _model_string(t.model, "teacher.model", teacher=True, check_paths=check_paths)
    if t.backend == "tensorrt" and not t.model.startswith(("onnx:", "tensorrt:")):
        raise KDError(
            "config key 'teacher.backend': tensorrt builds from an ONNX file; set teacher.model "
            "to onnx:PATH (export the teacher first) or tensorrt:ENGINE"
        )
    if t.zero_shot is not None and not t.model.startswith("open_clip:"):
        raise KDError("config key 'teacher.zero_shot' applies to open_clip: teachers only")
    # precision int8 with backend torch: int8 runs through ONNX Runtime; the builder picks it


def check_name(name: str) -> None:
    """A run's name is the default run directory's name: one non-empty path component."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name:
        raise KDError(
            f"config key 'name' expects a non-empty name without '/' (it names runs/NAME), "
            f"got {name!r}"
        )


def _try_optimizer_and_scheduler(t: TrainConfig) -> None:
    """Build the optimizer and scheduler on one dummy parameter and step them a few times,
    so a bad argument (a negative momentum, ``step_size: 0``, ``gamma: x``) is a config
    error now rather than a traceback after the data and models were built."""
    import torch

    from kdkit._optim import optimizer_factory, scheduler_factory

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = optimizer_factory(t.optimizer)([param])
    make = scheduler_factory(t.scheduler, t.epochs, t.optimizer.lr, 4)
    if make is None:
        return
    scheduler = make(optimizer)
    try:
        optimizer.step()
        scheduler.step()
    except Exception as err:  # noqa: BLE001 - any failure here is the arguments' fault
        raise KDError(
            f"config key 'train.scheduler.args': {t.scheduler.name}({dict(t.scheduler.args)}) "
            f"fails when stepped ({type(err).__name__}: {err}); check its arguments"
        ) from None


def check_train_section(t: TrainConfig) -> None:
    """The ``train:`` section's device, optimizer and scheduler names and args (every task)."""
    import torch

    check_device(t.device, "config key 'train.device'")

    optimizers = [
        n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type) and n[0].isupper()
    ]
    if t.optimizer.name not in optimizers or t.optimizer.name == "Optimizer":
        same = [n for n in optimizers if n.lower() == t.optimizer.name.lower()]
        close = same or closest_names(t.optimizer.name, optimizers, 1)
        raise KDError(
            f"config key 'train.optimizer.name': torch.optim has no {t.optimizer.name!r}; "
            f"did you mean {close[0]!r}?"
        )
    _check_args(getattr(torch.optim, t.optimizer.name), t.optimizer.args, "train.optimizer.args")
    if t.scheduler.name is not None:
        sched = torch.optim.lr_scheduler
        names = [  # ReduceLROnPlateau is left out: its step() needs a metric
            n
            for n, o in vars(sched).items()
            if isinstance(o, type)
            and issubclass(o, sched.LRScheduler)
            and n[0] != "_"
            and n not in ("LRScheduler", "ReduceLROnPlateau")
        ]
        if t.scheduler.name not in names:
            close = closest_names(t.scheduler.name, names, 1)
            raise KDError(
                f"config key 'train.scheduler.name': torch.optim.lr_scheduler has no "
                f"{t.scheduler.name!r}; did you mean {close[0]!r}?"
            )
        _check_args(getattr(sched, t.scheduler.name), t.scheduler.args, "train.scheduler.args")
    _try_optimizer_and_scheduler(t)
