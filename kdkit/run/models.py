"""Config ``teacher:`` / ``student:`` / ``distill:`` sections -> models and a Distiller.

Model strings go through :func:`kdkit.registry.build_model` (``python:`` needs
``trust_code``); paths to a kdkit checkpoint or run directory through :func:`load_model_file`
(the one place that reads a model from a file); ``onnx:``, ``tensorrt:`` and ``cache:`` name
teacher files. ``weights:`` loads a local state dict; ``pretrained:`` is passed to the library
that knows it (timm ``pretrained=True``, torchvision ``weights=NAME``) and may download.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from kdkit.config import (
    TEACHER_ONLY_PREFIXES,
    PairConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    build_section,
    to_dict,
)
from kdkit.data.unreadable import readable
from kdkit.errors import KDError
from kdkit.registry import resolve_python_callable
from kdkit.teachers.factory import make_teacher

__all__ = [
    "build_distiller",
    "build_loss",
    "build_student",
    "build_teacher",
    "checkpoint_in",
    "int8_options",
    "load_model_file",
    "live_teacher",
    "run_models",
    "run_teacher",
    "run_temperature",
    "teacher_module",
]

log = logging.getLogger(__name__)


def checkpoint_in(path: str | os.PathLike) -> Path:
    """A checkpoint path as given, or a run directory's ``best.pt`` (else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise KDError(f"{path} is a directory with no best.pt or last.pt (not a kdkit run)")
    if not path.exists():
        raise KDError(f"no checkpoint or run directory at {path}")
    return path


def load_model_file(path: str | os.PathLike, *, trust_code: bool = False):
    """``(module, meta)`` from a kdkit checkpoint or run directory (its spec rebuilds it)."""
    from kdkit.load import load_model

    return load_model(checkpoint_in(path), trust_code=trust_code)


def _is_path(model: str) -> bool:
    from kdkit.config import looks_like_path

    return looks_like_path(model)


def _spec_kwargs(model: str, kwargs: dict[str, Any], pretrained: Any) -> dict[str, Any]:
    """``pretrained:`` in the form each library takes (it may download; never in tests)."""
    if pretrained in (None, False):
        return kwargs
    prefix = model.partition(":")[0]
    if prefix == "timm":
        return {**kwargs, "pretrained": bool(pretrained)}
    if prefix == "torchvision":
        if not isinstance(pretrained, str):
            raise KDError("a torchvision model's pretrained: is a weights name, e.g. DEFAULT")
        return {**kwargs, "weights": pretrained}
    raise KDError(f"pretrained: is for timm:, torchvision: and open_clip: models, not {model!r}")


def _registry_model(model: str, kwargs, weights, pretrained, trust_code: bool, where: str):
    from kdkit.load import load_weights
    from kdkit.registry import ModelSpec, build_model

    spec = ModelSpec.parse({"model": model, "kwargs": dict(kwargs)}, where=where)
    module = build_model(
        {"model": model, "kwargs": _spec_kwargs(model, dict(kwargs), pretrained)},
        trust_code=trust_code,
        where=where,
    )
    if weights is not None:
        load_weights(module, weights)
    return module, spec.to_dict()


def build_student(sc: StudentConfig, *, trust_code: bool = False) -> tuple[nn.Module, dict]:
    """The student module and the spec a checkpoint stores to rebuild it."""
    if _is_path(sc.model):
        module, meta = load_model_file(sc.model, trust_code=trust_code)
        spec = meta.get("student_spec") or meta.get("teacher_spec")
        if sc.weights is not None:
            from kdkit.load import load_weights

            load_weights(module, sc.weights)
        return module.train(), spec
    module, spec = _registry_model(
        sc.model, sc.kwargs, sc.weights, sc.pretrained, trust_code, "student.model"
    )
    return module, spec


def teacher_module(tc: TeacherConfig, *, trust_code: bool = False) -> nn.Module:
    """The teacher as an ``nn.Module`` (registry model or checkpoint), before any backend."""
    if _is_path(tc.model):
        module, _ = load_model_file(tc.model, trust_code=trust_code)
        if tc.weights is not None:
            from kdkit.load import load_weights

            load_weights(module, tc.weights)
        return module
    module, _ = _registry_model(
        tc.model, tc.kwargs, tc.weights, tc.pretrained, trust_code, "teacher.model"
    )
    return module


def int8_options(tc: TeacherConfig, calibration, views, mean, std, temperature: float) -> dict:
    """``calibration`` and ``gate`` of an int8 teacher: calibrated on training images through
    the run's views and normalisation, gated at the run's temperature (``teacher.calibration``).
    """
    return {
        "calibration": {
            "data": readable(calibration),  # a broken photo is not a calibration row
            "samples": tc.calibration.samples,
            "views": views,
            "mean": mean,
            "std": std,
        },
        "gate": {"min_agreement": tc.calibration.min_agreement, "temperature": temperature},
    }


def build_teacher(
    tc: TeacherConfig,
    *,
    trust_code: bool = False,
    input_shape: tuple[int, ...] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    calibration: Any = None,
    views: Any = None,
    temperature: float = 1.0,
) -> Any:
    """A frozen :class:`~kdkit.teachers.Teacher` for the ``teacher:`` section.

    ``backend: auto`` builds the torch teacher here; ``kdkit train`` measures the others
    first (:mod:`kdkit.run.autotune`). ``calibration`` (a dataset or loader) is used only for
    ``precision: int8``, whose
    fidelity gate compares KL at the run's ``temperature``; ``views`` is checked against a
    ``cache:`` teacher's meta (a cache of other views is refused).
    """
    prefix, _, rest = tc.model.partition(":")
    if prefix == "cache":
        from kdkit.cache import CachedTeacher

        return CachedTeacher(rest, expect_views=views if views is not None else None)
    int8 = {}
    if tc.precision == "int8":
        int8 = {"precision": "int8", **int8_options(tc, calibration, views, mean, std, temperature)}
    if prefix in ("onnx", "tensorrt") and prefix in TEACHER_ONLY_PREFIXES:
        return make_teacher(rest, backend=prefix, **int8)
    if prefix == "open_clip":
        from kdkit.teachers.clip_teacher import clip_teacher_from_config

        return clip_teacher_from_config(
            model=tc.model,
            pretrained=tc.pretrained,
            zero_shot=None if tc.zero_shot is None else to_dict(tc.zero_shot),
            probe=tc.probe,
            kwargs=dict(tc.kwargs),
            student_mean=mean,
            student_std=std,
            precision=tc.precision if tc.precision != "int8" else "fp32",
        )
    module = teacher_module(tc, trust_code=trust_code)
    if int8:
        return make_teacher(module, backend="onnx", input_shape=input_shape, **int8)
    if tc.backend == "onnx":
        return make_teacher(module, backend="onnx", input_shape=input_shape)
    if tc.backend == "tensorrt":
        raise KDError(
            "teacher.backend: tensorrt builds from an ONNX file: export the teacher "
            "(kdkit export) and set teacher.model: onnx:PATH with backend: tensorrt, or "
            "teacher.model: tensorrt:ENGINE"
        )
    return make_teacher(module, backend="torch", precision=tc.precision)


def build_loss(pair: PairConfig, *, trust_code: bool = False) -> nn.Module:
    """The loss a pair names, constructed with its ``args``."""
    from kdkit.losses import LOSSES

    if pair.loss.startswith("python:"):
        cls = resolve_python_callable(pair.loss.removeprefix("python:"), trust_code, "distill loss")
    else:
        cls = LOSSES[pair.loss]
    try:
        loss = cls(**pair.args)
    except TypeError as err:
        raise KDError(f"loss {pair.loss!r} does not take args {dict(pair.args)}: {err}") from None
    if not isinstance(loss, nn.Module):
        raise KDError(f"loss {pair.loss!r} built a {type(loss).__name__}, not an nn.Module")
    return loss


def build_distiller(cfg: RunConfig, student: nn.Module, teacher: Any, *, trust_code=False):
    """Student + teacher + the typed :class:`~kdkit.Pair` list + balancer, from the config."""
    from kdkit.balance import LossBalancer
    from kdkit.distiller import Distiller
    from kdkit.pairs import Pair

    if teacher is None:  # labels alone: the task loss, no pairs
        return Distiller(student, None, None, LossBalancer(student_weight=1.0))
    d = cfg.distill
    pairs = [
        Pair(p.student, p.teacher, build_loss(p, trust_code=trust_code), p.weight) for p in d.pairs
    ]
    balancer = LossBalancer(
        student_weight=d.student_weight,
        distill_weight=d.distill_weight,
        start_epoch=d.start_epoch,
        warmup_epochs=d.warmup_epochs,
    )
    return Distiller(student, teacher, pairs, balancer, label_smoothing=d.label_smoothing)


def run_models(run: str | os.PathLike, *, trust_code: bool = False):
    """``(teacher, student checkpoint, input_shape)`` of a run directory or checkpoint, for
    ``kdkit bench RUN``: the teacher as a module (or its ONNX/engine path), rebuilt from the
    checkpoint's ``teacher_spec``."""
    from kdkit.load import load_checkpoint

    path = checkpoint_in(run)
    ckpt = load_checkpoint(path)
    if not ckpt.get("teacher_spec"):
        raise KDError(f"{path} records no teacher (it was not written by kdkit train)")
    tc = build_section(TeacherConfig, ckpt["teacher_spec"], "teacher")
    if tc.model.startswith("cache:"):  # the model the cache was precomputed with
        tc = live_teacher(tc)
    prefix, _, rest = tc.model.partition(":")
    if prefix == "cache" or prefix == "open_clip":
        raise KDError(f"kdkit bench cannot rebuild a {prefix}: teacher; pass --teacher X")
    teacher = rest if prefix in ("onnx", "tensorrt") else teacher_module(tc, trust_code=trust_code)
    return teacher, str(path), ckpt.get("input_shape")


def live_teacher(tc: TeacherConfig) -> TeacherConfig:
    """``tc`` itself, or for ``cache:DIR`` the teacher section the cache records (a cache
    answers for its training images only: evaluating or benchmarking needs the model)."""
    prefix, _, cache_dir = tc.model.partition(":")
    if prefix != "cache":
        return tc
    from kdkit.cache import read_meta

    recorded = ((read_meta(cache_dir).get("source") or {}).get("config") or {}).get("teacher")
    if not recorded:
        raise KDError(
            f"the cache {cache_dir} records no teacher config (precomputed with the older "
            "flags); check it with kdkit cache check DIR --teacher FILE"
        )
    return build_section(TeacherConfig, recorded, "teacher")


def run_temperature(cfg: RunConfig) -> float:
    """The temperature of the run's first logit pair that has one (the int8 gate's KL)."""
    for pair in cfg.distill.pairs:
        t = dict(pair.args).get("temperature")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return float(t)
    return 1.0


def run_teacher(tc: Any, cfg: RunConfig, data: Any, views: Any, trust_code: bool) -> Any:
    """The teacher section ``tc`` built for this run's data: its input shape, normalization,
    calibration images (int8), views and the first logit pair's temperature (the int8 gate)."""
    return build_teacher(
        tc,
        trust_code=trust_code,
        input_shape=data.input_shape,
        mean=data.mean,
        std=data.std,
        calibration=data.train_dataset,
        views=views,
        temperature=run_temperature(cfg),
    )
