"""Early stopping: end the run when a validation metric has stopped improving.

Decided from the run's history alone (no state of its own), so a resumed run stops exactly
where the uninterrupted one would have, and a run resumed after it stopped stops again at
once. Like HF Trainer's ``EarlyStoppingCallback`` and Lightning's ``EarlyStopping``:
``patience`` epochs without an improvement of more than ``min_delta``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdkit.errors import KDError
from kdkit.metrics import direction

__all__ = ["EarlyStopping"]


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after ``patience`` epochs in which ``metric`` (a column of the epoch rows, e.g.
    ``val_top1``, ``val_loss``; None: the task's best metric) did not improve by more than
    ``min_delta``. ``mode``: ``max``, ``min``, or ``auto`` (the task's direction for its own
    metric, else the direction :data:`kdkit.metrics.DIRECTIONS` declares: ``val_kl``,
    ``val_ce``, ``val_ppl`` and losses fall, ``val_top1`` and ``val_agree`` rise; a count,
    a speed or a column kdkit does not log needs ``min`` or ``max``)."""

    metric: str | None = None
    patience: int = 5
    min_delta: float = 0.0
    mode: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 1:
            raise KDError(f"early_stopping.patience must be an integer >= 1, got {self.patience!r}")
        if self.min_delta < 0:
            raise KDError(f"early_stopping.min_delta must be >= 0, got {self.min_delta}")
        if self.mode not in ("auto", "min", "max"):
            raise KDError(f"early_stopping.mode must be auto, min or max, got {self.mode!r}")

    def resolve(self, task_metric: str, higher_is_better: bool) -> tuple[str, bool]:
        """``(column, higher_is_better)`` for a task whose best metric is ``task_metric``."""
        column = self.metric or f"val_{task_metric}"
        if self.mode != "auto":
            return column, self.mode == "max"
        if column == f"val_{task_metric}":
            return column, higher_is_better
        higher = direction(column)
        if higher is None:
            raise KDError(
                f"early_stopping.metric {column!r} is a count or a speed, not a score; stop on "
                "a score (val_loss, val_top1, val_ppl, val_kl...) or set mode: min or max"
            )
        return column, higher

    def reason_to_stop(
        self, history: Sequence[dict[str, Any]], column: str, higher_is_better: bool
    ) -> str | None:
        """Why to stop now (one line), or None to go on."""
        if not history:
            return None
        if column not in history[-1]:
            raise KDError(
                f"early_stopping.metric {column!r} is not among this run's epoch metrics "
                f"{sorted(k for k in history[-1] if isinstance(history[-1][k], float))}"
            )
        sign = 1.0 if higher_is_better else -1.0
        best_i, best = 0, -math.inf
        for i, row in enumerate(history):
            value = sign * float(row[column])
            if value > best + self.min_delta:
                best_i, best = i, value
        waited = len(history) - 1 - best_i
        if waited < self.patience:
            return None
        return (
            f"early stopping: {column} has not improved for {waited} epochs (best "
            f"{sign * best:.4g} at epoch {history[best_i]['epoch'] + 1})"
        )
