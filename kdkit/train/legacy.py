"""The Trainer's older flat keywords that changed the models or checked the teacher.

Before the typed spine, ``Trainer(...)`` also seeded torch, set the student to channels-last,
compiled it, checked a teacher cache against the run and took per-epoch callbacks. Those jobs
belong to the run builder now (``kdkit/run/``), but scripts written against the old keywords
keep working through :func:`apply_older_keywords` (they warn: see
:func:`kdkit.train.options.split_trainer_kwargs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdkit._compile import compile_static
from kdkit.cache.run_check import check_cache_for_run

__all__ = ["EpochCallback", "apply_older_keywords"]


class EpochCallback:
    """An older ``epoch_callbacks=`` function, as a callback object."""

    def __init__(self, fn: Callable[[Any, dict], None]) -> None:
        self.on_epoch = fn


def apply_older_keywords(task: nn.Module, older: dict[str, Any], trainer: Any) -> None:
    """The older keywords that changed the models or checked the teacher, kept working:
    ``seed`` seeds torch, ``channels_last``/``compile`` change the student, ``cache_*`` run
    the cache checks the run builder now makes (:func:`kdkit.cache.run_check`)."""
    model, cache = older["model"], older["cache"]
    if "seed" in model:
        torch.manual_seed(model["seed"])
    student = getattr(task, "student", None)
    if older["pipeline"].get("channels_last") and isinstance(student, nn.Module):
        student.to(memory_format=torch.channels_last)
    # a no-op for any teacher but a CachedTeacher (and the live_teacher misuse is refused there)
    check_cache_for_run(
        getattr(task, "teacher", None),
        getattr(trainer.train_loader, "dataset", None),
        sampler=getattr(trainer.inputs, "sampler", None),
        live_teacher=cache.get("cache_check_teacher"),
        n_probe=cache.get("cache_check_probe", 64),
        mean=getattr(trainer.inputs, "mean", None),
        std=getattr(trainer.inputs, "std", None),
        device=trainer.device,
        dataset_check=cache.get("cache_dataset_check", True),
    )
    if model.get("compile") and isinstance(student, nn.Module):
        task.student = compile_static(student)
