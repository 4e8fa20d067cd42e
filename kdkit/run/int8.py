"""``kdkit export RUN --onnx student.onnx --int8``: the int8 student behind the fidelity gate.

The same ONNX Runtime static quantization as the int8 teacher and ``kdkit bench``'s
``ort-int8`` (:func:`kdkit.teachers.quantize.int8_model`: QDQ, per-channel int8 weights, the
logits layer in fp32), calibrated on the run's training images through its evaluation
preprocessing and normalisation, and kept only if it agrees with the fp32 student on the
run's validation images (held out from calibration) at least ``min_agreement`` of top-1s,
the threshold of the int8 teacher (``teacher.calibration.min_agreement``, default 0.99).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit._io import atomic_path
from kdkit.data.unreadable import readable
from kdkit.errors import KDError

__all__ = ["Int8Export", "export_int8"]


@dataclass(frozen=True)
class Int8Export:
    """The int8 file, the fp32 export it was made from (its report) and the gate's verdict."""

    path: Path
    fp32: Any  # kdkit.export.ExportReport
    fidelity: Any  # kdkit.teachers.fidelity.FidelityReport


def export_int8(
    module: Any,
    out: str | Path,
    input_shape: tuple[int, ...],
    data: Any,
    *,
    metadata: dict[str, str],
    samples: int = 512,
    min_agreement: float = 0.99,
    opset: int | None = None,
) -> Int8Export:
    """Quantize ``module`` (fp32 export first) on ``data`` (a :class:`~kdkit.run.data.RunData`
    of the run) and write it to ``out`` only once it passes the gate."""
    from kdkit._ort import import_onnxruntime
    from kdkit.export import export_onnx, stamp_metadata
    from kdkit.teachers.calibration import Calibration
    from kdkit.teachers.onnx_teacher import load_session
    from kdkit.teachers.quantize import FidelityGate, quantize_teacher

    if data.val_loader is None:
        raise KDError(
            "--int8 gates the int8 student on validation images and this run has none; pass "
            "--data val.image_folder=DIR"
        )
    ort = import_onnxruntime()
    out = Path(out)
    probe = readable(data.val_loader.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(module, Path(tmp) / "student.onnx", input_shape, opset=opset)
        cal = Calibration(
            readable(data.train_dataset),
            samples=min(samples, len(data.train_dataset)),
            probe=len(probe),
            probe_data=probe,
            mean=data.mean,
            std=data.std,
        )
        model, report = quantize_teacher(
            fp32.path,
            cal,
            FidelityGate(min_agreement=min_agreement),
            lambda p: load_session(p, ["CPUExecutionProvider"], ort),
            cache_dir=tmp,
            role="student",
            options=(
                f"lower the bar with --min-agreement (now {min_agreement:g}), calibrate on more "
                f"images with --calibration-samples (now {samples}), or export fp32 (no --int8)"
            ),
        )  # raises below the gate: nothing is written
        with atomic_path(out) as dst:
            shutil.copyfile(model.path, dst)
            stamp_metadata(dst, {**metadata, "kdkit.precision": "int8"})
    return Int8Export(out, fp32, report)
