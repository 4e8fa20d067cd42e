"""``kdkit.make_teacher(obj)``: turn whatever the user has into the right backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from kdkit.errors import KDError
from kdkit.load import load_model
from kdkit.teachers.auto_teacher import AutoTeacher
from kdkit.teachers.base import Teacher
from kdkit.teachers.ensemble import EnsembleTeacher
from kdkit.teachers.onnx_teacher import OnnxTeacher
from kdkit.teachers.tensorrt_teacher import TensorRTTeacher
from kdkit.teachers.torch_teacher import TorchTeacher

__all__ = ["make_teacher", "teacher", "BACKENDS"]

BACKENDS = ("torch", "onnx", "tensorrt", "auto")
_ENGINE_SUFFIXES = (".engine", ".plan")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def make_teacher(
    obj: Any, *, backend: str | None = None, trust_code: bool = False, **kwargs: Any
) -> Teacher:
    """A :class:`Teacher` for ``obj``.

    - a :class:`Teacher`: returned as is;
    - an ``nn.Module``: :class:`TorchTeacher` (``backend="onnx"``: exported and run by
      :class:`OnnxTeacher`, which then needs ``input_shape=(C, H, W)``, or for int8 takes it
      from the calibration images);
    - an ``.onnx`` path: :class:`OnnxTeacher` (``backend="tensorrt"``: :class:`TensorRTTeacher`
      builds and caches an engine from it);
    - an ``.engine`` / ``.plan`` path: :meth:`TensorRTTeacher.from_engine`;
    - a kdkit checkpoint (``.pt`` / ``.pth`` / ``.ckpt``): the model it holds (teacher or
      student: a distilled model can teach the next one), as a :class:`TorchTeacher`. Its
      spec must name a registered builder; ``trust_code=True`` allows ``python:`` specs
      (see :mod:`kdkit.registry`);
    - a list or tuple of any of these: :class:`EnsembleTeacher` (``weights=``, ``combine=``).

    ``backend="auto"`` (a module or checkpoint): time each backend that runs here and keep the
    fastest that agrees with eager torch (:mod:`kdkit.teachers.autotune`; int8 is a candidate
    when ``calibration=`` is given), as ``kdkit train`` does: on the first real batch (an
    :class:`~kdkit.teachers.AutoTeacher`, settled by the Trainer on its first training batch
    with the run's views, normalisation and precision, which also draw a bare calibration
    set; or by the first call), or now on ``example=`` (a batch as the teacher will see it),
    or now on random inputs of ``input_shape=`` and ``batch_size=`` (default 64). An
    ``.onnx`` path with ``auto`` runs in ONNX Runtime.

    Other keyword arguments go to the backend's constructor (e.g. ``precision="bf16"``).
    ``precision="int8", calibration=...`` quantizes for ONNX Runtime (a module's default
    backend then) or TensorRT, behind a fidelity gate (:mod:`kdkit.teachers.quantize`).
    Optional runtimes (onnxruntime, tensorrt) are imported only when such a backend is made.
    """
    if backend is not None and backend not in BACKENDS:
        raise KDError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if isinstance(obj, Teacher):
        if kwargs or backend not in (None, "auto"):
            raise KDError(f"options {sorted(kwargs)} cannot be applied to an existing Teacher")
        return obj
    if isinstance(obj, (list, tuple)):
        _no_backend(backend, "a list of teachers")
        # the factory makes the members; EnsembleTeacher only combines Teachers
        return EnsembleTeacher([make_teacher(o, trust_code=trust_code) for o in obj], **kwargs)
    if isinstance(obj, nn.Module):
        return _from_module(obj, backend, kwargs)
    if isinstance(obj, (str, os.PathLike)):
        return _from_path(Path(obj), backend, trust_code, kwargs)
    raise KDError(
        f"cannot make a teacher from {type(obj).__name__}; give an nn.Module, an .onnx or "
        ".engine path, a kdkit checkpoint, a list of those, or a kdkit Teacher"
    )


def _no_backend(backend: str | None, what: str) -> None:
    if backend not in (None, "auto"):
        raise KDError(f"backend={backend!r} does not apply to {what}")


def _from_module(module: nn.Module, backend: str | None, kwargs: dict[str, Any]) -> Teacher:
    if kwargs.get("precision") == "int8":  # int8 runs in ONNX Runtime (see teachers.quantize)
        if backend == "torch":
            raise KDError("precision='int8' runs with backend='onnx' (ONNX Runtime), not 'torch'")
        backend = backend or "onnx"
    if backend == "auto":
        return _auto(module, kwargs)
    if backend in (None, "torch"):
        return TorchTeacher(module, **kwargs)
    if backend == "onnx":
        return OnnxTeacher(module, **kwargs)
    raise KDError(
        "a TensorRT teacher is built from an ONNX file: kdkit.export_onnx(module, 'teacher.onnx', "
        "input_shape) first, then kdkit.make_teacher('teacher.onnx', backend='tensorrt')"
    )


def _from_path(
    path: Path, backend: str | None, trust_code: bool, kwargs: dict[str, Any]
) -> Teacher:
    if not path.exists():
        raise KDError(f"no teacher file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if backend == "auto":  # a file made for ONNX Runtime runs there
            backend = "onnx"
        if backend == "tensorrt":
            return TensorRTTeacher(path, **kwargs)
        if backend == "torch":
            raise KDError(f"{path} is an ONNX file; it runs with backend='onnx' or 'tensorrt'")
        return OnnxTeacher(path, **kwargs)
    if suffix in _ENGINE_SUFFIXES:
        if backend not in (None, "tensorrt", "auto"):
            raise KDError(f"{path} is a TensorRT engine; only backend='tensorrt' can run it")
        return TensorRTTeacher.from_engine(path, **kwargs)
    if suffix in _CHECKPOINT_SUFFIXES:
        module, _ = load_model(path, trust_code=trust_code)
        return _from_module(module, backend, kwargs)
    raise KDError(
        f"cannot tell what {path} holds from its suffix {suffix!r}; expected .onnx, "
        f"{' / '.join(_ENGINE_SUFFIXES)} or a kdkit checkpoint ({' / '.join(_CHECKPOINT_SUFFIXES)})"
    )


def _auto(module: nn.Module, kwargs: dict[str, Any]) -> Teacher:
    """``backend="auto"``: the fastest backend on an example batch (see module autotune)."""
    import torch

    from kdkit.teachers.autotune import choose_backend

    example = kwargs.pop("example", None)
    shape = kwargs.pop("input_shape", None)
    batch_size = int(kwargs.pop("batch_size", 64))
    known = {"precision", "calibration", "gate", "features"}
    if set(kwargs) - known:
        raise KDError(f"backend='auto' takes {sorted(known)}, not {sorted(set(kwargs) - known)}")
    if kwargs.get("precision") == "int8":
        raise KDError("backend='auto' chooses int8 itself when given calibration=; drop precision")
    if example is None and shape is None:  # the first real batch decides (the Trainer's)
        kwargs.pop("features", None)  # the Distiller's feature pairs ask for them
        return AutoTeacher(module, **kwargs)
    if example is None:
        example = torch.randn(batch_size, *shape)
    teacher, _ = choose_backend(module, example, **kwargs)
    return teacher


#: the factory's first name (``kdkit.teachers.teacher``; ``kdkit.teacher`` warns that it moved)
teacher = make_teacher
