"""ModelOpt's config dict, translated at the edge into what :class:`kdkit.Distiller` takes.

ModelOpt's users write ``{"teacher_model": ..., "criterion": ..., "loss_balancer": ...}``; the
``kdkit train`` YAML describes the same three things as data. Both come through
:func:`parse_distill_config`, so a Python dict and a YAML file can never mean two different
runs. Nothing here builds a Distiller (that would put this below-the-distiller module above
it): it returns the three arguments of ``Distiller(student, teacher, criterion, balancer)``.

Accepted values:

- ``teacher_model``: an ``nn.Module`` or kdkit Teacher; a class or callable, called with no
  arguments; a tuple ``(callable,)``, ``(callable, args)`` or ``(callable, args, kwargs)``;
  a model string ``"torchvision:resnet18"`` or ``{"model": ..., "kwargs": {...}}`` (built
  through :mod:`kdkit.registry`); a path to an ``.onnx`` / engine / kdkit checkpoint file
  (handed to :func:`kdkit.teacher`); a list of those (an ensemble).
- ``criterion``: a loss (module or callable); a loss name from :data:`kdkit.losses.LOSSES`;
  ``{(student_layer, teacher_layer): loss}``; or a list of pair records
  ``{"loss": name, "student": "", "teacher": "", "args": {...}, "weight": 1.0}`` (dicts or
  objects with those attributes, e.g. :class:`kdkit.config.PairConfig`). Default: soft
  targets at T=1 on the outputs (ModelOpt's default, LogitsDistillationLoss).
- ``loss_balancer``: a :class:`LossBalancer`, ``None`` (the Distiller's default rule), or its
  keyword arguments as a mapping or an object with those attributes (``student_weight``,
  ``distill_weight``, ``start_epoch``, ``warmup_epochs``, ``weights``). Integer keys in
  ``weights`` are positions in the criterion's order (ModelOpt's list of kd weights).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdkit.balance import LossBalancer
from kdkit.errors import KDError, closest_names
from kdkit.losses import LOSSES, SoftTargetKL
from kdkit.losses._call import as_loss_module
from kdkit.registry import build_model, check_plain, resolve_python_callable
from kdkit.teachers.base import Teacher

__all__ = [
    "CONFIG_KEYS",
    "describe_teacher_model",
    "parse_distill_config",
    "rebuild_teacher_model",
    "resolve_teacher_model",
]

log = logging.getLogger(__name__)

CONFIG_KEYS = ("teacher_model", "criterion", "loss_balancer", "expose_minimal_state_dict")
_BALANCER_KEYS = ("weights", "student_weight", "distill_weight", "start_epoch", "warmup_epochs")
_PAIR_KEYS = ("loss", "student", "teacher", "args", "weight")

Criterion = nn.Module | Mapping[tuple[str, str], nn.Module]


def _check_keys(given: Sequence[str], allowed: Sequence[str], where: str) -> None:
    for key in given:
        if key not in allowed:
            close = closest_names(str(key), list(allowed), 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KDError(f"{where}: unknown key {key!r}{hint} (expected {list(allowed)})")


def _as_mapping(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, Mapping):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return None


def resolve_teacher_model(obj: Any, *, trust_code: bool = False) -> Any:
    """What ``teacher_model`` names, as something :func:`kdkit.teacher` accepts."""
    where = "teacher_model"
    if isinstance(obj, (nn.Module, Teacher)):
        return obj
    if isinstance(obj, list):
        return [resolve_teacher_model(o, trust_code=trust_code) for o in obj]
    if isinstance(obj, tuple):
        if not 1 <= len(obj) <= 3 or not callable(obj[0]):
            raise KDError(
                f"{where} as a tuple must be (callable,), (callable, args) or "
                f"(callable, args, kwargs); got a tuple of {len(obj)} starting with "
                f"{type(obj[0]).__name__ if obj else 'nothing'}"
            )
        fn, args, kwargs = (
            obj[0],
            (obj[1] if len(obj) > 1 else ()),
            (obj[2] if len(obj) > 2 else {}),
        )
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, Mapping):
            raise KDError(f"{where}: args must be a list/tuple and kwargs a mapping")
        return _checked_model(fn(*args, **kwargs), fn)
    if isinstance(obj, (str, os.PathLike)):
        if Path(obj).is_file():
            return obj  # .onnx, engine or checkpoint: kdkit.make_teacher() picks the backend
        return build_model(str(obj), trust_code=trust_code, where=where)
    if isinstance(obj, Mapping):
        return build_model(obj, trust_code=trust_code, where=where)
    if callable(obj):
        return _checked_model(obj(), obj)
    raise KDError(
        f"{where} must be a module, a class or callable returning one, a (callable, args, "
        f"kwargs) tuple, a model string like 'torchvision:resnet18' or a teacher file; got "
        f"{type(obj).__name__}"
    )


def _checked_model(model: Any, fn: Callable) -> Any:
    if not isinstance(model, (nn.Module, Teacher)):
        name = getattr(fn, "__qualname__", repr(fn))
        raise KDError(f"teacher_model {name} returned {type(model).__name__}, not an nn.Module")
    return model


def _loss(obj: Any, args: Mapping[str, Any] | None, where: str) -> nn.Module:
    if isinstance(obj, str):
        if obj not in LOSSES:
            close = closest_names(obj, list(LOSSES), 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KDError(f"{where}: unknown loss {obj!r}{hint} (known: {sorted(LOSSES)})")
        try:
            return LOSSES[obj](**dict(args or {}))
        except TypeError as err:
            raise KDError(f"{where}: {obj} does not take {dict(args or {})}: {err}") from None
    if args:
        raise KDError(f"{where}: args are for loss names, not for a {type(obj).__name__}")
    return as_loss_module(obj, where=where)


def _criterion(obj: Any) -> tuple[Criterion, dict[tuple[str, str], float]]:
    """The Distiller's criterion and the per-pair weights that pair records carried."""
    if obj is None:
        return SoftTargetKL(temperature=1.0), {}
    if isinstance(obj, Mapping) and "loss" in obj and not any(isinstance(k, tuple) for k in obj):
        obj = [obj]  # one pair record
    if isinstance(obj, Mapping):
        return {key: _loss(loss, None, f"criterion[{key!r}]") for key, loss in obj.items()}, {}
    if isinstance(obj, (list, tuple)) and obj and not callable(obj):
        criterion: dict[tuple[str, str], nn.Module] = {}
        weights: dict[tuple[str, str], float] = {}
        for i, record in enumerate(obj):
            fields = _as_mapping(record)
            if fields is None:
                raise KDError(
                    f"criterion[{i}] must be a pair record {{loss, student, teacher, args, "
                    f"weight}}, got {type(record).__name__}"
                )
            _check_keys(list(fields), _PAIR_KEYS, f"criterion[{i}]")
            key = (fields.get("student") or "", fields.get("teacher") or "")
            if key in criterion:
                raise KDError(f"criterion[{i}]: the pair {key} appears twice")
            criterion[key] = _loss(fields["loss"], fields.get("args"), f"criterion[{i}]")
            weights[key] = float(fields.get("weight", 1.0))
        return criterion, weights
    return _loss(obj, None, "criterion"), {}


def _balancer(
    obj: Any, pairs: list[tuple[str, str]], pair_weights: dict[tuple[str, str], float]
) -> LossBalancer | None:
    extra = {k: w for k, w in pair_weights.items() if w != 1.0}
    if obj is None:
        return LossBalancer(weights=extra) if extra else None
    if isinstance(obj, LossBalancer):
        balancer = obj
    else:
        fields = _as_mapping(obj)
        if fields is None:
            raise KDError(
                f"loss_balancer must be a kdkit.LossBalancer, None or its arguments as a "
                f"mapping, got {type(obj).__name__}"
            )
        # a kdkit.config.DistillConfig carries its pairs too; they went to the criterion
        fields = {k: v for k, v in fields.items() if k not in ("pairs", "label_smoothing")}
        _check_keys(list(fields), _BALANCER_KEYS, "loss_balancer")
        balancer = LossBalancer(**fields)
    for key in [k for k in balancer.weights if isinstance(k, int)]:
        if not 0 <= key < len(pairs):
            raise KDError(f"loss_balancer weight index {key} but the criterion has {len(pairs)}")
        balancer.weights[pairs[key]] = balancer.weights.pop(key)
    for key, weight in extra.items():
        balancer.weights.setdefault(key, weight)
    return balancer


def parse_distill_config(
    config: Mapping[str, Any], *, trust_code: bool = False
) -> tuple[Any, Criterion, LossBalancer | None]:
    """``(teacher, criterion, loss_balancer)`` for ``Distiller(student, ...)``."""
    fields = _as_mapping(config)
    if fields is None:
        raise KDError(f"the distillation config must be a mapping, got {type(config).__name__}")
    _check_keys(list(fields), CONFIG_KEYS, "distillation config")
    if fields.get("teacher_model") is None:
        raise KDError("the distillation config needs 'teacher_model' (the frozen teacher)")
    if "expose_minimal_state_dict" in fields:
        # ModelOpt's switch to keep the teacher out of the state dict: kdkit never puts it in
        log.debug("expose_minimal_state_dict ignored: the teacher is never in the state dict")
    teacher = resolve_teacher_model(fields["teacher_model"], trust_code=trust_code)
    criterion, pair_weights = _criterion(fields.get("criterion"))
    pairs = list(criterion) if isinstance(criterion, Mapping) else [("", "")]
    balancer = _balancer(fields.get("loss_balancer"), pairs, pair_weights)
    return teacher, criterion, balancer


def describe_teacher_model(obj: Any) -> dict[str, Any] | None:
    """``teacher_model`` as plain data that :func:`rebuild_teacher_model` turns back into the
    same teacher (ModelOpt's "the same callable must be available when restoring"), or None
    for a module object, a lambda or arguments that are not plain values.

    ``{"spec": "torchvision:resnet18" | {...} | path}`` or ``{"callable": "pkg.mod:Name",
    "args": [...], "kwargs": {...}}``.
    """
    if isinstance(obj, (str, os.PathLike)):
        return {"spec": str(obj)}
    if isinstance(obj, Mapping):
        return {"spec": dict(obj)} if _is_plain(obj) else None
    if isinstance(obj, tuple) and obj and callable(obj[0]):
        fn, args, kwargs = obj[0], tuple(obj[1]) if len(obj) > 1 else (), obj[2:3] or ({},)
        kwargs = dict(kwargs[0])
    elif callable(obj) and not isinstance(obj, (nn.Module, Teacher)):
        fn, args, kwargs = obj, (), {}
    else:
        return None
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not qualname or "<" in qualname or not _is_plain([args, kwargs]):
        return None  # a lambda or a local function cannot be found again
    if module.startswith("torchvision.models") and not args and "." not in qualname:
        return {"spec": {"model": f"torchvision:{qualname}", "kwargs": kwargs}}
    return {"callable": f"{module}:{qualname}", "args": list(args), "kwargs": kwargs}


def _is_plain(value: Any) -> bool:
    try:
        check_plain(value, "value")
    except KDError:
        return False
    return True


def rebuild_teacher_model(recipe: Mapping[str, Any], *, trust_code: bool = False) -> Any:
    """The ``teacher_model`` value a :func:`describe_teacher_model` recipe names.

    A file names code only through what the running script already holds: an ``nn.Module``
    class from a module already imported, or a function of the script itself (``__main__``).
    Anything else (another module's function, a module not imported yet) would run code a
    file chose: it needs ``trust_code=True``.
    """
    if "spec" in recipe:
        return recipe["spec"]
    name = str(recipe.get("callable"))
    args, kwargs = tuple(recipe.get("args") or ()), dict(recipe.get("kwargs") or {})
    module_name, _, qualname = name.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if obj is not None else ():
        obj = getattr(obj, part, None)
    is_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    is_script_fn = callable(obj) and module_name == "__main__"
    if not (is_class or is_script_fn):
        obj = resolve_python_callable(name, trust_code, "the saved teacher_model")
    return (obj, args, kwargs)
