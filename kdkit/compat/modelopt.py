"""ModelOpt's distillation names on kdkit, so a ModelOpt script changes one import line::

    import kdkit.compat.modelopt as mtd          # was: import modelopt.torch.distill as mtd

    distillation_config = {
        "teacher_model": teacher_model,          # module, class/callable, or (fn, args, kwargs)
        "criterion": mtd.LogitsDistillationLoss(),
        "loss_balancer": mtd.StaticLossBalancer(),
    }
    distillation_model = mtd.convert(model, mode=[("kd_loss", distillation_config)])
    ...
    loss = distillation_model.compute_kd_loss(student_loss=task_loss)  # or compute_loss
    model_exported = mtd.export(distillation_model)

The mapping (see docs/coming-from.md): ``convert`` is :func:`from_config` (ModelOpt's dict,
translated in :mod:`kdkit.compat._modelopt_config` into a :class:`kdkit.Distiller`), and
returns a :class:`DistillationModel`, which holds ModelOpt's two-call state (``forward`` keeps
the teacher output for ``compute_loss``) so the core Distiller never does; ``export`` is
:meth:`kdkit.Distiller.export` (the user's own class, hooks removed), ``LogitsDistillationLoss`` is
:class:`kdkit.SoftTargetKL`, ``MGDLoss`` is :class:`kdkit.MGD`, ``StaticLossBalancer`` is a
:class:`kdkit.LossBalancer` with ModelOpt's weights. Unlike ModelOpt, the student's class is
never swapped (``type(model)`` stays what it was; the wrapper is an instance of a subclass of
it, :mod:`kdkit.compat._as_student`) and the teacher is never saved (``mto.save`` /
``mto.restore`` are :mod:`kdkit.compat.opt`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdkit.balance import LossBalancer
from kdkit.capture import unwrap
from kdkit.compat._as_student import wrapper_class
from kdkit.compat._modelopt_config import describe_teacher_model, parse_distill_config
from kdkit.distiller import Distiller, Forward
from kdkit.errors import KDError
from kdkit.losses import MGD, SoftTargetKL
from kdkit.task import StepOutput, Task

__all__ = [
    "DistillationModel",
    "from_config",
    "LogitsDistillationLoss",
    "MGDLoss",
    "StaticLossBalancer",
    "convert",
    "export",
]


def from_config(
    student: nn.Module, config: Mapping[str, Any], *, trust_code: bool = False
) -> Distiller:
    """A :class:`kdkit.Distiller` from ModelOpt's dict, ``{"teacher_model": ...,
    "criterion": ..., "loss_balancer": ...}`` (every accepted form: see
    :mod:`kdkit.compat._modelopt_config`). ``trust_code`` allows ``python:`` model strings."""
    teacher, criterion, balancer = parse_distill_config(config, trust_code=trust_code)
    return Distiller(student, teacher, criterion, balancer)


_MODULE_STATE = frozenset(vars(nn.Module()))  # training, _modules, ...: the wrapper's own


class DistillationModel(Task):
    """ModelOpt's meta-model: a :class:`kdkit.Distiller` with ModelOpt's two calls.

    ``model(x)`` runs the teacher (no grad, while distillation is active) and the student and
    returns the student's output; ``model.compute_loss(student_loss)`` (or ModelOpt's guide's
    ``compute_kd_loss``) then combines the held teacher output with the distillation losses.
    In eval mode ``model(x)`` runs the student only; the teacher runs on that batch later,
    only if :meth:`compute_loss` asks for it (validation costs the student alone).
    That state between the two calls lives here, not in the core. Everything else (``step``,
    ``export``, ``describe``, the Trainer's task protocol) is the Distiller's. The state dict
    is the Distiller's (``student.*``, ``criterion.*``): the teacher is never in it.

    As ModelOpt's guide says, ``isinstance(model, type(student))`` holds and the student's
    attributes are reachable (``model.fc``, ``model.layer4``): the instance is of a class made
    for the student's class (:mod:`kdkit.compat._as_student`), which forwards the student's
    names to the student. The student itself is never class-swapped.
    """

    _OWN = frozenset({"student", "criterion", "distiller", "_pending", "_components", "_recipe"})

    def __new__(cls, distiller: Distiller | None = None, *args: Any, **kwargs: Any) -> Any:
        student = getattr(distiller, "student", None)
        if cls is DistillationModel and isinstance(student, nn.Module):
            cls = wrapper_class(DistillationModel, type(unwrap(student)))  # the user's class
        return super().__new__(cls)

    def __init__(self, distiller: Distiller) -> None:
        nn.Module.__init__(self)  # not super(): the next class may be the student's
        self.student = distiller.student
        self.criterion = distiller.criterion
        object.__setattr__(self, "distiller", distiller)
        self._pending: tuple[Forward, torch.Tensor | None, tuple | None] | None = None
        self._components: dict[str, torch.Tensor] = {}
        self._recipe: dict[str, Any] | None = None  # how kdkit.compat.opt rebuilds it

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            student = self.__dict__.get("_modules", {}).get("student")
            if student is None or (name.startswith("__") and name.endswith("__")):
                raise
            return getattr(student, name)  # model.fc, model.layer4: the student's

    def __setattr__(self, name: str, value: Any) -> None:
        student = self.__dict__.get("_modules", {}).get("student")
        if student is not None and name not in self._OWN and name not in _MODULE_STATE:
            held = (student._parameters, student._buffers, student._modules, student.__dict__)
            if any(name in d for d in held):  # model.fc = nn.Linear(...) replaces the student's
                setattr(student, name, value)
                return
        nn.Module.__setattr__(self, name, value)

    # ModelOpt's two calls ------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """The student's output on ``x``; the teacher's is held for :meth:`compute_loss`
        (with ``labels``, ``-1`` for unlabeled rows, for losses that take them, e.g. DKD).
        In eval mode the teacher is not run here: :meth:`compute_loss` runs it if called."""
        run = self.distiller.forward_both(x, index, view, with_teacher=self.training)
        self._pending = (run, labels, None if self.training else (x, index, view))
        return run.output

    def compute_loss(
        self, student_loss: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distillation losses of the last :meth:`forward`, combined with ``student_loss``."""
        if self._pending is None:
            raise KDError("call the distiller on a batch (distiller(x)) before compute_loss()")
        run, forward_labels, held_inputs = self._pending
        d = self.distiller
        if run.teacher is None and held_inputs is not None:
            if d.teacher is not None and d.balancer.active:  # an eval forward: teacher now
                with torch.no_grad():
                    run = dataclasses.replace(run, teacher=d.teacher_forward(*held_inputs))
                self._pending = (run, forward_labels, None)
        total, self._components = d.combine(
            run, student_loss, forward_labels if labels is None else labels
        )
        return total

    compute_kd_loss = compute_loss  # the name ModelOpt's guide uses

    @property
    def last_losses(self) -> dict[str, float]:
        """Each loss component of the last :meth:`compute_loss` (or :meth:`step`), as floats;
        converted on access, so a loop pays a device sync only when it logs."""
        return {k: float(v) for k, v in self._components.items()}

    @property
    def last_loss_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._components)

    # the Distiller underneath ----------------------------------------------------------------
    def step(self, *args: Any, **kwargs: Any) -> StepOutput:
        out = self.distiller.step(*args, **kwargs)
        self._components = dict(out.components)
        return out

    best_metric = Distiller.best_metric
    unit = Distiller.unit

    def check_inputs(self, dataset: Any, inputs: Any) -> None:
        self.distiller.check_inputs(dataset, inputs)

    @property
    def teacher(self) -> Any:
        return self.distiller.teacher

    @property
    def balancer(self) -> LossBalancer:
        return self.distiller.balancer

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.distiller.pairs

    @property
    def has_lazy_parameters(self) -> bool:
        return self.distiller.has_lazy_parameters

    @property
    def has_idle_parameters(self) -> bool:
        return self.distiller.has_idle_parameters

    def evaluate(self, batches: Iterable[Any], autocast: Callable | None = None) -> dict:
        return self.distiller.evaluate(batches, *(() if autocast is None else (autocast,)))

    def set_epoch(self, epoch: float) -> None:
        self.distiller.set_epoch(epoch)

    def checkpoint_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.distiller.checkpoint_state()

    def load_checkpoint_state(self, state: Mapping[str, Any], where: str = "") -> None:
        self.distiller.load_checkpoint_state(state, where)

    def describe(self, *args: Any, **kwargs: Any) -> Any:
        return self.distiller.describe(*args, **kwargs)

    def prepare(self, *args: Any, **kwargs: Any) -> None:
        self.distiller.prepare(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> DistillationModel:
        self.distiller.to(*args, **kwargs)
        return self

    def export(self) -> nn.Module:
        self._pending = None
        return self.distiller.export()

    def close(self) -> None:
        self._pending = None
        self.distiller.close()


def LogitsDistillationLoss(temperature: float = 1.0) -> SoftTargetKL:  # noqa: N802
    """Hinton soft targets with T^2 scaling: :class:`kdkit.SoftTargetKL`."""
    return SoftTargetKL(temperature=temperature)


def MGDLoss(  # noqa: N802
    num_student_channels: int,
    num_teacher_channels: int,
    alpha_mgd: float = 1.0,
    lambda_mgd: float = 0.65,
) -> MGD:
    """Masked generative distillation with ModelOpt's defaults: :class:`kdkit.MGD`."""
    return MGD(num_student_channels, num_teacher_channels, alpha=alpha_mgd, mask_ratio=lambda_mgd)


def StaticLossBalancer(kd_loss_weight: float | Sequence[float] = 0.5) -> LossBalancer:  # noqa: N802
    """ModelOpt's static weights: ``sum_i w_i * kd_i + (1 - sum_i w_i) * student_loss``.

    One float weighs the sum of the distillation losses; a list gives one weight per pair,
    in the criterion's order. The weights must sum to at most 1.
    """
    weights = [kd_loss_weight] if isinstance(kd_loss_weight, (int, float)) else kd_loss_weight
    weights = [float(w) for w in weights]
    total = sum(weights)
    if not 0.0 <= total <= 1.0 or any(w < 0 for w in weights):
        raise KDError(f"kd_loss_weight must be >= 0 and sum to at most 1, got {weights}")
    if len(weights) == 1:
        return LossBalancer(student_weight=1.0 - total, distill_weight=weights[0])
    return LossBalancer(
        weights=dict(enumerate(weights)), student_weight=1.0 - total, distill_weight=1.0
    )


def convert(model: nn.Module, mode: Any) -> DistillationModel:
    """``mtd.convert(model, mode=[("kd_loss", config)])``: a :class:`DistillationModel`.

    ``mode`` may also be ``("kd_loss", config)`` or the config dict itself.
    """
    config = _kd_config(mode)
    converted = DistillationModel(from_config(model, config))
    converted._recipe = {"teacher_model": describe_teacher_model(config.get("teacher_model"))}
    return converted


def _kd_config(mode: Any) -> Mapping[str, Any]:
    if isinstance(mode, Mapping):
        return mode
    if isinstance(mode, tuple) and len(mode) == 2 and isinstance(mode[0], str):
        mode = [mode]
    if isinstance(mode, list) and len(mode) == 1:
        name, config = mode[0] if isinstance(mode[0], tuple) else (mode[0], None)
        if name == "kd_loss" and isinstance(config, Mapping):
            return config
    raise KDError(
        "mode must be [('kd_loss', config)] with one config dict; kdkit's ModelOpt layer "
        f"converts only for distillation, got {mode!r}"
    )


def export(model: DistillationModel | Distiller) -> nn.Module:
    """The student in its original class, weights trained, kdkit's hooks removed."""
    if not isinstance(model, (DistillationModel, Distiller)):
        raise KDError(f"export() takes the model convert() returned, got {type(model).__name__}")
    return model.export()
