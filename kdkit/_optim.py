"""The optimizer and the learning-rate schedule of a ``train:`` section, as factories.

``f(params) -> optimizer`` and ``f(optimizer) -> scheduler``: the loop builds them once it
knows the parameters (lazy loss adapters included). On the ground floor because two floors
need the same translation: ``config/`` builds and steps them on one dummy parameter when it
validates a config (a bad argument is a config error, not a traceback after the models were
built), and ``Trainer.from_config`` builds the real ones. The sections are read by their
fields (``name``, ``lr``, ``weight_decay``, ``args``; ``interval``, ``warmup_epochs``), so
this module imports no config class.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from kdkit.errors import KDError

if TYPE_CHECKING:
    from kdkit.config import OptimizerConfig, SchedulerConfig

__all__ = ["PLATEAU", "optimizer_factory", "scheduler_factory"]

#: the scheduler that steps on a metric, once per epoch
PLATEAU = "ReduceLROnPlateau"


def optimizer_factory(
    opt: OptimizerConfig,
) -> Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]:
    """``f(params) -> torch.optim.NAME(params, lr=, weight_decay=, **args)`` for
    ``train.optimizer``."""
    cls = getattr(torch.optim, opt.name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise KDError(f"config key 'train.optimizer.name': torch.optim has no {opt.name!r}")
    kwargs: dict[str, Any] = {"lr": opt.lr}
    if opt.weight_decay or "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = opt.weight_decay
    kwargs.update(opt.args)

    def make(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        try:
            return cls(params, **kwargs)
        except (TypeError, ValueError) as err:
            raise KDError(f"train.optimizer: cannot build {opt.name}({kwargs}): {err}") from None

    make.spec = {"name": opt.name, **kwargs}  # type: ignore[attr-defined]
    return make


def scheduler_factory(
    sched: SchedulerConfig,
    epochs: int,
    lr: float,
    steps_per_epoch: int | None,
    *,
    skip: int = 0,
) -> Callable[[torch.optim.Optimizer], Any] | None:
    """``f(optimizer) -> scheduler`` for ``train.scheduler``, None for a constant rate.

    The run's length is filled in where a scheduler needs it and ``args`` does not say:
    ``OneCycleLR`` gets ``max_lr`` (the optimizer's lr) and ``total_steps``,
    ``CosineAnnealingLR`` gets ``T_max``, counted in steps or epochs per ``interval``
    (less ``skip``, the warm-up's length); ``warmup_epochs`` prepends a linear warm-up.
    """
    if sched.name is None:
        return None
    if sched.warmup_epochs:
        return _with_warmup(sched, epochs, lr, steps_per_epoch)
    cls = getattr(torch.optim.lr_scheduler, sched.name, None)
    if not isinstance(cls, type):
        raise KDError(
            f"config key 'train.scheduler.name': torch.optim.lr_scheduler has no {sched.name!r}"
        )
    args = dict(sched.args)
    per_step = sched.interval == "step" and sched.name != PLATEAU
    if sched.name in ("OneCycleLR", "CosineAnnealingLR"):
        if per_step and steps_per_epoch is None:
            raise KDError(
                f"train.scheduler {sched.name} per step needs the number of batches per epoch, "
                "but the training loader has no len(); give scheduler.args the total, or "
                "interval: epoch"
            )
        total = (epochs * steps_per_epoch if per_step else epochs) - skip  # after a warm-up
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


def _with_warmup(
    sched: SchedulerConfig, epochs: int, lr: float, steps_per_epoch: int | None
) -> Callable[[torch.optim.Optimizer], Any]:
    """``scheduler.warmup_epochs``: torch's ``SequentialLR`` of a linear warm-up
    (``LinearLR`` from lr / (W + 1) to lr over W steps or epochs) and the named scheduler
    over what remains of the run (its length filled in for that remainder)."""
    per_step = sched.interval == "step"
    if sched.name == PLATEAU:
        raise KDError("train.scheduler.warmup_epochs does not combine with ReduceLROnPlateau")
    if per_step and steps_per_epoch is None:
        raise KDError(
            "train.scheduler.warmup_epochs per step needs the number of batches per epoch, but "
            "the training loader has no len(); use interval: epoch"
        )
    unit = steps_per_epoch if per_step else 1
    warm = max(1, round(sched.warmup_epochs * unit))
    if warm >= epochs * unit:
        raise KDError(
            f"train.scheduler.warmup_epochs ({sched.warmup_epochs}) must be shorter than the "
            f"run ({epochs} epochs)"
        )
    rest = dataclasses.replace(sched, warmup_epochs=0)
    # the main scheduler's length is the run after the warm-up
    main = scheduler_factory(rest, epochs, lr, steps_per_epoch, skip=warm)

    def make(optimizer: torch.optim.Optimizer) -> Any:
        sched_mod = torch.optim.lr_scheduler
        warmup = sched_mod.LinearLR(optimizer, 1.0 / (warm + 1), 1.0, total_iters=warm)
        return sched_mod.SequentialLR(optimizer, [warmup, main(optimizer)], milestones=[warm])

    return make
