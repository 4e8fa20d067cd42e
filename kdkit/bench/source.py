"""What a benchmark measures: a module, an .onnx / .engine file, a checkpoint or a model spec,
resolved once into a :class:`ModelSource`; its parameter and FLOP counts.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one image
(convolutions and matmuls, 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdkit.capture import unwrap
from kdkit.errors import KDError
from kdkit.load import load_model, spec_from_text
from kdkit.registry import build_model

__all__ = ["ModelSource", "count_flops", "count_params", "resolve_model", "shape_error"]

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """What :func:`resolve_model` found: a module, an ONNX file or a TensorRT engine (one of
    them), under a display name; ``input_shape`` where a checkpoint recorded it."""

    name: str
    module: nn.Module | None = None
    onnx: Path | None = None
    engine: Path | None = None
    input_shape: tuple[int, ...] | None = None


def resolve_model(obj: Any, name: str | None = None, *, trust_code: bool = False) -> ModelSource:
    """Load what :func:`bench_model` would measure, without measuring it: lets a caller
    refuse a bad second model before spending minutes on the first.

    ``obj``: a module, an .onnx / .engine path, a kdkit checkpoint, or a model spec such as
    ``"kdkit:fmnist_teacher"`` / ``"torchvision:resnet18"`` (random weights)."""
    if isinstance(obj, ModelSource):
        return obj
    if isinstance(obj, nn.Module):
        return ModelSource(name or type(unwrap(obj)).__name__, module=unwrap(obj))
    if not isinstance(obj, (str, os.PathLike)):
        raise KDError(f"cannot benchmark {type(obj).__name__}; give a module or a path")
    path = Path(obj)
    if not path.exists() and ":" in str(obj):  # a model spec, random weights
        spec = spec_from_text(str(obj), where=f"model {str(obj)!r}")
        return ModelSource(name or spec.name, module=build_model(spec, trust_code=trust_code))
    if not path.is_file():
        raise KDError(
            f"no model file at {path} (and not a model spec such as 'kdkit:fmnist_student')"
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        _check_onnx(path)
        return ModelSource(name or path.stem, onnx=path)
    if suffix in (".engine", ".plan"):
        return ModelSource(name or path.stem, engine=path)
    module, meta = load_model(path, trust_code=trust_code)
    shape = tuple(meta["input_shape"]) if meta.get("input_shape") else None
    return ModelSource(name or path.stem, module=module, input_shape=shape)


def _check_onnx(path: Path) -> None:
    """A truncated or foreign .onnx is refused when named, not deep inside a measurement."""
    try:
        import onnx
    except ImportError:  # onnxruntime alone: its session load will say it
        return
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KDError(
            f"{path} is not a readable ONNX model ({first[:200]}); it may be truncated or "
            "another file: export it again"
        ) from None


def count_params(src: ModelSource) -> int | None:
    """Parameters of a module, or weights (initializer elements) of an ONNX file; None for an
    engine, or for ONNX without the ``onnx`` package."""
    if src.module is not None:
        return sum(p.numel() for p in src.module.parameters())
    if src.onnx is not None:
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            return None
        graph = onnx.load(str(src.onnx)).graph
        return sum(int(np.prod(numpy_helper.to_array(t).shape)) for t in graph.initializer)
    return None


def shape_error(what: str, shape: tuple[int, ...], err: Exception) -> KDError:
    """The error for a model that does not run on the input shape it was given."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return KDError(
        f"{what} does not run on input (N, {', '.join(map(str, shape))}): {first[:200]}; "
        "pass the model's own --input-shape / input_shape"
    )


def count_flops(module: nn.Module | None, shape: tuple[int, ...]) -> float | None:
    """FLOPs of one ``(1, *shape)`` forward pass (see the module docstring); None without a
    module."""
    if module is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    p = next(module.parameters(), None)
    x = torch.randn((1, *shape), device=p.device if p is not None else "cpu")
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    except RuntimeError as err:
        raise shape_error(type(module).__name__, shape, err) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    return float(counter.get_total_flops())
