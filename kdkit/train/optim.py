"""Build an optimizer and scheduler from objects or darklight's ``opt_params`` dict."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from kdkit.errors import KDError

__all__ = ["build_optimizer", "build_scheduler", "include_missing_params"]

log = logging.getLogger(__name__)

_OPT_KEYS = {"optimizer", "okwargs", "scheduler", "skwargs", "amplevel"}


def build_optimizer(
    spec: torch.optim.Optimizer | Mapping[str, Any] | None, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """``spec`` is an optimizer, a darklight dict (``optimizer``, ``okwargs``...) or None.

    None means AdamW(lr=1e-3, weight_decay=0.01), a safe default for small students.
    """
    params = [p for p in params if p.requires_grad]
    if isinstance(spec, torch.optim.Optimizer):
        return include_missing_params(spec, params)
    spec = dict(spec or {})
    unknown = set(spec) - _OPT_KEYS
    if unknown:
        raise KDError(f"unknown opt_params keys {sorted(unknown)}; expected {sorted(_OPT_KEYS)}")
    cls = spec.get("optimizer", torch.optim.AdamW)
    kwargs = dict(
        spec.get("okwargs")
        or ({"lr": 1e-3, "weight_decay": 0.01} if "optimizer" not in spec else {})
    )
    try:
        return cls(params, **kwargs)
    except TypeError as err:
        raise KDError(
            f"cannot build {getattr(cls, '__name__', cls)} with {kwargs}: {err}"
        ) from None


def build_scheduler(
    spec: Any, optimizer: torch.optim.Optimizer, opt_params: Mapping[str, Any] | None = None
) -> Any:
    """A scheduler object, a callable ``f(optimizer)``, None, or the ``opt_params`` one."""
    if spec is None and opt_params and opt_params.get("scheduler") is not None:
        cls = opt_params["scheduler"]
        try:
            return cls(optimizer, **dict(opt_params.get("skwargs") or {}))
        except TypeError as err:
            raise KDError(f"cannot build scheduler {cls}: {err}") from None
    if spec is None or hasattr(spec, "step"):
        return spec
    if isinstance(spec, Callable):
        return spec(optimizer)
    raise KDError(f"scheduler must be a scheduler, a callable(optimizer) or None, got {spec!r}")


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
