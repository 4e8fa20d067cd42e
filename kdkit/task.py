"""What the training loop trains: a *task* that owns the step and the evaluation.

The loop (:class:`kdkit.Trainer`: precision, checkpoints and exact resume, DDP, the NaN guard,
metrics, callbacks) knows nothing about images or tokens. It asks a task for three things:

- ``task.step(batch) -> StepOutput``: the loss of one model input (what the task's input
  pipeline made of a raw batch), with detached components to log;
- ``task.evaluate(batches) -> dict``: metrics on held-out input (the loop calls it with the
  pipeline's un-augmented batches, under the run's autocast);
- ``task.checkpoint_state()`` / ``task.load_checkpoint_state(state)``: the trainable weights,
  by part (``"student"``, ``"adapters"``), as they go into ``last.pt`` / ``best.pt``.

A task is an ``nn.Module`` (the optimizer, DDP and ``.to(device)`` see its parameters; a frozen
teacher stays outside its module tree). :class:`kdkit.Distiller` is the image-classification
task; :class:`kdkit.lm.LMTask` the language-model one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["StepOutput", "Task"]


@dataclass(frozen=True)
class StepOutput:
    """What one batch produced.

    - ``loss``: the value to backpropagate (with its graph; the loop hands callbacks a detached
      copy). A mean, unless ``normalizer`` is set.
    - ``components``: detached scalars to log, e.g. one per loss pair, ``"student"``, ``"total"``.
    - ``logits``: the student's output (image tasks), or None.
    - ``count``: samples (or tokens) in the batch, for throughput; default ``len(logits)``.
    - ``normalizer``: when set, ``loss`` is a *sum* over ``normalizer`` items (tokens) and the
      loop divides the gradients by the sum of normalizers over every micro-batch of the
      optimizer step and every DDP rank (one all-reduce per step), so splitting a batch into
      micro-batches or ranks never changes the gradient.
    """

    loss: torch.Tensor
    components: Mapping[str, torch.Tensor]
    logits: torch.Tensor | None = None
    count: int | None = None
    normalizer: float | None = None

    @property
    def size(self) -> int:
        if self.count is not None:
            return int(self.count)
        return 0 if self.logits is None else int(self.logits.shape[0])

    def detached(self) -> StepOutput:
        logits = None if self.logits is None else self.logits.detach()
        return StepOutput(
            self.loss.detach(), dict(self.components), logits, self.count, self.normalizer
        )

    def as_dict(self) -> dict[str, Any]:
        """For DDP's forward: it finds the tensors the loss used only in dicts and sequences,
        not in dataclasses (pytorch/pytorch#124666), so the step module returns this."""
        return {
            "loss": self.loss,
            "components": dict(self.components),
            "logits": self.logits,
            "count": self.count,
            "normalizer": self.normalizer,
        }


@runtime_checkable
class Task(Protocol):
    """The protocol :class:`kdkit.Trainer` trains (see the module docstring)."""

    #: the metric ``best.pt`` is chosen on, and whether higher is better
    best_metric: tuple[str, bool]
    #: what ``StepOutput.size`` counts, for the ``{unit}_per_s`` throughput column
    unit: str

    def step(self, batch: Any) -> StepOutput: ...

    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]: ...

    def set_epoch(self, epoch: float) -> None: ...

    def checkpoint_state(self) -> dict[str, dict[str, torch.Tensor]]: ...

    def load_checkpoint_state(self, state: Mapping[str, Any], where: str = "") -> None: ...
