"""The Distiller's argument checks: what a teacher may be, and what a step may be given."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDDeprecationWarning, KDError
from kdkit.teachers.base import Teacher
from kdkit.teachers.torch_teacher import TorchTeacher

__all__ = [
    "as_teacher",
    "check_images",
    "check_not_the_student",
    "pairs_or_criterion",
    "run_teacher",
    "target_device",
]


def as_teacher(teacher: nn.Module | Teacher | None) -> Teacher | None:
    """A module becomes a :class:`TorchTeacher`; paths, engines and lists are
    :func:`kdkit.make_teacher`'s job (the Distiller does not import every backend)."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, nn.Module):
        return TorchTeacher(teacher)
    raise KDError(
        f"the teacher must be an nn.Module or a kdkit Teacher, got {type(teacher).__name__}; "
        "build one from a path, engine or list with kdkit.make_teacher(...)"
    )


def run_teacher(teacher: Teacher, x: torch.Tensor, index: Any, view: Any) -> Any:
    """``teacher(x, index=, view=)``; a device or dtype mismatch is one KDError."""
    try:
        return teacher(x, index=index, view=view)
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


def check_not_the_student(student: nn.Module, teacher: Any) -> None:
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


def target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device in a ``Module.to(...)`` call, None for a dtype-only call."""
    target = kwargs.get("device", kwargs.get("tensor"))
    for arg in (target, *args):
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (str, int, torch.device)):
            return torch.device(arg)
    return None


def check_images(x: Any) -> None:
    """Integer pixels given straight to :meth:`Distiller.step` are refused with the fix, the
    same for every integer dtype (the Trainer's input pipeline scales uint8 and refuses the
    others, as :func:`kdkit.data.to_float` does). Only (N, C, H, W) batches are images: a
    2-D integer batch is token ids for an embedding student, and passes."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_floating_point():
        raise KDError(
            f"Distiller.step got {x.dtype} images; give float images normalised as the models "
            "expect (kdkit.data.to_float(x, mean, std) for uint8), or train through the "
            "Trainer, whose input pipeline does it"
        )


def pairs_or_criterion(pairs: Any, criterion: Any) -> Any:
    """``Distiller(criterion=...)``, the first release's keyword, is ``pairs=`` (warned)."""
    if criterion is None:
        return pairs
    if pairs is not None:
        raise KDError("give pairs= or its older name criterion=, not both")
    warnings.warn(
        "Distiller(criterion=...) is now Distiller(pairs=...) (or the third argument)",
        KDDeprecationWarning,
        stacklevel=3,
    )
    return criterion
