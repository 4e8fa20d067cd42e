"""The CLI's shared flags and argument checks (the checks live on the ground floor, where the
builders the verbs call use them too): refuse a bad value before any work starts."""

from __future__ import annotations

from typing import Any

from kdkit._args import check_min, check_range, check_shape
from kdkit._device import check_device

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
