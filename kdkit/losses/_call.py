"""Call any loss the way its author wrote it: ``loss(student, teacher)``, plus labels if asked.

ModelOpt users write their own losses as two-argument callables (``nn.MSELoss()``, a plain
function ``def l1(s, t)``); kdkit's losses also take ``labels=`` (DKD needs them). Which kind a
loss is gets decided once, from its signature, not by catching ``TypeError`` on every step
(that would also swallow a real ``TypeError`` raised inside the loss).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.losses.response import DKD, SoftTargetKL

__all__ = ["FunctionLoss", "as_loss_module", "takes_labels", "call_loss", "without_t2"]


def _signature_target(loss: Callable) -> Callable:
    # nn.Module.__call__ is (*args, **kwargs); the real signature is forward's.
    if isinstance(loss, FunctionLoss):
        return loss.fn
    if isinstance(loss, nn.Module):
        return loss.forward
    return loss


def takes_labels(loss: Callable) -> bool:
    """Whether ``loss`` accepts a ``labels`` keyword (a parameter named ``labels`` or ``**kw``).

    Built-ins whose signature cannot be read are called without labels.
    """
    try:
        params = inspect.signature(_signature_target(loss)).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == "labels" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


class FunctionLoss(nn.Module):
    """A plain function (or any non-module callable) held as a module, so a Distiller keeps
    every loss in one ``nn.ModuleList`` (state dict indices stay stable)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", None) or repr(self.fn)


def as_loss_module(loss: Any, where: str = "loss") -> nn.Module:
    """``loss`` itself if it is a module, a :class:`FunctionLoss` around any other callable."""
    if isinstance(loss, nn.Module):
        return loss
    if callable(loss) and not isinstance(loss, type):
        return FunctionLoss(loss)
    if isinstance(loss, type):
        raise KDError(
            f"{where} is the class {loss.__name__}; pass an instance, e.g. {loss.__name__}()"
        )
    raise KDError(f"{where} must be a loss module or a callable, got {type(loss).__name__}")


def call_loss(
    loss: Callable, student: Any, teacher: Any, labels: torch.Tensor | None, with_labels: bool
) -> torch.Tensor:
    """``loss(student, teacher, labels=labels)`` if ``with_labels`` else ``loss(student, teacher)``.

    ``with_labels`` is :func:`takes_labels` of the loss, computed once by the caller.
    """
    if with_labels:
        return loss(student, teacher, labels=labels)
    return loss(student, teacher)


def without_t2(loss: nn.Module, value: torch.Tensor) -> torch.Tensor | None:
    """``value / T^2`` for kdkit's T^2-scaled losses (SoftTargetKL, DKD), else None.

    Hinton's T^2 keeps gradients comparable across temperatures; the unscaled value keeps
    the *loss* comparable across them, which is what Intel Distiller logged. Logging both
    lets runs at different T be compared either way.
    """
    if isinstance(loss, (SoftTargetKL, DKD)):
        return value / (loss.temperature * loss.temperature)
    return None
