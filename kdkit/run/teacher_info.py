"""What a run report says about its teacher: parameters and the precision it ran at.

A torch teacher is a module to count; an ONNX Runtime teacher is a file whose weights are
counted from its initializers; a cached teacher ran before this run, so the report names the
teacher the cache was made from (counted when that file is still there) and the cache's
logits format. Nothing here runs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdkit.bench.source import ModelSource, count_params, resolve_model
from kdkit.errors import KDError

__all__ = ["teacher_summary"]


def _fmt(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _module_params(module: Any) -> int | None:
    params = getattr(module, "parameters", None)
    return sum(p.numel() for p in params()) if callable(params) else None


def teacher_summary(teacher: Any, precision: str) -> tuple[str, str]:
    """``(parameters, precision)`` as report cells; ``precision`` is the config's."""
    from kdkit.cache import CachedTeacher

    if isinstance(teacher, CachedTeacher):
        meta = teacher.meta
        source = (meta.get("source") or {}).get("teacher")
        n = None
        if isinstance(source, str):
            try:
                n = count_params(resolve_model(source))
            except (KDError, OSError):
                n = None  # the source teacher is gone or unreadable: the cache still works
        top = f", top-{meta['topk']}" if meta.get("topk") else ""
        made = f" from `{source}`" if source else ""
        return _fmt(n), f"cached {meta['dtype']} logits{top}{made}"
    for attr in ("module", "model"):  # TorchTeacher, ClipTeacher
        n = _module_params(getattr(teacher, attr, None))
        if n is not None:
            return _fmt(n), precision
    path = getattr(teacher, "path", None)  # OnnxTeacher (an int8 teacher's path is int8)
    if path is not None and Path(path).suffix == ".onnx":
        runtime = getattr(teacher, "precision", precision)
        return _fmt(
            count_params(ModelSource(str(path), onnx=Path(path)))
        ), f"{runtime}, ONNX Runtime"
    return "-", str(getattr(teacher, "precision", precision))
