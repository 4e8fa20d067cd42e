"""The ``train:`` section of a config (:class:`~kdkit.config.TrainConfig`) as Trainer keywords.

One mapping for every caller (``kdkit train``, :meth:`kdkit.Trainer.from_config`, a user's
script), so a config means the same run wherever it is read. Only builders read config
(STYLE.md): the Trainer's constructor keeps taking plain keywords.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from kdkit.config import OptimizerConfig, SchedulerConfig, TrainConfig
from kdkit.errors import KDError

__all__ = ["trainer_options", "optimizer_spec", "scheduler_factory", "CONFIG_KEYWORDS"]

#: Trainer keywords that the train section sets (``device`` may still be overridden).
CONFIG_KEYWORDS = (
    "epochs",
    "optimizer",
    "scheduler",
    "scheduler_interval",
    "precision",
    "seed",
    "device",
    "channels_last",
    "compile",
    "grad_accum",
    "max_grad_norm",
    "checkpoint_every",
    "progress",
)

_PLATEAU = "ReduceLROnPlateau"


def optimizer_spec(opt: OptimizerConfig) -> dict[str, Any]:
    """``{"optimizer": torch.optim.NAME, "okwargs": {lr, weight_decay, **args}}``, the form
    :func:`~kdkit.train.optim.build_optimizer` takes."""
    cls = getattr(torch.optim, opt.name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise KDError(f"config key 'train.optimizer.name': torch.optim has no {opt.name!r}")
    kwargs: dict[str, Any] = {"lr": opt.lr}
    if opt.weight_decay or "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = opt.weight_decay
    kwargs.update(opt.args)
    return {"optimizer": cls, "okwargs": kwargs}


def scheduler_factory(
    sched: SchedulerConfig, epochs: int, lr: float, steps_per_epoch: int | None
) -> Callable[[torch.optim.Optimizer], Any] | None:
    """``f(optimizer) -> scheduler`` for ``train.scheduler``, None for a constant rate.

    The run's length is filled in where a scheduler needs it and ``args`` does not say:
    ``OneCycleLR`` gets ``max_lr`` (the optimizer's lr) and ``total_steps``,
    ``CosineAnnealingLR`` gets ``T_max``, counted in steps or epochs per ``interval``.
    """
    if sched.name is None:
        return None
    cls = getattr(torch.optim.lr_scheduler, sched.name, None)
    if not isinstance(cls, type):
        raise KDError(
            f"config key 'train.scheduler.name': torch.optim.lr_scheduler has no {sched.name!r}"
        )
    args = dict(sched.args)
    per_step = sched.interval == "step" and sched.name != _PLATEAU
    if sched.name in ("OneCycleLR", "CosineAnnealingLR"):
        if per_step and steps_per_epoch is None:
            raise KDError(
                f"train.scheduler {sched.name} per step needs the number of batches per epoch, "
                "but the training loader has no len(); give scheduler.args the total, or "
                "interval: epoch"
            )
        total = epochs * steps_per_epoch if per_step else epochs
        if sched.name == "OneCycleLR":
            args.setdefault("max_lr", lr)
            if not {"epochs", "steps_per_epoch"} & set(args):
                args.setdefault("total_steps", total)
        else:
            args.setdefault("T_max", total)

    def make(optimizer: torch.optim.Optimizer) -> Any:
        try:
            return cls(optimizer, **args)
        except (TypeError, ValueError) as err:
            raise KDError(f"train.scheduler: cannot build {sched.name}({args}): {err}") from None

    return make


def trainer_options(train: TrainConfig, steps_per_epoch: int | None) -> dict[str, Any]:
    """The Trainer keywords in :data:`CONFIG_KEYWORDS`, from the train section.

    ``ReduceLROnPlateau`` steps once per epoch on the validation loss whatever ``interval``
    says (a per-step plateau has nothing to measure).
    """
    interval = "epoch" if train.scheduler.name == _PLATEAU else train.scheduler.interval
    return {
        "epochs": train.epochs,
        "optimizer": optimizer_spec(train.optimizer),
        "scheduler": scheduler_factory(
            train.scheduler, train.epochs, train.optimizer.lr, steps_per_epoch
        ),
        "scheduler_interval": interval,
        "precision": train.precision,
        "seed": train.seed,
        "device": train.device,
        "channels_last": train.channels_last,
        "compile": train.compile,
        "grad_accum": train.grad_accum,
        "max_grad_norm": train.max_grad_norm,
        "checkpoint_every": train.checkpoint_every,
        "progress": train.progress,
    }
