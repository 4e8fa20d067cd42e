"""Checks of a number or shape a user gave (a flag, a keyword): a bad value is one line.

On the ground floor: the CLI's verbs and the run recipes they call both check what they were
given before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kdkit.errors import KDError

__all__ = ["check_min", "check_range", "check_shape"]


def check_min(value: float | None, low: float, option: str) -> None:
    """``value`` (when given) must be a finite number >= ``low``."""
    if value is None:
        return
    if not math.isfinite(value) or value < low:
        raise KDError(f"{option} must be >= {low:g}, got {value:g}")


def check_range(value: float | None, low: float, high: float, option: str) -> None:
    if value is None:
        return
    if not math.isfinite(value) or not low <= value <= high:
        raise KDError(f"{option} must be in [{low:g}, {high:g}], got {value:g}")


def check_shape(shape: Sequence[int] | None, option: str = "--input-shape") -> None:
    if shape is None:
        return
    if not 1 <= len(shape) <= 4 or any(d <= 0 for d in shape):
        raise KDError(
            f"{option} is one sample's shape without the batch axis, e.g. 1 28 28 or 3 224 224; "
            f"got {' '.join(map(str, shape))}"
        )
