"""The optimizer and scheduler of a run, from objects or factories (typed; no dialects).

darklight's ``opt_params`` dict is translated by :func:`kdkit.compat.darklight.from_opt_params`;
a config's ``train.optimizer`` by :func:`kdkit.train.options.optimizer_factory`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError

__all__ = ["OptimizerArg", "build_optimizer", "build_scheduler", "include_missing_params"]

log = logging.getLogger(__name__)

OptimizerArg = torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def build_optimizer(optimizer: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if optimizer is None:  # a safe default for small students
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    if isinstance(optimizer, torch.optim.Optimizer):
        return include_missing_params(optimizer, params)
    if isinstance(optimizer, Mapping):
        raise KDError(
            "optimizer= takes an optimizer or a function params -> optimizer; darklight's "
            "opt_params dict is translated by kdkit.compat.darklight.from_opt_params(opt_params)"
        )
    if callable(optimizer):
        return optimizer(params)
    raise KDError(f"optimizer must be an optimizer, a callable(params) or None, got {optimizer!r}")


def build_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    if scheduler is None or hasattr(scheduler, "step"):
        return scheduler
    if callable(scheduler):
        return scheduler(optimizer)
    raise KDError(
        f"scheduler must be a scheduler, a callable(optimizer) or None, got {scheduler!r}"
    )


def include_missing_params(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """Add trainable parameters the optimizer does not know (e.g. adapters created after it
    was built) as a new param group with the first group's hyper-parameters."""
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [p for p in params if id(p) not in known]
    if missing:
        log.info("adding %d parameter tensors (loss adapters) to the optimizer", len(missing))
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({**group, "params": missing})
    return optimizer
