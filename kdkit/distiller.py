"""Run a frozen teacher beside a student and turn their outputs into one loss.

Modelled on ModelOpt's distillation API (wrap, map layer pairs to losses, balance, export the
bare student) without its class swapping: the user's student stays an instance of its own
class, hooks live in one :class:`~kdkit.capture.Capture` that :meth:`Distiller.export`
removes, and the teacher is held outside the module tree, so it is never in a state dict,
an optimizer, DDP or ``train()`` mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.balance import LossBalancer
from kdkit.capture import Capture, resolve_module, unwrap
from kdkit.errors import KDError
from kdkit.teachers.base import Teacher, TeacherOutput, TopK
from kdkit.teachers.factory import teacher as make_teacher

__all__ = ["Distiller", "PairInfo", "PairTable"]


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


def _criterion_items(criterion, teacher_given: bool) -> list[tuple[tuple[str, str], nn.Module]]:
    """Normalise ``criterion`` to ``[((student_name, teacher_name), loss), ...]``."""
    if not teacher_given:
        if criterion is not None:
            raise KDError("a criterion needs a teacher: pass teacher=, or criterion=None")
        return []
    if isinstance(criterion, nn.Module):
        criterion = {("", ""): criterion}
    if not isinstance(criterion, Mapping) or not criterion:
        raise KDError("criterion must be a loss module or a non-empty dict {(s, t): loss}")
    items = []
    for key, loss in criterion.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            raise KDError(f"criterion keys must be (student_name, teacher_name), got {key!r}")
        if not isinstance(loss, nn.Module):
            raise KDError(f"the loss for {key} must be an nn.Module, got {type(loss).__name__}")
        items.append((key, loss))
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
    output. ``teacher`` is an ``nn.Module`` or any :class:`~kdkit.teachers.Teacher` backend.

    Typical step::

        out = distiller(x)                       # teacher (no grad) + student
        loss = distiller.compute_loss(F.cross_entropy(out, y))
        loss.backward()

    Losses with lazily created adapters (``FeatureMSE``) get their parameters on the first
    forward: call :meth:`prepare` (or :meth:`describe`) with an example batch *before*
    building the optimizer, or the adapters will not be trained. The :class:`~kdkit.Trainer`
    does this for you.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Teacher | None,
        criterion: nn.Module | Mapping[tuple[str, str], nn.Module] | None = None,
        loss_balancer: LossBalancer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise KDError(f"the student must be an nn.Module, got {type(student).__name__}")
        self.student = student
        # Stored outside the module tree on purpose: see the module docstring. ``None`` means
        # plain supervised training through the same loop (the honest from-scratch baseline).
        object.__setattr__(self, "teacher", None if teacher is None else make_teacher(teacher))
        self.pairs: list[tuple[str, str]] = []
        losses = []
        for key, loss in _criterion_items(criterion, teacher_given=teacher is not None):
            self.pairs.append(key)
            losses.append(loss)
        self.criterion = nn.ModuleList(losses)
        self.balancer = loss_balancer or LossBalancer()
        for s_name, _ in self.pairs:
            if s_name:
                resolve_module(student, s_name, role="student")
        if self.teacher is not None:
            self.teacher.request_features([t for _, t in self.pairs])
        self._teacher_hooked = True
        self._capture: Capture | None = None
        self._teacher_out: TeacherOutput | None = None
        self._labels: torch.Tensor | None = None
        self._components: dict[str, torch.Tensor] = {}

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

    def forward(
        self,
        x: torch.Tensor,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """Run the teacher (only while distillation is active) and the student on ``x``.

        ``index`` and ``view`` identify the samples for cache-backed teachers; ``labels``
        (``-1`` for unlabeled rows) are passed to losses that use them (DKD).
        """
        cap = self._student_capture()
        active = self.teacher is not None and self.balancer.active
        self._teacher_out = self.teacher(x, index=index, view=view) if active else None
        self._labels = labels
        cap.clear()
        out = self.student(x)
        cap.set_output(out)
        return out

    def compute_loss(
        self, student_loss: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distillation losses of the last forward, combined with ``student_loss``."""
        if self._capture is None or "" not in self._capture.outputs:
            raise KDError("call the distiller on a batch (distiller(x)) before compute_loss()")
        labels = self._labels if labels is None else labels
        distill: dict[str, torch.Tensor] = {}
        names: dict[str, tuple[str, str]] = {}
        if self._teacher_out is not None:
            for (s_name, t_name), loss in zip(self.pairs, self.criterion, strict=True):
                name = pair_name(s_name, t_name)
                distill[name] = self._pair_loss(s_name, t_name, loss, labels)
                names[name] = (s_name, t_name)
        total = self.balancer(distill, student_loss, names)
        comps = dict(distill)
        if student_loss is not None:
            comps["student"] = student_loss
        comps["total"] = total
        self._components = {k: v.detach() for k, v in comps.items()}
        return total

    def _pair_loss(self, s_name: str, t_name: str, loss: nn.Module, labels) -> torch.Tensor:
        s_out = self._capture[s_name]
        t_out = self._teacher_out.get(t_name)
        try:
            return loss(s_out, t_out, labels=labels)
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
        """Each loss component of the last :meth:`compute_loss`, as floats (for logging).

        Converted on access, not every step, so a training loop pays a device sync only when
        it actually logs.
        """
        return {k: float(v) for k, v in self._components.items()}

    @property
    def last_loss_tensors(self) -> dict[str, torch.Tensor]:
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
            self.forward(example_input, index=index, view=view, labels=labels)
            table = PairTable()
            for (s_name, t_name), loss in zip(self.pairs, self.criterion, strict=True):
                s_out = self._capture[s_name]
                t_out = self._teacher_out.get(t_name)
                self._pair_loss(s_name, t_name, loss, labels)
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
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
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
