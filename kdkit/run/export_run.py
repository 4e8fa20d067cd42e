"""``kdkit export RUN --onnx PATH [--int8]``: an image run's student as a verified ONNX file.

The student is rebuilt from its checkpoint (a run directory's ``best.pt``, else ``last.pt``),
exported with a dynamic batch axis and checked against PyTorch with ONNX Runtime
(:func:`kdkit.export_onnx`); ``--int8`` quantizes it behind the fidelity gate of
:mod:`kdkit.run.int8`, calibrated and checked on the run's own data. What a user of the file
needs to feed it (class names, input normalisation) travels in its ``metadata_props``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdkit.errors import KDError
from kdkit.export import ExportReport, export_onnx
from kdkit.load import load_model
from kdkit.run.data import build_data
from kdkit.run.evaluate import eval_data_section
from kdkit.run.int8 import Int8Export, export_int8
from kdkit.run.models import checkpoint_in

__all__ = ["StudentExport", "export_student", "onnx_metadata"]


@dataclass(frozen=True)
class StudentExport:
    """What was written: the fp32 export's report, or the int8 one (its ``fp32`` report
    inside), and the checkpoint's metadata (``mean`` / ``std`` for the note on inputs)."""

    report: ExportReport | None
    int8: Int8Export | None
    meta: Mapping[str, Any]


def onnx_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """What a checkpoint knows that the ONNX file should carry: class names (``kdkit.classes``,
    a JSON list) and the input normalisation (``kdkit.mean`` / ``kdkit.std``, JSON lists)."""
    return {
        f"kdkit.{key}": json.dumps(list(meta[key]))
        for key in ("classes", "mean", "std")
        if meta.get(key)
    }


def export_student(
    checkpoint: str,
    onnx: str,
    *,
    input_shape: Sequence[int] | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    verify: bool = True,
    int8: bool = False,
    data: Sequence[str] = (),
    samples: int = 512,
    min_agreement: float = 0.99,
    trust_code: bool = False,
) -> StudentExport:
    """Export the student of ``checkpoint`` (a run directory or a ``.pt``) to ``onnx``."""
    module, meta = load_model(checkpoint_in(checkpoint), trust_code=trust_code)
    shape = input_shape or meta.get("input_shape")
    if not shape:
        raise KDError(f"{checkpoint} records no input_shape; pass --input-shape C H W")
    if not int8:
        report = export_onnx(
            module,
            onnx,
            shape,
            opset=opset,
            verify=verify,
            atol=atol,
            metadata=onnx_metadata(meta),
        )
        return StudentExport(report, None, meta)
    full = {**meta, "input_shape": list(shape)}  # meta holds the run config
    data_cfg, seed, _ = eval_data_section(full, list(data))
    run_data = build_data(data_cfg, seed=seed, classes=meta.get("classes"))
    result = export_int8(
        module,
        onnx,
        tuple(shape),
        run_data,
        metadata=onnx_metadata(meta),
        samples=samples,
        min_agreement=min_agreement,
        opset=opset,
    )
    return StudentExport(None, result, meta)
