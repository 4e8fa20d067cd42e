"""Argument checks shared by the subcommands: refuse a bad value before any work starts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kdkit.errors import KDError

__all__ = ["check_device", "check_min", "check_range", "check_shape", "add_trust_code"]


def add_trust_code(p: Any) -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a checkpoint to name python:pkg.module:callable as its model, and a Hugging "
        "Face model or tokenizer folder to name code of its own (auto_map): both run that code; "
        "without it only registered models (kdkit:, torchvision:, timm:, open_clip:) and "
        "folders without auto_map load",
    )


def check_device(device: str | None, option: str = "--device") -> str | None:
    """``None`` or a device string torch understands and this machine has."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise KDError(f"{option}: {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise KDError(f"{option} {device}: no CUDA device is visible here; use {option} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise KDError(
                f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif parsed.type != "cpu":
        raise KDError(f"{option}: kdkit runs on cpu or cuda, got {device!r}")
    return device


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
