"""An exponential moving average of the student's weights (``train.ema``), from torch.

torch's own :class:`torch.optim.swa_utils.AveragedModel` with
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` keeps the average (parameters and
buffers, so BatchNorm statistics too), updated after every optimizer step. timm's
``ModelEmaV3`` does the same; torch's needs no optional package.

With an EMA the run's evaluation, ``best.pt`` and ``restore_best`` are the averaged weights
(what is exported); ``last.pt`` holds the raw weights and the average, so a resume continues
both exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kdkit.capture import unwrap
from kdkit.errors import KDError

__all__ = ["StudentEMA"]


class StudentEMA:
    """``decay`` in (0, 1): the weight of the past at each update (timm's default 0.9998)."""

    def __init__(self, task: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise KDError(f"ema decay must be in (0, 1), got {decay}")
        student = getattr(task, "student", None)
        if not isinstance(student, nn.Module):
            raise KDError(f"an EMA averages the task's student; {type(task).__name__} has none")
        self.decay = decay
        self.student = unwrap(student)
        self.average = AveragedModel(
            self.student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )

    @torch.no_grad()
    def update(self) -> None:
        """Fold the student's current weights into the average (after an optimizer step)."""
        self.average.update_parameters(self.student)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the student for the duration (evaluation, ``best.pt``)."""
        raw = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        self.student.load_state_dict(self.average.module.state_dict())
        try:
            yield
        finally:
            self.student.load_state_dict(raw)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "average": self.average.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any] | None, where: str = "") -> None:
        if state is None:
            raise KDError(f"{where} has no EMA state (it was trained without train.ema)")
        self.average.load_state_dict(state["average"])
