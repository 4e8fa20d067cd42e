"""What every loss shares: the fp32 upcast, the temperature check, ``0 log 0 = 0`` KL terms
and the (N, C, ...) logits check.

Its own module so that the feature, MGD and relational losses need not import private names
from :mod:`kdkit.losses.response`.
"""

from __future__ import annotations

import logging
import math

import torch

from kdkit.errors import KDError

__all__ = [
    "check_temperature",
    "upcast",
    "check_logits",
    "kl_terms",
]

log = logging.getLogger(__name__)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types (softmax in bf16 loses ~3 digits); fp64 stays fp64 (gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_temperature(temperature: float) -> float:
    """A finite number > 0 (NaN, inf, 0, negatives and non-numbers are refused)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise KDError(f"temperature must be a number > 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise KDError(f"temperature must be a finite number > 0 (e.g. 4.0), got {temperature}")
    return float(temperature)


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p * (log p - log q)`` with ``0 * log 0 = 0``: a teacher logit of -inf (a masked
    class) has p = 0 and contributes nothing, instead of NaN from ``0 * -inf``."""
    p = log_p.exp()
    # ``p == 0`` (not ``p > 0``) so that a NaN teacher still propagates NaN and is caught
    return torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))


def check_logits(student: torch.Tensor) -> None:
    if student.dim() < 2:
        raise KDError(
            f"expected student logits of shape (N, C, ...), got {tuple(student.shape)}; "
            "the class dim must be dim 1"
        )
