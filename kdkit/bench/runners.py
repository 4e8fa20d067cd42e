"""The backends a benchmark runs a model on, each loaded through kdkit's own teacher classes
(so the numbers are those of the code path we ship), and why a backend is skipped here.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit.bench.source import ModelSource
from kdkit.errors import KDError
from kdkit.export import export_onnx
from kdkit.teachers import OnnxTeacher, TensorRTTeacher, TorchTeacher
from kdkit.teachers.calibration import Calibration, CalibrationArrays
from kdkit.teachers.onnx_teacher import default_providers, import_onnxruntime, load_session
from kdkit.teachers.quantize import int8_model

__all__ = [
    "BENCH_BACKENDS",
    "Runner",
    "build_runner",
    "int8_file_for",
    "onnx_file_for",
    "skip_reason",
]

log = logging.getLogger(__name__)

BENCH_BACKENDS = ("eager", "compiled", "ort", "ort-int8", "tensorrt")

Runner = Callable[[torch.Tensor], Any]


def onnx_file_for(src: ModelSource, shape: tuple[int, ...], workdir: Path) -> Path:
    if src.onnx is None:
        src.onnx = workdir / f"{src.name}.onnx"
        export_onnx(src.module, src.onnx, shape)
    return src.onnx


def build_runner(
    src: ModelSource,
    backend: str,
    device: torch.device,
    max_batch: int,
    onnx_path: Path | None,
    threads: int | None,
) -> Runner | None:
    """The backend's own copy of the model, loaded now (inside the memory window)."""
    if backend in ("eager", "compiled"):
        if src.module is None:
            return None
        module = copy.deepcopy(src.module).to(device)
        return TorchTeacher(module, compile=backend == "compiled")
    if backend in ("ort", "ort-int8"):  # ort-int8: onnx_path is the int8 file (int8_file_for)
        providers = default_providers(import_onnxruntime(), device)
        if device.type == "cuda" and len(providers) == 1:
            log.warning("onnxruntime has no CUDA provider here; skipping ort on %s", device)
            return None
        return OnnxTeacher(onnx_path, providers=providers, threads=threads)
    if backend == "tensorrt":
        if src.engine is not None:
            return TensorRTTeacher.from_engine(src.engine, device=device)
        return TensorRTTeacher(onnx_path, max_batch=max_batch, device=device)
    raise KDError(f"unknown backend {backend!r}; choose from {list(BENCH_BACKENDS)}")


def int8_file_for(onnx_path: Path, shape: tuple[int, ...], workdir: Path) -> Path:
    """The ONNX file quantized to int8 (:mod:`kdkit.teachers.quantize`), calibrated on random
    inputs: bench models may have random weights and only speed is measured here; training
    calibrates on real images behind the fidelity gate."""
    ort = import_onnxruntime()
    x = torch.randn((64, *shape), generator=torch.Generator().manual_seed(0)).numpy()
    model = int8_model(
        onnx_path,
        CalibrationArrays(x, x[:1]),
        Calibration(x, samples=len(x)),
        lambda p: load_session(p, ["CPUExecutionProvider"], ort),
        cache_dir=workdir,
    )
    return model.path


def skip_reason(src: ModelSource, backend: str, device: torch.device) -> str | None:
    if backend in ("eager", "compiled") and src.module is None:
        return "needs a PyTorch module (this is an ONNX/engine file)"
    if backend == "tensorrt":
        if device.type != "cuda":
            return "TensorRT runs on CUDA devices only"
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed (pip install kdkit[tensorrt])"
    if backend == "ort-int8" and device.type != "cpu":
        return "int8 on a GPU is TensorRT's (TensorRTTeacher(precision='int8'))"
    if src.engine is not None and backend != "tensorrt":
        return "a TensorRT engine runs only on the tensorrt backend"
    return None
