"""Image-classification distillation: a frozen teacher beside a student, pairs of outputs, one loss.

Modelled on ModelOpt's distillation API (wrap, map layer pairs to losses, balance, export the
bare student) without its class swapping: the user's student stays an instance of its own
class, hooks live in one :class:`~kdkit.capture.Capture` that :meth:`Distiller.export`
removes, and the teacher is held outside the module tree, so it is never in a state dict,
an optimizer, DDP or ``train()`` mode. ModelOpt's own two-call ``forward`` / ``compute_loss``
(with the state it carries between the calls) is :mod:`kdkit.compat.modelopt`'s; this class
is the :class:`~kdkit.task.Task` the :class:`~kdkit.Trainer` runs, one call per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdkit._distiller_checks import (
    as_teacher,
    check_images,
    check_not_the_student,
    pairs_or_criterion,
    run_teacher,
    target_device,
)
from kdkit._embedding import best_metric_for, evaluate_embedding, output_pair
from kdkit.balance import LossBalancer
from kdkit.capture import Capture, resolve_module, unwrap
from kdkit.data.pipeline import ModelInput
from kdkit.errors import KDError
from kdkit.load import restore_part
from kdkit.losses._call import call_loss, without_t2
from kdkit.losses.feature import build_saved_adapters
from kdkit.losses.task import check_labels, labeled_cross_entropy
from kdkit.metrics import classification_metrics
from kdkit.outputs import Forward, pick_output
from kdkit.pairs import Pair, PairInfo, PairTable, as_pairs, describe_pairs, shape_of
from kdkit.task import StepOutput, Task
from kdkit.teachers.base import Teacher, TeacherOutput, TopK

__all__ = [
    "Distiller",
    "Forward",
    "Pair",
    "PairInfo",
    "PairTable",
    "StepOutput",
    "labeled_cross_entropy",
]

Loss = nn.Module | Callable[..., torch.Tensor]

log = logging.getLogger(__name__)


class Distiller(Task):
    """Student + frozen teacher + typed loss :class:`~kdkit.Pair` records + a balancer.

    Args:
        student: the model to train (an ``nn.Module``; it stays an instance of its class).
        teacher: an ``nn.Module`` (run as a :class:`~kdkit.teachers.TorchTeacher`), any
            :class:`~kdkit.Teacher` backend (:func:`kdkit.make_teacher` builds them from
            paths, engines and lists), or None for plain supervised training.
        pairs: a list of :class:`~kdkit.Pair` (``Pair("layer3", "layer3", FeatureMSE(),
            weight=0.5)``; ``""`` names a model's output), one loss (the two outputs), or
            the shortcut ``{(student_layer, teacher_layer): loss}``.
        balancer: a :class:`~kdkit.LossBalancer`; None: one pair and no student loss give
            that pair's raw loss, else 0.5 / 0.5 (ModelOpt's rule).
        label_smoothing: of the task loss (the cross-entropy on labeled rows), in [0, 1).
        criterion: the first release's name of ``pairs`` (still accepted, with a
            :class:`~kdkit.errors.KDDeprecationWarning`).

    One step, all in one call (what the :class:`~kdkit.Trainer` runs; nothing is kept
    between calls)::

        out = distiller.step(x, y)               # y: -1 marks unlabeled rows
        out.loss.backward()                      # out.components: each loss, detached

    Losses with lazily created adapters (``FeatureMSE``) get their parameters on the first
    forward: :meth:`prepare` with an example batch before building the optimizer (the
    Trainer does it when :attr:`has_lazy_parameters`).
    """

    best_metric = ("top1", True)
    unit = "img"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Teacher | None,
        pairs: Loss | Sequence[Pair] | Mapping[tuple[str, str], Loss] | None = None,
        balancer: LossBalancer | None = None,
        *,
        label_smoothing: float = 0.0,
        output_key: str | int | None = None,
        criterion: Loss | Sequence[Pair] | Mapping[tuple[str, str], Loss] | None = None,
    ) -> None:
        super().__init__()
        pairs = pairs_or_criterion(pairs, criterion)  # criterion=: the first release's name
        if not 0.0 <= label_smoothing < 1.0:
            raise KDError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.output_key = output_key  # picks the logits of models returning containers
        if not isinstance(student, nn.Module):
            raise KDError(f"the student must be an nn.Module, got {type(student).__name__}")
        self.student = student
        check_not_the_student(student, teacher)
        if teacher is None and pairs is not None:
            raise KDError("loss pairs need a teacher: pass teacher=, or pairs=None")
        # Outside the module tree on purpose: see the module docstring. ``None`` means plain
        # supervised training through the same loop (the honest from-scratch baseline).
        object.__setattr__(self, "teacher", as_teacher(teacher))
        if teacher is not None and pairs is None:
            raise KDError("a teacher needs at least one loss pair: pass pairs=")
        self.pair_list: list[Pair] = as_pairs(pairs)
        self.criterion = nn.ModuleList([p.loss for p in self.pair_list])  # state dict keys
        self._takes_labels = [p.takes_labels for p in self.pair_list]
        self.balancer = balancer if balancer is not None else LossBalancer.default()
        for p in self.pair_list:
            if p.student:
                resolve_module(student, p.student, role="student")
        if self.teacher is not None:
            self.teacher.request_features([p.teacher for p in self.pair_list])
        self._teacher_hooked = True
        self._capture: Capture | None = None
        self._warned_late_params = False
        # the output distilled into a teacher feature is an embedding: no CE, another metric
        self._output_pair = output_pair(student, self.pair_list) if teacher is not None else None
        if self._output_pair is not None:
            self.best_metric = best_metric_for(self.teacher, student, self._output_pair)
            log.info(
                "the student's output is distilled into the teacher's %r: it is an embedding, "
                "so no cross-entropy is taken on it and epochs are ranked by val %s",
                self._output_pair.teacher,
                self.best_metric[0],
            )

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """``[(student_name, teacher_name), ...]`` in order (the balancer's keys)."""
        return [(p.student, p.teacher) for p in self.pair_list]

    @property
    def has_idle_parameters(self) -> bool:
        """Whether trainable loss parameters get no gradient in some steps (adapters before
        the balancer's ``start_epoch``): DDP must then look for unused parameters."""
        if self.balancer.start_epoch <= 0:
            return False
        return any(p.requires_grad for p in self.criterion.parameters())

    @property
    def has_lazy_parameters(self) -> bool:
        """Whether a loss still has to create its parameters on a first forward."""
        return any(getattr(loss, "adapter", "none") is None for loss in self.criterion)

    # -- running --------------------------------------------------------------------------
    def _student_capture(self) -> Capture:
        if not self._teacher_hooked and self.teacher is not None:
            # hooks were removed by export()/close(): restore them
            self.teacher.request_features([p.teacher for p in self.pair_list])
            self._teacher_hooked = True
        if self._capture is None or not self._capture.active:
            names = [p.student for p in self.pair_list]
            self._capture = Capture(self.student, names, role="student")
        return self._capture

    def set_epoch(self, epoch: float) -> None:
        """Forward the training position to the loss balancer's schedule."""
        self.balancer.set_epoch(epoch)

    def forward_both(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
        *,
        with_teacher: bool = True,
        ahead: Any = None,
    ) -> Forward:
        """Teacher (only while distillation is active, and ``with_teacher``; ``ahead``: its
        output started earlier, waited for here) and student on ``x``, features taken out of
        the hooks so nothing of this batch stays behind in them."""
        cap = self._student_capture()
        active = with_teacher and self.teacher is not None and self.balancer.active
        teacher_out = None
        if active:
            teacher_out = ahead.result() if ahead else self.teacher_forward(x, index, view)
        cap.clear()
        try:
            out = pick_output(self.student(x), self.output_key, "student")
            features = dict(cap.outputs)
        finally:
            cap.clear()
        if teacher_out is not None and not isinstance(
            teacher_out.logits, (torch.Tensor, TopK, type(None))
        ):
            logits = pick_output(teacher_out.logits, self.output_key, "teacher")
            teacher_out = dataclasses.replace(teacher_out, logits=logits)
        return Forward(out, features, teacher_out)

    def teacher_forward(
        self, x: torch.Tensor, index: torch.Tensor | None = None, view: torch.Tensor | None = None
    ) -> TeacherOutput:
        """The teacher's output on ``x`` (a device or dtype mismatch is one KDError)."""
        return run_teacher(self.teacher, x, index, view)

    def teacher_ahead(self, batch: Any, worker: Any) -> Any:
        """The next step's input with its teacher output started on ``worker`` (the loop's
        overlapped teacher, :mod:`kdkit.train.overlap`): nothing while distillation is off."""
        if not isinstance(batch, ModelInput) or self.teacher is None or not self.balancer.active:
            return batch
        args = (self.teacher, batch.x, batch.index, batch.view_ids)
        return dataclasses.replace(batch, teacher=worker.submit(lambda: run_teacher(*args)))

    def settle(self, example: Any, *, recorded: Any = None, **how: Any) -> list[Any]:
        """A teacher made with ``backend="auto"`` picks its backend here (Task.settle)."""
        settle = getattr(self.teacher, "settle", None)
        if not callable(settle) or not isinstance(example, ModelInput):
            return []
        return [settle(example.x, recorded=(recorded or {}).get("teacher.backend"), **how)]

    def step(
        self,
        x: torch.Tensor | ModelInput,
        labels: torch.Tensor | None = None,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> StepOutput:
        """One batch's loss, from its inputs alone: nothing is kept for the next call.

        ``x`` is an image batch (with ``labels``, ``index``, ``view``) or the
        :class:`~kdkit.data.pipeline.ModelInput` the Trainer's pipeline made. The task loss is
        :func:`labeled_cross_entropy` (rows labeled ``-1`` get only the distillation losses);
        every pair's loss and the task loss are combined by the balancer. Keep ``labels`` on
        the CPU: whether any row is labeled is then decided without a device sync.
        """
        ahead = None  # the teacher's output, computed beside the previous step
        if isinstance(x, ModelInput):
            ahead = x.teacher
            labeled, labels, index, view, x = x.labeled, x.labels, x.index, x.view_ids, x.x
        else:
            check_images(x)
            if labels is not None:
                check_labels(labels)
            labeled = labels is not None and bool((labels >= 0).any())
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0:
            raise KDError("an empty batch (0 samples): check the loader (a filter or sampler "
                          "that left nothing)")  # fmt: skip
        run = self.forward_both(x, index, view, ahead=ahead)
        task = None
        device_labels = None
        if labels is not None:
            device_labels = labels.to(x.device, non_blocking=True)
        if labeled and self._output_pair is None:
            if isinstance(run.output, torch.Tensor) and run.output.dim() >= 2:
                check_labels(labels, run.output.shape[1])
            task = labeled_cross_entropy(run.output, device_labels, self.label_smoothing)
        total, components = self.combine(run, task, device_labels)
        return StepOutput(total, components, run.output)

    def forward(self, x: torch.Tensor) -> Any:
        """The student's output (no teacher): a Distiller evaluates like its student."""
        return pick_output(self.student(x), self.output_key, "student")

    def combine(
        self, run: Forward, student_loss: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every pair's loss + the task loss -> (total, detached components), in one pass."""
        distill: dict[str, torch.Tensor] = {}
        weighted: dict[str, torch.Tensor] = {}
        keys: dict[str, tuple[str, str]] = {}
        components: dict[str, torch.Tensor] = {}
        if run.teacher is not None:
            n_params = sum(1 for _ in self.criterion.parameters())
            for pair, with_labels in zip(self.pair_list, self._takes_labels, strict=True):
                value = self._pair_loss(run, pair, labels, with_labels)
                distill[pair.name] = value
                weighted[pair.name] = value * pair.weight if pair.weight != 1.0 else value
                keys[pair.name] = (pair.student, pair.teacher)
                unscaled = without_t2(pair.loss, value)
                if unscaled is not None:  # logged both ways: with T^2 and without
                    components[f"{pair.name}_unscaled"] = unscaled
            if sum(1 for _ in self.criterion.parameters()) != n_params:
                self._warn_late_params()
        total = self.balancer(weighted, student_loss, keys)
        components = {**distill, **components}
        if student_loss is not None:
            components["student"] = student_loss
        components["total"] = total
        return total, {k: v.detach() for k, v in components.items()}

    def _warn_late_params(self) -> None:
        """Loss parameters created by a training forward cannot be in an optimizer built
        before it: they would silently never train. Say so once, loudly."""
        if self._warned_late_params:
            return
        self._warned_late_params = True
        warnings.warn(
            "a loss created new parameters on its first call (a lazy adapter, e.g. "
            "FeatureMSE's projection); an optimizer built before this batch does not hold "
            "them and will never train them. Call distiller.prepare(example_batch) before "
            "building the optimizer (kdkit.Trainer does this itself).",
            UserWarning,
            stacklevel=4,
        )

    def pair_loss(
        self, run: Forward, pair: Pair, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One pair's loss on a :class:`Forward` (its errors name the pair)."""
        return self._pair_loss(run, pair, labels, pair.takes_labels)

    def _pair_loss(self, run: Forward, pair: Pair, labels, with_labels: bool) -> torch.Tensor:
        s_out = run.feature(pair.student)
        t_out = run.teacher.get(pair.teacher)
        where = f"pair {pair.student or '<output>'!r} <- {pair.teacher or '<output>'!r}"
        try:
            return call_loss(pair.loss, s_out, t_out, labels, with_labels)
        except KDError as err:
            raise KDError(f"{where}: {err}") from None
        except RuntimeError as err:
            raise KDError(
                f"{where}: student shape {shape_of(s_out)} and teacher shape {shape_of(t_out)} "
                f"do not fit {type(pair.loss).__name__} ({err})"
            ) from None

    # -- the Task protocol: evaluation and checkpoint parts ----------------------------------
    @torch.no_grad()
    def evaluate(
        self, batches: Iterable[ModelInput], autocast: Callable = contextlib.nullcontext
    ) -> dict[str, float]:
        """Top-1 / top-5 accuracy (%) and cross-entropy of the student on labeled rows; for an
        embedding student, see :mod:`kdkit._embedding` (``pair_loss``, and scores through
        the teacher's head when it has one)."""
        student = self.student
        was_training = student.training
        student.eval()
        try:
            if self._output_pair is not None:
                return evaluate_embedding(self, self._output_pair, batches, autocast)
            scores = classification_metrics(((b.x, b.labels) for b in batches), student, autocast)
        finally:
            student.train(was_training)
        scores.pop("images")
        return scores

    def checkpoint_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "student": unwrap(self.student).state_dict(),
            "adapters": self.criterion.state_dict(),
        }

    def load_checkpoint_state(self, state: Mapping[str, Any], where: str = "") -> None:
        restore_part(where, "student", unwrap(self.student), state.get("student"))
        restore_part(where, "adapters", self.criterion, state.get("adapters"))

    def check_inputs(self, dataset: Any, inputs: Any) -> None:
        """The teacher answers for the training data (a cache of another dataset, or of
        other mixing partners, is refused here, once, before the first step)."""
        if self.teacher is not None:
            self.teacher.check_dataset(dataset, getattr(inputs, "sampler", None))

    # -- set-up and inspection -------------------------------------------------------------
    @torch.no_grad()
    def describe(
        self,
        example_input: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> PairTable:
        """Dry-run one batch (student in eval mode) and tabulate every pair.

        Also materialises lazily created adapters, so call it before building an optimizer.
        ``index``/``view`` are needed by cache-backed teachers (``CachedTeacher``).
        """
        if self.teacher is None:
            return PairTable()
        was_training = self.training
        was_epoch = self.balancer.epoch
        self.balancer.set_epoch(max(self.balancer.epoch, self.balancer.start_epoch))
        self.eval()
        try:
            run = self.forward_both(example_input, index, view)
            return describe_pairs(
                run,
                self.pair_list,
                self._takes_labels,
                lambda pair, with_labels: self._pair_loss(run, pair, labels, with_labels),
            )
        finally:
            self.balancer.set_epoch(was_epoch)
            self.train(was_training)

    def prepare(
        self,
        example_input: torch.Tensor | ModelInput,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> None:
        """Materialise lazy adapters with one dry run (see the class docstring)."""
        if isinstance(example_input, ModelInput):
            example_input, index, view = (
                example_input.x,
                example_input.index,
                example_input.view_ids,
            )
        self.describe(example_input, index=index, view=view)

    def to(self, *args: Any, **kwargs: Any) -> Distiller:
        super().to(*args, **kwargs)
        device = target_device(args, kwargs)
        if device is not None and self.teacher is not None:
            self.teacher.to(device)
        return self

    # -- export and state ------------------------------------------------------------------
    def export(self) -> nn.Module:
        """The trained student as the user's own class, with no kdkit hooks left on it."""
        self.close()
        return unwrap(self.student)

    def close(self) -> None:
        """Remove every hook kdkit placed on the student and the teacher."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        close_teacher = getattr(self.teacher, "close", None) if self.teacher is not None else None
        if callable(close_teacher):
            close_teacher()
            self._teacher_hooked = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        # lazily created adapters do not exist in a fresh Distiller yet: built from the saved
        # shapes first, so save -> restore round-trips
        build_saved_adapters(self.criterion, state_dict, f"{prefix}criterion.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
