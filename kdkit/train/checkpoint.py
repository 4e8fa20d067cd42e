"""Checkpoints that survive a crash: atomic writes and complete RNG state.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
``os.replace``d over the old one, so a kill at any moment leaves either the previous or the
new checkpoint, never a torn one. It holds everything needed to continue bit-for-bit:
student, adapters, optimizer, scheduler, scaler, RNG states, epoch and step.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.errors import KDError

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

FORMAT = "kdkit-checkpoint"
VERSION = 1


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


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus format and version) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a kdkit checkpoint, refusing files that are not one."""
    path = Path(path)
    if not path.is_file():
        raise KDError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torn or foreign file
        raise KDError(f"{path} is not a readable checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise KDError(f"{path} is not a kdkit checkpoint (no format={FORMAT!r} key)")
    if state.get("version", 0) > VERSION:
        raise KDError(
            f"{path} was written by a newer kdkit (format version {state['version']} > {VERSION})"
        )
    return state
