"""Combine distillation losses and the student's task loss into one scalar.

The weights follow Intel Distiller's KD policy (distill / student weights, a start epoch;
Hinton et al. 2015 recommend T^2 scaling, which the losses apply themselves) and ModelOpt's
loss balancer (one weight per layer pair). A linear warm-up of the distillation weight, as
DKD uses (Zhao et al. 2022, arXiv:2203.08679), ramps it in after ``start_epoch``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kdkit.errors import KDError

__all__ = ["LossBalancer"]


class LossBalancer:
    """``total = student_weight * task + distill_weight * ramp(epoch) * sum_i w_i * kd_i``.

    - ``weights``: per-pair weights, keyed by component name (``"layer3<-layer3"``, ``"output"``
      for the final outputs) or by ``(student_name, teacher_name)``; missing pairs weigh 1.
    - Before ``start_epoch`` distillation is off: the total is the task loss alone, at full
      weight (as Distiller does), and the Distiller skips the teacher's forward pass.
    - ``warmup_epochs`` ramps the distillation weight linearly from 0 to 1 after
      ``start_epoch``; the trainer sets fractional epochs so the ramp is smooth per step.
    - With no task loss (unlabeled data) the total is the distillation term alone.

    When the user gives no balancer (``Distiller(student, teacher, loss)``), the Distiller
    uses :meth:`default`: the same 0.5 / 0.5 weighting, except that **one pair with no
    student loss gives that pair's raw loss** (weight 1, not 0.5). That is ModelOpt's rule:
    "if distillation loss is only applied to a single pair of layer outputs, and no student
    loss is available, a loss balancer should not be provided"; the loss then reaches the
    optimizer exactly as written. An explicit ``LossBalancer(...)`` always applies its
    weights.
    """

    def __init__(
        self,
        weights: Mapping[object, float] | None = None,
        student_weight: float = 0.5,
        distill_weight: float = 0.5,
        start_epoch: float = 0,
        warmup_epochs: float = 0,
    ) -> None:
        for name, value in (
            ("student_weight", student_weight),
            ("distill_weight", distill_weight),
            ("start_epoch", start_epoch),
            ("warmup_epochs", warmup_epochs),
        ):
            if value < 0:
                raise KDError(f"{name} must be >= 0, got {value}")
        self.weights = dict(weights or {})
        self.student_weight = float(student_weight)
        self.distill_weight = float(distill_weight)
        self.start_epoch = float(start_epoch)
        self.warmup_epochs = float(warmup_epochs)
        self.epoch = 0.0
        self._implicit = False

    @classmethod
    def default(cls) -> LossBalancer:
        """The balancer a Distiller uses when none is given (see the class docstring)."""
        balancer = cls()
        balancer._implicit = True
        return balancer

    def set_epoch(self, epoch: float) -> None:
        """Tell the schedule where training is (fractional epochs allowed)."""
        self.epoch = float(epoch)

    def ramp(self) -> float:
        """The distillation factor in [0, 1] at the current epoch."""
        if self.epoch < self.start_epoch:
            return 0.0
        if self.warmup_epochs <= 0:
            return 1.0
        return min(1.0, (self.epoch - self.start_epoch) / self.warmup_epochs)

    @property
    def active(self) -> bool:
        """Whether distillation contributes at the current epoch (else the teacher may idle)."""
        return self.epoch >= self.start_epoch

    def weight_for(self, name: str, pair: tuple[str, str] | None = None) -> float:
        if pair is not None and pair in self.weights:
            return float(self.weights[pair])
        return float(self.weights.get(name, 1.0))

    def __call__(
        self,
        distill_losses: Mapping[str, torch.Tensor],
        student_loss: torch.Tensor | None = None,
        pairs: Mapping[str, tuple[str, str]] | None = None,
    ) -> torch.Tensor:
        pairs = pairs or {}
        if not self.active or not distill_losses:
            if student_loss is None:
                raise KDError(
                    f"nothing to train on at epoch {self.epoch:g}: distillation starts at "
                    f"epoch {self.start_epoch:g} and no student (task) loss was given"
                )
            return student_loss
        if self._implicit and student_loss is None and len(distill_losses) == 1:
            return next(iter(distill_losses.values()))
        kd = sum(self.weight_for(k, pairs.get(k)) * v for k, v in distill_losses.items())
        total = self.distill_weight * self.ramp() * kd
        if student_loss is not None:
            total = total + self.student_weight * student_loss
        return total

    def __repr__(self) -> str:
        return (
            f"LossBalancer(student_weight={self.student_weight}, "
            f"distill_weight={self.distill_weight}, start_epoch={self.start_epoch:g}, "
            f"warmup_epochs={self.warmup_epochs:g}, weights={self.weights})"
        )
