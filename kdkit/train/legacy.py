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

__all__ = ["EpochCallback", "apply_older_keywords", "checked_run_info", "input_pipeline"]


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


def input_pipeline(inputs: Any, older: dict[str, Any], device: torch.device, loader: Any) -> Any:
    """The Trainer's ``inputs``: the one given (moved to ``device``), or an
    :class:`~kdkit.data.pipeline.InputPipeline` built from the older ``views=``, ``mean=``,
    ``std=`` and ``channels_last=`` keywords (which may not be given beside ``inputs=``)."""
    from kdkit.data.pipeline import InputPipeline
    from kdkit.errors import KDError

    if inputs is not None:
        if older:
            raise KDError(f"pass {sorted(older)} to the InputPipeline, not beside inputs=")
        if hasattr(inputs, "to"):
            inputs.to(device)
        return inputs
    return InputPipeline(
        older.get("views"),
        older.get("mean"),
        older.get("std"),
        device=device,
        channels_last=bool(older.get("channels_last")),
        dataset=getattr(loader, "dataset", None),
    )


def checked_run_info(run_info: Any, older: dict[str, Any]) -> dict[str, Any]:
    """``run_info`` merged with the older flat keywords (``student_spec=``...), its keys
    checked against what a checkpoint stores and a student spec parsed now."""
    from kdkit.errors import KDError
    from kdkit.registry import ModelSpec
    from kdkit.train.resume import RUN_INFO_KEYS

    info = {**dict(run_info or {}), **older}
    unknown = sorted(set(info) - set(RUN_INFO_KEYS))
    if unknown:
        raise KDError(f"run_info keys must be among {list(RUN_INFO_KEYS)}, got {unknown}")
    if info.get("student_spec") is not None:  # plain data naming a model, checked now
        ModelSpec.parse(info["student_spec"], where="student_spec")
    return info
