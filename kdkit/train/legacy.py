"""The Trainer's flat keywords of the first release, translated into the typed collaborators.

Before the typed spine, ``Trainer(...)`` also took the input pipeline's pieces (``views=``,
``mean=``, ``std=``, ``channels_last=``), the run info (``student_spec=``, ``input_shape=``...),
per-epoch callbacks, and seeded torch, compiled the student and checked a teacher cache
against a live teacher. Those jobs belong to the builders now (``kdkit/run/``) and to
:class:`~kdkit.data.pipeline.InputPipeline`, ``run_info=`` and ``callbacks=``. Scripts written
against the old keywords keep working for one more release through
:func:`translate_older_keywords`, which the Trainer imports only when such a keyword is
given (the loop's main path never loads this module, nor ``kdkit.cache``), and which warns
with a :class:`~kdkit.errors.KDDeprecationWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit._compile import compile_static
from kdkit.cache.run_check import check_cache_for_run
from kdkit.data.pipeline import InputPipeline
from kdkit.errors import KDDeprecationWarning, KDError, closest_names
from kdkit.train.options import LoopOptions

__all__ = ["EpochCallback", "Translated", "translate_older_keywords"]

_PIPELINE_KEYS = ("views", "mean", "std", "channels_last")
_MODEL_KEYS = ("compile", "seed")
_CACHE_KEYS = ("cache_check_teacher", "cache_check_probe", "cache_dataset_check")
_RUN_INFO_OLD = ("student_spec", "input_shape", "teacher_spec", "run_config")
_RUN_INFO_ALIASES = {"run_config": "config"}
_OLDER = (*_PIPELINE_KEYS, *_MODEL_KEYS, *_CACHE_KEYS, *_RUN_INFO_OLD, "epoch_callbacks")


class EpochCallback:
    """An older ``epoch_callbacks=`` function, as a callback object."""

    def __init__(self, fn: Callable[[Any, dict], None]) -> None:
        self.on_epoch = fn


@dataclass
class Translated:
    """What the older keywords become: the Trainer's ``inputs``, ``run_info``, ``callbacks``."""

    inputs: Any
    run_info: dict[str, Any]
    callbacks: list[Any]


def translate_older_keywords(
    task: nn.Module,
    older: Mapping[str, Any],
    *,
    inputs: Any,
    run_info: Mapping[str, Any] | None,
    callbacks: Iterable[Any],
    train_loader: Any,
    device: torch.device,
) -> Translated:
    """``older`` (the Trainer's keywords that are not :class:`LoopOptions` fields) as typed
    collaborators, with what they used to do to the models done here, before the loop is
    built: ``seed`` seeds torch, ``channels_last`` / ``compile`` change the student, the
    ``cache_*`` keywords run the fidelity gate of a cached teacher against a live one."""
    unknown = sorted(set(older) - set(_OLDER))
    if unknown:
        known = sorted({*_OLDER, *LoopOptions.fields()})
        hint = closest_names(unknown[0], known)
        raise KDError(
            f"Trainer got an unexpected keyword {unknown[0]!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
        )
    warnings.warn(
        f"Trainer({', '.join(k + '=' for k in sorted(older))}...) is the older flat form; pass "
        "inputs=InputPipeline(sampler, mean, std, channels_last=...), run_info={...} and "
        "callbacks=[...]; seed, compile and check caches before building it (see kdkit.Trainer)",
        KDDeprecationWarning,
        stacklevel=3,
    )
    if "seed" in older:
        torch.manual_seed(older["seed"])
    pipeline = {k: older[k] for k in _PIPELINE_KEYS if k in older}
    if inputs is not None and pipeline:
        raise KDError(f"pass {sorted(pipeline)} to the InputPipeline, not beside inputs=")
    if inputs is None and pipeline:
        inputs = InputPipeline(
            pipeline.get("views"),
            pipeline.get("mean"),
            pipeline.get("std"),
            device=device,
            channels_last=bool(pipeline.get("channels_last")),
            dataset=getattr(train_loader, "dataset", None),
        )
    student = getattr(task, "student", None)
    if pipeline.get("channels_last") and isinstance(student, nn.Module):
        student.to(memory_format=torch.channels_last)
    info = {**dict(run_info or {})}
    info.update({_RUN_INFO_ALIASES.get(k, k): older[k] for k in _RUN_INFO_OLD if k in older})
    epoch_fns = [EpochCallback(fn) for fn in older.get("epoch_callbacks", ())]
    _check_cache(task, older, inputs, train_loader, device)
    if older.get("compile") and isinstance(student, nn.Module):
        task.student = compile_static(student)
    return Translated(inputs, info, [*callbacks, *epoch_fns])


def _check_cache(task: nn.Module, older: Mapping[str, Any], inputs, loader, device) -> None:
    """``cache_check_teacher=`` (a live teacher: the fidelity gate on ``cache_check_probe``
    samples) and ``cache_dataset_check=False`` (the Trainer's own dataset check skipped)."""
    teacher = getattr(task, "teacher", None)
    if older.get("cache_dataset_check") is False and hasattr(teacher, "dataset_check"):
        teacher.dataset_check = False
    if older.get("cache_check_teacher") is None:
        return
    check_cache_for_run(
        teacher,
        getattr(loader, "dataset", None),
        sampler=getattr(inputs, "sampler", None),
        live_teacher=older["cache_check_teacher"],
        n_probe=older.get("cache_check_probe", 64),
        mean=getattr(inputs, "mean", None),
        std=getattr(inputs, "std", None),
        device=device,
        dataset_check=False,  # the Trainer's check_inputs makes it, once
    )
