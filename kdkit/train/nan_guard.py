"""Stop training within N steps of a non-finite loss, naming the component, with no per-step sync.

Each step records on the device whether its loss is finite (``torch.where`` bookkeeping keeps
the first bad step's number and components there); :meth:`NanGuard.check` reads the flag, the
guard's one host sync, every ``every`` steps and before any checkpoint is written, so
``last.pt`` is never a NaN state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from kdkit.errors import KDError

__all__ = ["NanGuard"]


class NanGuard:
    """Deferred finiteness check of the step losses (see the module docstring)."""

    def __init__(self, every: int, last_checkpoint: Path | None = None) -> None:
        if every < 1:
            raise KDError(f"nan_check_every must be >= 1, got {every}")
        self.every = every
        self.last_checkpoint = last_checkpoint
        self._step: torch.Tensor | None = None  # first non-finite step (-1: none), on device
        self._epoch: torch.Tensor | None = None
        self._values: dict[str, torch.Tensor] = {}
        self._pending = 0
        self._now = 0

    def record(
        self, loss: torch.Tensor, components: Mapping[str, torch.Tensor], step: int, epoch: int
    ) -> None:
        """Note this step's loss; check every ``every`` steps."""
        bad = ~torch.isfinite(loss.detach())
        if self._step is None or self._epoch is None:
            self._step = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._epoch = torch.full((), -1, dtype=torch.int64, device=bad.device)
        first = bad & (self._step < 0)
        self._step = torch.where(first, step, self._step)
        self._epoch = torch.where(first, epoch, self._epoch)
        for k, v in components.items():
            v = v.detach().float()
            kept = self._values.get(k)
            self._values[k] = torch.where(first, v, kept if kept is not None else 0.0)
        self._pending += 1
        self._now = step
        if self._pending >= self.every:
            self.check()

    def check(self) -> None:
        """The deferred check's one host sync; raises if a recorded step was not finite."""
        if self._step is None or self._pending == 0:
            return
        self._pending = 0
        step = int(self._step)  # host sync, on purpose: once every `every` steps
        if step < 0:
            return
        values = {k: float(v) for k, v in self._values.items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        culprit = next((k for k in bad if k != "total"), "total")
        last = self.last_checkpoint
        where = f"; the last good checkpoint is {last}" if last and last.exists() else ""
        late = self._now - step
        seen = f" (seen {late} steps later, nan_check_every={self.every})" if late else ""
        raise KDError(
            f"non-finite loss at epoch {int(self._epoch)} step {step}: {culprit} = "
            f"{bad.get(culprit)} (components {bad}){seen}; lower the learning rate or check "
            f"the inputs{where}"
        )
