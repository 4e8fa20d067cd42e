"""Run a frozen teacher beside a student and turn their outputs into one loss.

Modelled on ModelOpt's distillation API (wrap, map layer pairs to losses, balance, export the
bare student) without its class swapping: the user's student stays an instance of its own
class, hooks live in one :class:`~kdkit.capture.Capture` that :meth:`Distiller.export`
removes, and the teacher is held outside the module tree, so it is never in a state dict,
an optimizer, DDP or ``train()`` mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdkit._distill_config import parse_distill_config
from kdkit.balance import LossBalancer
from kdkit.capture import Capture, resolve_module, unwrap
from kdkit.errors import KDError
from kdkit.losses._call import as_loss_module, call_loss, takes_labels, without_t2
from kdkit.teachers.base import Teacher, TeacherOutput, TopK
from kdkit.teachers.factory import teacher as make_teacher

__all__ = ["Distiller", "PairInfo", "PairTable", "StepOutput", "labeled_cross_entropy"]

Loss = nn.Module | Callable[..., torch.Tensor]


def pair_name(student_name: str, teacher_name: str) -> str:
    """Component name used in logs and balancer weights: ``"output"`` for the final outputs."""
    if student_name == "" and teacher_name == "":
        return "output"
    return f"{student_name or 'output'}<-{teacher_name or 'output'}"


def _shape(t: object) -> tuple[int, ...]:
    if isinstance(t, TopK):
        return tuple(t.values.shape)
    if isinstance(t, torch.Tensor):
        return tuple(t.shape)
    raise KDError(f"expected a tensor output, got {type(t).__name__}")


def _count_params(module: nn.Module) -> int:
    return sum(1 for _ in module.parameters())


def check_labels(labels: torch.Tensor, num_classes: int | None = None) -> None:
    """Labels are integer class ids in ``[0, num_classes)`` or ``-1`` (unlabeled); anything
    else (float labels, -5, a class id past the logits) is refused instead of being taken as
    unlabeled or failing deep in cross-entropy. Read on the CPU copy: no device sync."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise KDError(
            f"labels must be integer class ids (int64), got {labels.dtype}; convert them with "
            "labels.long() (use -1 for unlabeled rows)"
        )
    if labels.device.type != "cpu" or not labels.numel():
        return
    low, high = int(labels.min()), int(labels.max())
    if low < -1 or (num_classes is not None and high >= num_classes):
        limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise KDError(
            f"labels must be class ids in {limit} or -1 for unlabeled rows; got values in "
            f"[{low}, {high}]"
        )


def labeled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the labeled rows (label >= 0), divided by ALL rows (N).

    Per-sample weighting: the batch loss is the mean over every row of (task_i if labeled) +
    distill_i. A mean over the labeled rows alone would give each of the ~2 labeled rows in a
    1k-of-60k batch 60x the weight of an unlabeled one (measured on Fashion-MNIST: 81.1% vs
    87.2% after 2 epochs). Logits (N, C) are upcast to fp32.
    """
    summed = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    return summed / labels.shape[0]


def _check_not_the_student(student: nn.Module, teacher: Any) -> None:
    """Wrapping the student as its own teacher would freeze it in place (a teacher is set
    to eval with requires_grad=False): refuse it, and a teacher sharing its parameters."""
    module = teacher if isinstance(teacher, nn.Module) else getattr(teacher, "module", None)
    if not isinstance(module, nn.Module):
        return
    mine = {id(p) for p in student.parameters()}
    if module is student or any(id(p) in mine for p in module.parameters()):
        raise KDError(
            "the teacher is the student (or shares its parameters); distillation needs a "
            "separate, trained teacher: pass a copy (copy.deepcopy(model)) or load one"
        )


@dataclass(frozen=True)
class StepOutput:
    """What one batch produced: ``loss`` (with its graph, from :meth:`Distiller.step`; the
    Trainer hands callbacks a detached copy), ``components`` (detached scalars: one per pair
    by :func:`pair_name`, ``"student"`` when the batch had labeled rows, ``"total"``) and
    ``logits``, the student's output."""

    loss: torch.Tensor
    components: dict[str, torch.Tensor]
    logits: torch.Tensor


@dataclass(frozen=True)
class _Forward:
    """One forward pass: the student's output, its captured features by module name, and
    the teacher's output (None while distillation is off)."""

    output: Any
    features: Mapping[str, object]
    teacher: TeacherOutput | None

    def feature(self, name: str) -> object:
        if name == "":
            return self.output
        try:
            return self.features[name]
        except KeyError:
            raise KDError(
                f"{name!r} produced no output in the forward pass (captured: "
                f"{sorted(self.features)}); is that module used in forward()?"
            ) from None


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device in a ``Module.to(...)`` call (``to(device)``, ``to(tensor)``,
    ``to(device, dtype)``, ``to(device=...)``), None for a dtype-only call."""
    target = kwargs.get("device", kwargs.get("tensor"))
    for arg in (target, *args):
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (str, int, torch.device)):
            return torch.device(arg)
    return None


def _criterion_items(criterion, teacher_given: bool) -> list[tuple[tuple[str, str], nn.Module]]:
    """Normalise ``criterion`` to ``[((student_name, teacher_name), loss), ...]``."""
    if not teacher_given:
        if criterion is not None:
            raise KDError("a criterion needs a teacher: pass teacher=, or criterion=None")
        return []
    if not isinstance(criterion, Mapping):
        criterion = {("", ""): criterion}  # one loss on the two models' outputs
    if not criterion:
        raise KDError("criterion must be a loss (module or callable) or a dict {(s, t): loss}")
    items = []
    for key, loss in criterion.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            raise KDError(f"criterion keys must be (student_name, teacher_name), got {key!r}")
        items.append((key, as_loss_module(loss, where=f"the loss for {key}")))
    return items


@dataclass
class PairInfo:
    """One row of :meth:`Distiller.describe`."""

    name: str
    student: str
    teacher: str
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]
    adapter: str
    loss: str


class PairTable(list):
    """A list of :class:`PairInfo` that prints as a table."""

    def __str__(self) -> str:
        head = ("pair", "student shape", "teacher shape", "adapter", "loss")
        rows = [
            (p.name, str(p.student_shape), str(p.teacher_shape), p.adapter, p.loss) for p in self
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)


class Distiller(nn.Module):
    """Student + frozen teacher + ``{(student_layer, teacher_layer): loss}``.

    ``criterion`` is one loss (applied to the two models' final outputs) or a dict mapping
    ``(student_module_name, teacher_module_name)`` to a loss; ``""`` names a model's own
    output. A loss is any module or callable called as ``loss(student_out, teacher_out)``;
    ``labels=`` is passed only to losses whose signature has a ``labels`` parameter (or
    ``**kwargs``), so ``nn.MSELoss()`` and plain functions work as in ModelOpt. With no
    ``loss_balancer``, one pair and no student loss the total is that pair's raw loss (see
    :class:`~kdkit.LossBalancer`). ``teacher`` is an ``nn.Module`` or any
    :class:`~kdkit.teachers.Teacher` backend; :meth:`from_config` takes ModelOpt's dict.

    A step, all in one call (what the :class:`~kdkit.Trainer` runs; nothing is kept
    between calls)::

        out = distiller.step(x, y)               # y: -1 marks unlabeled rows
        out.loss.backward()                      # out.components: each loss, detached

    or ModelOpt's two calls, with your own task loss::

        logits = distiller(x)                    # teacher (no grad) + student
        loss = distiller.compute_loss(F.cross_entropy(logits, y))
        loss.backward()

    Losses with lazily created adapters (``FeatureMSE``) get their parameters on the first
    forward: call :meth:`prepare` (or :meth:`describe`) with an example batch *before*
    building the optimizer, or the adapters will not be trained (a forward that creates
    them warns once). The :class:`~kdkit.Trainer` does this for you.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Teacher | None,
        criterion: Loss | Mapping[tuple[str, str], Loss] | None = None,
        loss_balancer: LossBalancer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise KDError(f"the student must be an nn.Module, got {type(student).__name__}")
        self.student = student
        # Stored outside the module tree on purpose: see the module docstring. ``None`` means
        # plain supervised training through the same loop (the honest from-scratch baseline).
        _check_not_the_student(student, teacher)
        object.__setattr__(self, "teacher", None if teacher is None else make_teacher(teacher))
        self.pairs: list[tuple[str, str]] = []
        losses = []
        for key, loss in _criterion_items(criterion, teacher_given=teacher is not None):
            self.pairs.append(key)
            losses.append(loss)
        self.criterion = nn.ModuleList(losses)
        # ModelOpt's custom losses are loss(student, teacher): pass labels only where asked
        self._loss_takes_labels = [takes_labels(loss) for loss in losses]
        self.balancer = loss_balancer if loss_balancer is not None else LossBalancer.default()
        for s_name, _ in self.pairs:
            if s_name:
                resolve_module(student, s_name, role="student")
        if self.teacher is not None:
            self.teacher.request_features([t for _, t in self.pairs])
        self._teacher_hooked = True
        self._capture: Capture | None = None
        # Only for the ModelOpt-style pair forward() -> compute_loss(); step() never reads it.
        self._pending: tuple[_Forward, torch.Tensor | None] | None = None
        # Written by every loss computation for `last_losses` (logging); never read back.
        self._components: dict[str, torch.Tensor] = {}
        self._warned_late_params = False

    @classmethod
    def from_config(
        cls, student: nn.Module, config: Mapping[str, Any], *, trust_code: bool = False
    ) -> Distiller:
        """A Distiller from ModelOpt's config dict, ``{"teacher_model": ..., "criterion": ...,
        "loss_balancer": ...}``; the ``kdkit train`` YAML comes through here too.

        ``teacher_model`` may be a module, a class or callable (called with no arguments), a
        tuple ``(callable, args, kwargs)``, a model string or a teacher file; see
        :mod:`kdkit._distill_config` for every accepted form. ``trust_code`` allows
        ``python:`` model strings.
        """
        teacher, criterion, balancer = parse_distill_config(config, trust_code=trust_code)
        return cls(student, teacher, criterion, balancer)

    # -- running --------------------------------------------------------------------------
    def _student_capture(self) -> Capture:
        if not self._teacher_hooked and self.teacher is not None:
            # hooks were removed by export()/close(): restore them
            self.teacher.request_features([t for _, t in self.pairs])
            self._teacher_hooked = True
        if self._capture is None or not self._capture.active:
            names = [s for s, _ in self.pairs]
            self._capture = Capture(self.student, names, role="student")
        return self._capture

    def set_epoch(self, epoch: float) -> None:
        """Forward the training position to the loss balancer's schedule."""
        self.balancer.set_epoch(epoch)

    def _run(
        self, x: torch.Tensor, index: torch.Tensor | None, view: torch.Tensor | None
    ) -> _Forward:
        """Teacher (only while distillation is active) and student on ``x``, features taken
        out of the hooks so nothing of this batch stays behind in them."""
        cap = self._student_capture()
        active = self.teacher is not None and self.balancer.active
        teacher_out = self._teacher_forward(x, index, view) if active else None
        cap.clear()
        try:
            out = self.student(x)
            features = dict(cap.outputs)
        finally:
            cap.clear()
        return _Forward(out, features, teacher_out)

    def _teacher_forward(self, x: torch.Tensor, index, view) -> TeacherOutput:
        try:
            return self.teacher(x, index=index, view=view)
        except RuntimeError as err:
            text = str(err)
            words = ("device", "dtype", "scalar type", "same type", "should be the same")
            if not any(w in text for w in words):
                raise
            first = (text.strip().splitlines() or [""])[0]
            raise KDError(
                f"the teacher cannot run on this batch ({x.dtype} on {x.device}): {first[:200]}"
                "; move it with distiller.to(device) (the Trainer does) and keep it in the "
                "batch's dtype, or give TorchTeacher(precision=...)"
            ) from None

    def step(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> StepOutput:
        """One batch's loss, from its inputs alone: nothing is kept for the next call.

        The task loss is :func:`labeled_cross_entropy` (rows labeled ``-1`` are unlabeled and
        get only the distillation losses); every pair's loss and the task loss are combined
        by the balancer. ``index``/``view`` identify the samples for cache-backed teachers.
        Keep ``labels`` on the CPU: whether any row is labeled is then decided without a
        device sync.

        ``step`` is what :class:`~kdkit.Trainer` runs (inside DDP, so the adapters' gradients
        are averaged like the student's); a hand-written loop can call it too::

            out = distiller.step(x, y)
            out.loss.backward()
        """
        if labels is not None:
            check_labels(labels)
        labeled = labels is not None and bool((labels >= 0).any())
        host_labels = labels
        if labels is not None:
            labels = labels.to(x.device, non_blocking=True)
        run = self._run(x, index, view)
        if labeled and isinstance(run.output, torch.Tensor) and run.output.dim() >= 2:
            check_labels(host_labels, run.output.shape[1])
        task = labeled_cross_entropy(run.output, labels) if labeled else None
        total, components = self._combine(run, task, labels)
        return StepOutput(total, components, run.output)

    def forward(
        self,
        x: torch.Tensor,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """The student's output on ``x``, for ModelOpt-style loops that then call
        :meth:`compute_loss` (new code can use :meth:`step`, which needs no second call).

        The teacher runs too (only while distillation is active); its output and ``labels``
        (``-1`` for unlabeled rows, passed to losses that take them, e.g. DKD) are held until
        :meth:`compute_loss`.
        """
        run = self._run(x, index, view)
        self._pending = (run, labels)
        return run.output

    def compute_loss(
        self, student_loss: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distillation losses of the last :meth:`forward`, combined with ``student_loss``."""
        if self._pending is None:
            raise KDError("call the distiller on a batch (distiller(x)) before compute_loss()")
        run, forward_labels = self._pending
        total, _ = self._combine(run, student_loss, forward_labels if labels is None else labels)
        return total

    def _combine(
        self, run: _Forward, student_loss: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every pair's loss + the task loss -> (total, detached components)."""
        distill: dict[str, torch.Tensor] = {}
        names: dict[str, tuple[str, str]] = {}
        if run.teacher is not None:
            n_params = _count_params(self.criterion)
            for (s_name, t_name), loss in zip(self.pairs, self.criterion, strict=True):
                name = pair_name(s_name, t_name)
                distill[name] = self._pair_loss(run, s_name, t_name, loss, labels)
                names[name] = (s_name, t_name)
            if _count_params(self.criterion) != n_params:
                self._warn_late_params()
        total = self.balancer(distill, student_loss, names)
        components = dict(distill)
        for (s_name, t_name), loss in zip(self.pairs, self.criterion, strict=True):
            name = pair_name(s_name, t_name)
            unscaled = without_t2(loss, distill[name]) if name in distill else None
            if unscaled is not None:  # logged both ways: with T^2 and without (issue 11)
                components[f"{name}_unscaled"] = unscaled
        if student_loss is not None:
            components["student"] = student_loss
        components["total"] = total
        components = {k: v.detach() for k, v in components.items()}
        self._components = components
        return total, components

    def _warn_late_params(self) -> None:
        """Loss parameters created by a training forward cannot be in an optimizer built
        before it: they would silently never train (issue 11). Say so once, loudly."""
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

    def _pair_loss(
        self, run: _Forward, s_name: str, t_name: str, loss: nn.Module, labels
    ) -> torch.Tensor:
        s_out = run.feature(s_name)
        t_out = run.teacher.get(t_name)
        try:
            index = next(i for i, c in enumerate(self.criterion) if c is loss)
            return call_loss(loss, s_out, t_out, labels, self._loss_takes_labels[index])
        except KDError as err:
            raise KDError(
                f"pair {s_name or '<output>'!r} <- {t_name or '<output>'!r}: {err}"
            ) from None
        except RuntimeError as err:
            raise KDError(
                f"pair {s_name or '<output>'!r} <- {t_name or '<output>'!r}: student shape "
                f"{_shape(s_out)} and teacher shape {_shape(t_out)} do not fit "
                f"{type(loss).__name__} ({err})"
            ) from None

    @property
    def last_losses(self) -> dict[str, float]:
        """Each loss component of the last :meth:`step` or :meth:`compute_loss`, as floats,
        for hand-written loops that log (the Trainer uses :attr:`StepOutput.components`).

        Converted on access, not every step, so a training loop pays a device sync only when
        it actually logs.
        """
        return {k: float(v) for k, v in self._components.items()}

    @property
    def last_loss_tensors(self) -> dict[str, torch.Tensor]:
        """:attr:`last_losses` as detached tensors (kept for existing callers)."""
        return dict(self._components)

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
        was_training = self.training
        was_active_epoch = self.balancer.epoch
        self.balancer.set_epoch(max(self.balancer.epoch, self.balancer.start_epoch))
        self.eval()
        try:
            run = self._run(example_input, index, view)
            table = PairTable()
            for (s_name, t_name), loss in zip(self.pairs, self.criterion, strict=True):
                s_out = run.feature(s_name)
                t_out = run.teacher.get(t_name)
                self._pair_loss(run, s_name, t_name, loss, labels)
                summary = getattr(loss, "adapter_summary", None)
                adapter = summary(_shape(s_out), _shape(t_out)) if callable(summary) else "none"
                table.append(
                    PairInfo(
                        pair_name(s_name, t_name),
                        s_name or "<output>",
                        t_name or "<output>",
                        _shape(s_out),
                        _shape(t_out),
                        adapter,
                        repr(loss).replace("\n", " "),
                    )
                )
        finally:
            self.balancer.set_epoch(was_active_epoch)
            self.train(was_training)
        return table

    def prepare(
        self,
        example_input: torch.Tensor,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> None:
        """Materialise lazy adapters with one dry run (see the class docstring)."""
        self.describe(example_input, index=index, view=view)

    def to(self, *args: Any, **kwargs: Any) -> Distiller:
        super().to(*args, **kwargs)
        device = _target_device(args, kwargs)
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
        self._pending = None
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        close_teacher = getattr(self.teacher, "close", None) if self.teacher is not None else None
        if callable(close_teacher):
            close_teacher()
            self._teacher_hooked = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        # Adapters created lazily on a first forward do not exist in a fresh Distiller yet;
        # build them from the saved shapes so save -> restore round-trips.
        for i, loss in enumerate(self.criterion):
            key = f"{prefix}criterion.{i}.adapter.weight"
            if key in state_dict and getattr(loss, "adapter", "missing") is None:
                weight = state_dict[key]
                has_bias = f"{prefix}criterion.{i}.adapter.bias" in state_dict
                c_out, c_in = weight.shape[:2]
                if weight.dim() == 4:
                    loss.adapter = nn.Conv2d(c_in, c_out, 1, bias=has_bias)
                else:
                    loss.adapter = nn.Linear(c_in, c_out, bias=has_bias)
                loss.adapter.to(weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
