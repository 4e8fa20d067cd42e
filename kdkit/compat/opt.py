"""ModelOpt's checkpoint step (``import modelopt.torch.opt as mto``) on kdkit::

    import kdkit.compat.opt as mto               # was: import modelopt.torch.opt as mto

    mto.save(distillation_model, "kd.pth")       # the student + adapters, never the teacher
    model = mto.restore(resnet50(), "kd.pth")    # a DistillationModel again, teacher rebuilt

As in ModelOpt, the teacher is not saved: the file records *how* it was made (the
``teacher_model`` callable's name and its plain arguments, or a model string), and
:func:`restore` rebuilds it from the same callable, which must be in the running script's
namespace (a class already imported, or a function of the script). The criterion and the
balancer are recorded as data when they are kdkit's own losses and a
:class:`~kdkit.LossBalancer`; a custom loss cannot be (it is code), so restoring such a run
takes the same ``config=`` it was converted with, or a model already converted with it.

The file is a kdkit checkpoint (atomic, checksummed, loaded ``weights_only``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from kdkit.capture import unwrap
from kdkit.compat._modelopt_config import rebuild_teacher_model
from kdkit.compat.modelopt import DistillationModel, convert
from kdkit.distiller import Distiller
from kdkit.errors import KDError
from kdkit.load import load_checkpoint, save_checkpoint
from kdkit.losses import LOSSES
from kdkit.registry import check_plain

__all__ = ["save", "restore"]

_KEY = "modelopt"


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (a converted :class:`DistillationModel`, or any module such as the
    exported student) to ``path``: weights and the recipe, nothing of the teacher."""
    if isinstance(model, DistillationModel):
        recipe: dict[str, Any] | None = {
            **(model._recipe or {"teacher_model": None}),
            "criterion": _criterion_records(model.distiller),
            "loss_balancer": _balancer_record(model.distiller),
        }
        body = {**model.checkpoint_state(), _KEY: {"distillation": recipe}}
    elif isinstance(model, nn.Module):
        body = {"student": unwrap(model).state_dict(), _KEY: {"distillation": None}}
    else:
        raise KDError(f"save() takes a module or the model convert() returned, got {type(model)}")
    save_checkpoint(path, body, role="student")


def restore(
    model: nn.Module,
    path: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    *,
    trust_code: bool = False,
) -> nn.Module:
    """``model`` with the weights of ``path``; a fresh student of a saved distillation run
    comes back converted (a :class:`DistillationModel`, the teacher rebuilt from its
    callable). ``config`` converts with that distillation config instead of the recorded one
    (needed when the criterion was a custom loss)."""
    state = load_checkpoint(path)
    if _KEY not in state:
        raise KDError(f"{path} was not written by kdkit.compat.opt.save")
    recipe = state[_KEY].get("distillation")
    if isinstance(model, DistillationModel):
        converted = model
    elif recipe is None and config is None:  # a plain module was saved
        unwrap(model).load_state_dict(state["student"])
        return model
    else:
        converted = convert(
            model, config if config is not None else _config(recipe, path, trust_code)
        )
    converted.load_checkpoint_state(state, where=str(path))
    return converted


def _config(recipe: Mapping[str, Any] | None, path: Any, trust_code: bool) -> dict[str, Any]:
    missing = [k for k in ("teacher_model", "criterion") if (recipe or {}).get(k) is None]
    if missing:
        raise KDError(
            f"{path} cannot rebuild its {' and '.join(missing)} (a module object, a lambda or a "
            "custom loss is code, not data): pass config=distillation_config, or convert() "
            "first and restore into the converted model"
        )
    balancer = recipe.get("loss_balancer")
    if balancer is not None:
        weights = {tuple(k) if isinstance(k, list) else k: w for k, w in balancer["weights"]}
        balancer = {**balancer, "weights": weights}
    return {
        "teacher_model": rebuild_teacher_model(recipe["teacher_model"], trust_code=trust_code),
        "criterion": recipe["criterion"],
        "loss_balancer": balancer,
    }


def _criterion_records(d: Distiller) -> list[dict[str, Any]] | None:
    """Each pair as a ``{loss, student, teacher, args, weight}`` record, or None when a loss
    is not one of kdkit's (its constructor arguments are read back from its attributes)."""
    names = {cls: name for name, cls in LOSSES.items()}
    records = []
    for pair in d.pair_list:
        name = names.get(type(pair.loss))
        args = _constructor_args(pair.loss) if name else None
        if args is None:
            return None
        records.append(
            {"loss": name, "student": pair.student, "teacher": pair.teacher, "args": args,
             "weight": pair.weight}
        )  # fmt: skip
    return records


def _constructor_args(loss: nn.Module) -> dict[str, Any] | None:
    args = {}
    for p in list(inspect.signature(type(loss).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if hasattr(loss, p.name):
            args[p.name] = getattr(loss, p.name)
        elif p.default is p.empty:
            return None
    try:
        check_plain(args, "loss args")
    except KDError:
        return None
    return args


def _balancer_record(d: Distiller) -> dict[str, Any] | None:
    b = d.balancer
    if b._implicit:
        return None
    fields = ("student_weight", "distill_weight", "start_epoch", "warmup_epochs")
    weights = [[list(k) if isinstance(k, tuple) else k, float(w)] for k, w in b.weights.items()]
    return {**{f: getattr(b, f) for f in fields}, "weights": weights}
