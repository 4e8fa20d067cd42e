"""What the loop saves and restores: every RNG, the optimizer, the position, the task's weights.

A killed run resumed from ``last.pt`` ends with the same weights as one that was never
interrupted: the checkpoint holds the task's trainable parts (``student``, ``adapters``), the
optimizer, scheduler and scaler states, every RNG state, the epoch / step / batch position and
the loss sums of an unfinished epoch. The file format and the atomic write are on the ground
floor (:mod:`kdkit.load`), so export and teachers read checkpoints without the loop.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.errors import KDError

__all__ = ["rng_state", "set_rng_state", "restore_part", "cpu_copy"]


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
    """Restore :func:`rng_state`; the tensors may arrive on any device (they are read on the
    CPU, so a checkpoint loaded with ``map_location="cuda"`` still restores)."""
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = torch.as_tensor(keys).cpu()
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s).cpu() for s in state["cuda"]])


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def restore_part(path: Path | str, part: str, target: Any, state: Any) -> None:
    """``target.load_state_dict(state)``; a checkpoint of another architecture or optimizer
    is a KDError naming the part, not a raw size-mismatch traceback."""
    if state is None:
        raise KDError(f"{path} has no {part!r} state; it is not a Trainer checkpoint")
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines() or [type(err).__name__]
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise KDError(
            f"cannot resume from {path}: its {part} does not fit this run's ({detail}); resume "
            "with the same model, losses and optimizer, or use another checkpoint_dir"
        ) from None
