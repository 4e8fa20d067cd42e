"""ModelOpt's distillation names on kdkit, so a ModelOpt script changes one import line::

    import kdkit.compat.modelopt as mtd          # was: import modelopt.torch.distill as mtd

    distillation_config = {
        "teacher_model": teacher_model,          # module, class/callable, or (fn, args, kwargs)
        "criterion": mtd.LogitsDistillationLoss(),
        "loss_balancer": mtd.StaticLossBalancer(),
    }
    distillation_model = mtd.convert(model, mode=[("kd_loss", distillation_config)])
    ...
    loss = distillation_model.compute_loss(student_loss=task_loss)   # kdkit's name
    model_exported = mtd.export(distillation_model)

The mapping (see docs/coming-from-modelopt.md): ``convert`` is
:meth:`kdkit.Distiller.from_config`, ``export`` is :meth:`kdkit.Distiller.export` (the
user's own class, hooks removed), ``LogitsDistillationLoss`` is
:class:`kdkit.SoftTargetKL`, ``MGDLoss`` is :class:`kdkit.MGD`, ``StaticLossBalancer`` is a
:class:`kdkit.LossBalancer` with ModelOpt's weights. Unlike ModelOpt, the student's class is
never swapped (``type(model)`` stays what it was) and the teacher is never saved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kdkit.balance import LossBalancer
from kdkit.distiller import Distiller
from kdkit.errors import KDError
from kdkit.losses import MGD, SoftTargetKL

__all__ = [
    "DistillationModel",
    "LogitsDistillationLoss",
    "MGDLoss",
    "StaticLossBalancer",
    "convert",
    "export",
]

#: ModelOpt's meta-model class; in kdkit the wrapper is a :class:`~kdkit.Distiller`
DistillationModel = Distiller


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


def convert(model: nn.Module, mode: Any) -> Distiller:
    """``mtd.convert(model, mode=[("kd_loss", config)])``: a :class:`~kdkit.Distiller`.

    ``mode`` may also be ``("kd_loss", config)`` or the config dict itself.
    """
    config = _kd_config(mode)
    return Distiller.from_config(model, config)


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


def export(model: Distiller) -> nn.Module:
    """The student in its original class, weights trained, kdkit's hooks removed."""
    if not isinstance(model, Distiller):
        raise KDError(f"export() takes the model convert() returned, got {type(model).__name__}")
    return model.export()
