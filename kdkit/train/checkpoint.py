"""Checkpoints that survive a crash: atomic writes, a checksum, and complete RNG state.

The file format (format, version, role, checksum over every tensor) and the atomic write live
on the ground floor in :mod:`kdkit.load`, so teachers and export read checkpoints without
importing the training loop; this module adds what only training needs: every RNG state, so a
resumed run continues bit-for-bit.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from kdkit.load import FORMAT, VERSION, load_checkpoint, save_checkpoint

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values only, so the
    checkpoint loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
