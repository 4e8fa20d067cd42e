"""ONNX Runtime, imported on first use with an install hint (ground floor).

Both the exporter (which checks every file it writes with ONNX Runtime) and
:class:`~kdkit.teachers.OnnxTeacher` need it; living here, neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

from kdkit.errors import KDError

__all__ = ["import_onnxruntime"]


def import_onnxruntime() -> Any:
    """``onnxruntime``, or a :class:`KDError` with the install command."""
    try:
        import onnxruntime
    except ImportError as err:
        raise KDError(
            f"ONNX Runtime is not installed ({err}); install it with: pip install kdkit[onnx]"
        ) from None
    return onnxruntime
