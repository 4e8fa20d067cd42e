"""The image demo's recipe in the Python API, for scripts and benchmarks.

``kdkit demo`` runs every row as a ``kdkit train`` config (:mod:`kdkit.run.vision_demo`, whose
names are re-exported here). :func:`train_model` is the same recipe (AdamW, OneCycleLR per
step, the pad-2 + flip views, soft targets at ``cfg.temperature``, evaluation on the data it
is given) with the Trainer built by hand from its typed collaborators: what a benchmark uses
when it swaps in what a config cannot name (a teacher object such as an int8 ONNX session or
an ensemble, a loss object, a subset of the data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.run.vision_demo import (
    INPUT_SHAPE,
    STUDENT_SPEC,
    TEACHER_SPEC,
    DemoConfig,
    DemoRow,
    demo_teacher,
    demo_views,
    run_demo,
    spec_state,
    teacher_files,
    teacher_recipe_fingerprint,
)
from kdkit.teachers.base import Teacher

__all__ = [
    "INPUT_SHAPE",
    "STUDENT_SPEC",
    "TEACHER_SPEC",
    "DemoConfig",
    "DemoRow",
    "demo_teacher",
    "demo_views",
    "fast_teacher",
    "run_demo",
    "spec_state",
    "teacher_files",
    "teacher_recipe_fingerprint",
    "train_model",
]


def train_model(
    model: nn.Module,
    train_set: Any,
    test_set: Any,
    epochs: int,
    cfg: DemoConfig,
    teacher: nn.Module | Teacher | None = None,
    checkpoint_dir: Path | None = None,
    criterion: nn.Module | None = None,
    spec: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Train ``model`` (supervised, or distilled from ``teacher``) with the demo's recipe.

    Returns the per-epoch history and the final test top-1. ``criterion`` defaults to Hinton
    soft targets at ``cfg.temperature``. Seeds torch with ``cfg.seed`` before the Trainer is
    built (the order the data and views are drawn in depends on it alone).
    """
    from kdkit.balance import LossBalancer
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FastLoader
    from kdkit.data.pipeline import InputPipeline
    from kdkit.distiller import Distiller
    from kdkit.losses import SoftTargetKL
    from kdkit.train import LoopOptions, Trainer

    if teacher is not None and criterion is None:
        criterion = SoftTargetKL(temperature=cfg.temperature)
    distiller = Distiller(model, teacher, criterion, LossBalancer())
    train_loader = FastLoader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed)
    test_loader = FastLoader(test_set, 1000, shuffle=False)
    steps = epochs * len(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps)
    channels_last = _channels_last(model, train_loader, cfg)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(
        distiller,
        train_loader,
        test_loader,
        optimizer,
        scheduler,
        options=LoopOptions(
            epochs=epochs, scheduler_interval="step", device="cpu", progress=cfg.progress
        ),
        inputs=InputPipeline(
            demo_views(cfg),
            FASHION_MNIST_MEAN,
            FASHION_MNIST_STD,
            channels_last=channels_last,
            dataset=getattr(train_loader, "dataset", None),
        ),
        checkpoint_dir=checkpoint_dir,
        run_info={"student_spec": spec, "input_shape": INPUT_SHAPE},
    )
    history = trainer.fit(resume="auto" if checkpoint_dir is not None else False)
    return history, history[-1]["val_top1"]


def _channels_last(model: nn.Module, loader: Any, cfg: DemoConfig) -> bool:
    """``cfg.channels_last``, with ``auto`` decided as ``kdkit train`` does: the student's
    step timed in both memory formats on the first batch (:mod:`kdkit.run.autotune`)."""
    if cfg.channels_last != "auto":
        return bool(cfg.channels_last)
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from kdkit.data.pipeline import InputPipeline
    from kdkit.run.autotune import choose_channels_last, first_input

    pipeline = InputPipeline(demo_views(cfg), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    x = first_input(loader, pipeline).x
    return bool(choose_channels_last(model, x, recorded=None).value)


def fast_teacher(model: nn.Module, cfg: DemoConfig) -> Teacher:
    """The trained teacher behind the fastest backend this machine has: ``auto`` times them
    on a batch of the demo's size (:mod:`kdkit.teachers.autotune`), ``onnx`` is ORT (else
    eager, with a warning), ``torch`` eager. (``kdkit demo`` names ``teacher.backend`` in its
    KD row's config instead.)"""
    import logging

    from kdkit.teachers import OnnxTeacher, TorchTeacher, make_teacher

    if cfg.teacher_backend == "auto":
        return make_teacher(
            model, backend="auto", input_shape=INPUT_SHAPE, batch_size=cfg.batch_size
        )
    if cfg.teacher_backend == "onnx":
        try:
            return OnnxTeacher(model, input_shape=INPUT_SHAPE)
        except KDError as err:  # onnxruntime not installed: say so, keep going
            logging.getLogger(__name__).warning("teacher: %s; running it in PyTorch instead", err)
    return TorchTeacher(model)
