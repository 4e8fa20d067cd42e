"""What the training loop trains: a *task* that owns the step and the evaluation.

The loop (:class:`kdkit.Trainer`: precision, checkpoints and exact resume, DDP, the NaN guard,
metrics, callbacks) knows nothing about images or tokens. It asks a task for three things:

- ``task.step(batch) -> StepOutput``: the loss of one model input (what the task's input
  pipeline made of a raw batch), with detached components to log;
- ``task.evaluate(batches, autocast) -> dict``: metrics on held-out input (the loop calls it
  with the pipeline's un-augmented batches and the run's autocast);
- ``task.checkpoint_state()`` / ``task.load_checkpoint_state(state)``: the trainable weights,
  by part (``"student"``, ``"adapters"``), as they go into ``last.pt`` / ``best.pt``;
- ``task.teacher_ahead(batch, worker)``: start the teacher's work for the *next* step's input
  while the current one steps (:mod:`kdkit.train.overlap`); the default has nothing to start.

A task is a subclass of :class:`Task`, an ``nn.Module`` (the optimizer, DDP and
``.to(device)`` see its parameters; a frozen teacher stays outside its module tree) whose
defaults cover everything else the loop calls. :class:`kdkit.Distiller` is the
image-classification task; :class:`kdkit.lm.LMTask` the language-model one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.load import restore_part

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


class Task(nn.Module):
    """The base class of what :class:`kdkit.Trainer` trains (see the module docstring).

    A subclass implements :meth:`step` and, to be scored on val data, :meth:`evaluate`; every
    other member the loop uses has a default here, so the loop asks for it directly instead of
    probing. Like timm's ``TrainingTask``: one level of base class, no deeper.
    """

    #: the metric ``best.pt`` is chosen on (a key of :meth:`evaluate`), and whether higher is
    #: better
    best_metric: tuple[str, bool] = ("loss", False)
    #: what ``StepOutput.size`` counts, for the ``{unit}_per_s`` throughput column
    unit: str = "item"
    #: a loss still has to create its parameters on a first forward (:meth:`prepare` does)
    has_lazy_parameters: bool = False
    #: some trainable parameters get no gradient in some steps (DDP must look for them)
    has_idle_parameters: bool = False

    def step(self, batch: Any) -> StepOutput:
        """The loss of one model input (what the input pipeline made of a raw batch)."""
        raise TypeError(f"{type(self).__name__} is a Task without a step(batch) method")

    def evaluate(
        self,
        batches: Iterable[Any],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> dict[str, float]:
        """Metrics on held-out batches (un-augmented), the model run under ``autocast``."""
        raise KDError(f"{type(self).__name__} has no evaluate(): train it without a val_loader")

    def set_epoch(self, epoch: float) -> None:
        """The training position (fractional epochs), for schedules inside the task."""

    def prepare(self, batch: Any) -> None:
        """One dry run on an example input, creating lazy parameters before the optimizer."""

    def teacher_ahead(self, batch: Any, worker: Any) -> Any:
        """``batch`` (a later step's model input) carrying its teacher's work, started on
        ``worker`` (``worker.submit(fn)`` returns a pending result whose ``result()`` waits for
        ``fn()``): the loop calls it with the next batch before stepping the current one, so the
        teacher runs beside the student, and :meth:`step` reads the result instead of running
        the teacher. The default (nothing to run ahead) returns ``batch`` unchanged."""
        return batch

    def settle(
        self,
        example: Any,
        *,
        inputs: Any = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        recorded: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """Choices measured on the run's first model input ``example`` before the first step
        (a teacher made with ``backend="auto"`` picks its backend here, completing its
        calibration with the input pipeline ``inputs``); ``recorded``: the records of a resumed
        run (``{key: record}``), kept instead. Returns the choices made
        (:class:`~kdkit.teachers.autotune.Choice`); the default has none."""
        return []

    def check_inputs(self, dataset: Any, inputs: Any) -> None:
        """Refuse training data that does not fit the task (e.g. a teacher cache of another
        dataset), once, before the first step. The default accepts anything."""

    def epoch_stats(self) -> dict[str, float]:
        """Statistics of the epoch that just ended, for its metrics row (then reset); the
        default has none. The LM task's on-policy sampling reports its samples here."""
        return {}

    def checkpoint_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trainable weights by part, as they go into ``last.pt`` / ``best.pt``."""
        return {"task": self.state_dict()}

    def load_checkpoint_state(self, state: Mapping[str, Any], where: str = "") -> None:
        restore_part(where, "task", self, state.get("task"))
