"""``kdkit train``'s measured defaults: ``teacher.backend: auto`` and ``train.channels_last: auto``.

Both are decided on the run's first training batch (the run's batch size, after the views,
on the run's device, under the run's precision), once: the choices are written to the run
directory's ``choices.json`` (beside ``config.yaml``, which keeps ``auto``), and ``--resume``
reads them back instead of measuring again, so a resumed run continues with the backend and
memory format it started with. An explicit ``backend:`` / ``channels_last:`` is never
measured. The teacher's side is :mod:`kdkit.teachers.autotune`; this module adds the run's
inputs, the student's memory format and the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.config import RunConfig
from kdkit.errors import KDError
from kdkit.teachers import autotune
from kdkit.teachers.autotune import Choice, choose_channels_last

__all__ = [
    "CHOICES_FILE",
    "auto_teacher_applies",
    "choose_channels_last",
    "choose_teacher",
    "first_input",
    "keep_older_values",
    "read_choices",
    "shared_choice",
    "write_choices",
]

log = logging.getLogger(__name__)

CHOICES_FILE = "choices.json"
_FIXED_PREFIXES = ("cache", "onnx", "tensorrt", "open_clip")  # their backend is their file


def keep_older_values(cfg: Any, saved: Any) -> Any:
    """``cfg`` to resume a run whose ``config.yaml`` names a backend / memory format where
    ``cfg`` says ``auto`` (a run started before ``auto`` was the default): it continues with
    what it ran with, and the config file need not be edited to resume it."""
    new_t, old_t = getattr(cfg, "teacher", None), getattr(saved, "teacher", None)
    old_backend = getattr(old_t, "backend", "auto")
    if getattr(new_t, "backend", None) == "auto" and old_backend != "auto":
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(new_t, backend=old_backend))
    for key in ("channels_last", "overlap"):
        if getattr(cfg.train, key) == "auto" and getattr(saved.train, key) != "auto":
            train = dataclasses.replace(cfg.train, **{key: getattr(saved.train, key)})
            cfg = dataclasses.replace(cfg, train=train)
    return cfg


def read_choices(run_dir: str | Path) -> dict[str, Any]:
    """The choices a run recorded (``{}`` when it has none, e.g. nothing was ``auto``)."""
    path = Path(run_dir) / CHOICES_FILE
    if not path.is_file():
        return {}
    from kdkit._io import read_json

    data = read_json(path, "delete it to measure again")
    bad = not isinstance(data, dict) or any(
        not isinstance(r, dict) or not isinstance(r.get("value"), (str, bool, int))
        for r in data.values()
    )
    if bad:
        raise KDError(
            f"{path} is not a record of choices ({{key: {{value: ...}}}}); delete it to measure "
            "again"
        )
    return data


def write_choices(run_dir: str | Path, choices: list[Choice]) -> None:
    from kdkit._io import atomic_write_json

    atomic_write_json(Path(run_dir) / CHOICES_FILE, {c.key: c.to_dict() for c in choices})


def first_input(loader: Any, pipeline: Callable[..., Any]) -> Any:
    """The run's first training batch as the step sees it (a ``ModelInput``)."""
    batch = next(iter(loader), None)
    if batch is None:
        raise KDError("the training loader yielded no batch")
    return pipeline(batch, 0)


def auto_teacher_applies(cfg: RunConfig) -> bool:
    """``backend: auto`` on a model kdkit builds (files and caches run where they are; int8
    asked for explicitly keeps its ONNX Runtime path)."""
    tc = cfg.teacher
    if tc is None or tc.backend != "auto" or tc.precision == "int8":
        return False
    return tc.model.partition(":")[0] not in _FIXED_PREFIXES


def choose_teacher(
    module: nn.Module,
    example: torch.Tensor,
    *,
    recorded: dict[str, Any] | None,
    precision: str,
    features: bool,
    int8: dict[str, Any],
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[Any, Choice]:
    """The teacher of ``backend: auto``: the recorded choice (resume) or a measured one."""
    if recorded is not None:
        choice = Choice.recorded("teacher.backend", recorded)
        teacher = autotune.build_backend(
            choice.value,
            module,
            input_shape=tuple(example.shape[1:]),
            precision=precision,
            batch_size=int(example.shape[0]),
            **int8,
        )
        log.info("%s", choice.line())
        return teacher.to(example.device), choice
    return autotune.choose_backend(
        module, example, precision=precision, features=features, autocast=autocast, **int8
    )


def shared_choice(
    make: Callable[[dict[str, Any] | None], tuple[Any, Choice]], recorded: dict[str, Any] | None
) -> tuple[Any, Choice]:
    """``make(record)`` once per job: under torchrun rank 0 measures and every other rank
    builds what it chose (DDP needs one memory format for the student's parameters on all
    ranks, and one teacher backend keeps the ranks' logits alike)."""
    from kdkit.train import distributed

    if recorded is not None or not distributed.is_distributed():
        return make(recorded)
    box: list[Any] = [None]
    out = None
    if distributed.is_main():
        out = make(None)
        box = [out[1].to_dict()]
    torch.distributed.broadcast_object_list(box, src=0)
    return out if out is not None else make(box[0])
