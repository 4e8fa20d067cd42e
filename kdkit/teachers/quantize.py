"""int8 teachers: ONNX Runtime static quantization, cached next to the fp32 model and gated.

darklight's idea: the teacher only runs inference, so it can run in a cheaper engine than the
student's training step. A trial on the demo's teacher (1 thread, batch 256, 512 calibration
images) gave 3,897 -> 10,389 img/s over ONNX Runtime fp32 with test top-1 92.33% -> 92.19%
and 99.76% top-1 agreement (issue 14; the measured tables are in docs/benchmarks.md).

Pipeline: the fp32 ONNX file goes through ONNX Runtime's ``quant_pre_process`` (shape
inference and graph optimisation) and ``quantize_static`` in QDQ format with per-channel int8
weights. Activations are uint8 with a zero point on the CPU (what ORT's x86 kernels want) and
symmetric int8 for TensorRT (which supports only symmetric quantization). Calibration images
are drawn through the training input path (:func:`~kdkit.data.views.prepare_input`: the run's
views and normalisation), so the ranges are those the teacher will see.

The layer that writes the logits stays in fp32: on the demo's teacher (3 seeds, 2,000
held-out probes each) that lifts top-1 agreement with fp32 from 99.45-99.50% to 99.60-99.85%
at the same speed (8,519 vs 8,251 img/s per CPU second at batch 256; fp32: 3,257).

The int8 file is cached next to the fp32 one (``<stem>.int8-<target>.<hash>.onnx``); the
hash covers the fp32 file's sha256, the calibration inputs' sha256, the settings and the ORT
version. A sidecar ``.json`` holds that key and the int8 file's sha256, checked on every load:
a corrupted or foreign file is refused and rebuilt. The fidelity gate
(:func:`check_fidelity`) runs every time, on a probe held out from calibration.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit._fingerprint import module_fingerprint
from kdkit._io import atomic_path, atomic_write_json, sha256_bytes, sha256_file
from kdkit.capture import unwrap
from kdkit.errors import KDError
from kdkit.teachers.calibration import (
    Calibration,
    CalibrationArrays,
    as_calibration,
    draw_calibration,
    from_mapping,
)
from kdkit.teachers.fidelity import FidelityReport, FidelityTally

__all__ = [
    "Calibration",
    "FidelityGate",
    "Int8Model",
    "INT8_FORMAT_VERSION",
    "as_gate",
    "int8_model",
    "check_fidelity",
    "run_session",
    "export_path",
    "quantize_teacher",
]

log = logging.getLogger(__name__)

INT8_FORMAT_VERSION = 1
TARGETS = ("cpu", "tensorrt")
SessionOpener = Callable[[Path], Any]


@dataclass(frozen=True)
class FidelityGate:
    """The int8 teacher must agree with fp32 on the probe: top-1 agreement at least
    ``min_agreement`` (and mean KL at ``temperature``, the run's, at most ``max_kl`` if set)."""

    min_agreement: float = 0.99
    max_kl: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0 or self.temperature <= 0:
            raise KDError("gate needs 0 <= min_agreement <= 1 and temperature > 0")


def as_gate(obj: Any) -> FidelityGate:
    if obj is None:
        return FidelityGate()
    if isinstance(obj, FidelityGate):
        return obj
    if isinstance(obj, dict):
        return from_mapping(FidelityGate, obj, "gate")
    raise KDError(f"gate must be a FidelityGate or a dict, got {type(obj).__name__}")


# -- building and caching the int8 model --------------------------------------------------------
@dataclass(frozen=True)
class Int8Model:
    """An int8 ONNX file; ``built`` is False when it came from the cache."""

    path: Path
    fp32_path: Path
    key: dict[str, Any]
    built: bool


def _settings(target: str, method: str) -> dict[str, Any]:
    return {
        "format": "QDQ",
        "weights": "int8 per-channel symmetric",
        "activations": "int8 symmetric" if target == "tensorrt" else "uint8",
        "method": method,
        "fp32_output_layer": True,
    }


def _output_layers(graph: Any) -> list[str]:
    """Names of the matrix layers that write the graph's outputs (the classifier): kept in
    fp32, since quantizing the logits themselves costs the most agreement for no speed."""
    outputs = {o.name for o in graph.output}
    kinds = ("Gemm", "MatMul", "Conv")
    return [n.name for n in graph.node if n.op_type in kinds and outputs & set(n.output)]


def _cache_paths(fp32: Path, key: dict[str, Any], cache_dir: Path | None) -> tuple[Path, Path]:
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]
    path = (cache_dir or fp32.parent) / f"{fp32.stem}.int8-{key['target']}.{digest}.onnx"
    return path, path.with_name(path.name + ".json")


def _cached_ok(path: Path, sidecar: Path, key: dict[str, Any]) -> bool:
    """Is the cached int8 file the one this key describes, byte for byte?"""
    if not path.is_file():
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("format_version") != INT8_FORMAT_VERSION or meta.get("key") != key:
        log.warning("refusing cached int8 model %s: no matching sidecar; rebuilding", path)
        return False
    if meta.get("sha256") != sha256_file(path):
        log.warning(
            "refusing cached int8 model %s: checksum mismatch (corrupted); rebuilding", path
        )
        return False
    return True


class _Reader:
    """ORT's CalibrationDataReader protocol (``get_next``) over prepared input batches."""

    def __init__(self, name: str, inputs: np.ndarray, batch_size: int) -> None:
        self._batches = iter(
            [{name: inputs[b : b + batch_size]} for b in range(0, len(inputs), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize(fp32: Path, out: Path, calib: np.ndarray, target: str, cal: Calibration) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}
    methods["percentile"] = CalibrationMethod.Percentile
    symmetric = target == "tensorrt"
    with tempfile.TemporaryDirectory(prefix="kdkit-int8-") as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        graph = onnx.load(str(pre), load_external_data=False).graph
        quantize_static(
            str(pre),
            str(out),
            _Reader(graph.input[0].name, calib, cal.batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[cal.method],
            nodes_to_exclude=_output_layers(graph),
            # not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops the collected
            # batches without measuring them (all of them when the count divides evenly)
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )


def run_session(session: Any, inputs: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Logits of an ORT session on float32 inputs, batched, as a CPU tensor."""
    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    parts = [
        session.run([out], {name: inputs[b : b + batch_size]})[0]
        for b in range(0, len(inputs), batch_size)
    ]
    return torch.from_numpy(np.concatenate(parts)).float()


def int8_model(
    fp32_path: str | os.PathLike,
    arrays: CalibrationArrays,
    cal: Calibration,
    open_session: SessionOpener,
    *,
    target: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> Int8Model:
    """The int8 model of ``fp32_path`` for these calibration inputs: cached or built now.

    A new file is verified before it replaces anything: ``open_session`` must load it and
    its logits on the first calibration batch must be finite with the fp32 model's shape.
    """
    from onnxruntime import __version__ as ort_version

    if target not in TARGETS:
        raise KDError(f"int8 target must be one of {list(TARGETS)}, got {target!r}")
    fp32 = Path(fp32_path)
    key = {
        "format_version": INT8_FORMAT_VERSION,
        "fp32_sha256": sha256_file(fp32),
        "calibration_sha256": arrays.fingerprint(),
        "calibration_samples": int(len(arrays.calib)),
        "target": target,
        "settings": _settings(target, cal.method),
        "onnxruntime": ort_version,
    }
    path, sidecar = _cache_paths(fp32, key, Path(cache_dir) if cache_dir else None)
    if _cached_ok(path, sidecar, key):
        log.info("using cached int8 model %s", path)
        return Int8Model(path, fp32, key, built=False)
    log.info("quantizing %s to int8 on %d calibration inputs", fp32, len(arrays.calib))
    want = run_session(open_session(fp32), arrays.calib[:8])
    try:
        with atomic_path(path) as tmp:
            _quantize(fp32, tmp, arrays.calib, target, cal)
            got = run_session(open_session(tmp), arrays.calib[:8])
            if got.shape != want.shape or not bool(torch.isfinite(got).all()):
                raise KDError(
                    f"the int8 model of {fp32} gives logits of shape {tuple(got.shape)} "
                    f"(fp32: {tuple(want.shape)}) or non-finite values; it was not kept"
                )
        atomic_write_json(
            sidecar,
            {"format_version": INT8_FORMAT_VERSION, "key": key, "sha256": sha256_file(path)},
        )
    except OSError as err:
        raise KDError(
            f"could not write the int8 model next to {fp32} ({err}); pass cache_dir= a writable folder"
        ) from None
    return Int8Model(path, fp32, key, built=True)


def check_fidelity(
    reference: Callable[[np.ndarray], torch.Tensor],
    candidate: Callable[[np.ndarray], torch.Tensor],
    probe: np.ndarray,
    gate: FidelityGate,
    what: str,
    *,
    role: str = "teacher",
    options: str | None = None,
) -> FidelityReport:
    """Compare ``candidate`` with ``reference`` on ``probe``; refuse below the gate's bounds."""
    tally = FidelityTally(gate.temperature)
    for b in range(0, len(probe), 256):
        x = probe[b : b + 256]
        tally.add_logits(reference(x), candidate(x))
    report = tally.report()
    report.refuse_below(
        gate.min_agreement,
        gate.max_kl,
        what=f"{what} disagrees with the fp32 {role}",
        options=options
        or (
            "lower the threshold (gate={'min_agreement': ...}), "
            "calibrate on more or more typical images (the run's views and normalisation), "
            "or use precision='fp32' (fp16 with backend='tensorrt' on a GPU)"
        ),
    )
    log.info("int8 fidelity gate passed: %s", report)
    return report


def default_cache_dir() -> Path:
    """Where modules are exported for int8 (the fp32 file must outlive the process)."""
    return Path.home() / ".cache" / "kdkit" / "onnx"


def export_path(module: torch.nn.Module, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/<Class>-<weights hash>.onnx``: one lasting fp32 export per set of weights."""
    name = type(unwrap(module)).__name__
    return Path(cache_dir or default_cache_dir()) / f"{name}-{module_fingerprint(module)[:16]}.onnx"


def quantize_teacher(
    fp32_path: str | os.PathLike,
    calibration: Any,
    gate: Any,
    open_session: SessionOpener,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache_dir: str | os.PathLike | None = None,
    role: str = "teacher",
    options: str | None = None,
) -> tuple[Int8Model, FidelityReport]:
    """Calibrate, quantize (or reuse the cache) and gate: what ``OnnxTeacher(precision='int8')``
    runs. Returns the int8 model and the gate's report; raises :class:`KDError` below it,
    naming the ``role`` (``teacher``, or ``student`` for ``kdkit export --int8``) and the
    caller's own ways out (``options``; default: the Python options of a teacher)."""
    cal, gate = as_calibration(calibration), as_gate(gate)
    arrays = draw_calibration(cal, transform)
    model = int8_model(fp32_path, arrays, cal, open_session, cache_dir=cache_dir)
    fp32, int8 = open_session(model.fp32_path), open_session(model.path)
    report = check_fidelity(
        lambda x: run_session(fp32, x),
        lambda x: run_session(int8, x),
        arrays.probe,
        gate,
        f"the int8 model {model.path.name}",
        role=role,
        options=options,
    )
    return model, report
