"""What the student buys at deploy time: parameters, FLOPs, throughput, latency, memory.

:func:`bench_model` measures one model on each requested backend and batch size through
kdkit's own teacher backends, so the numbers are those of the code path we ship:
``"eager"`` and ``"compiled"`` (:class:`TorchTeacher`, fp32, without / with
``torch.compile``), ``"ort"`` (:class:`OnnxTeacher`, the model exported with
:func:`kdkit.export_onnx`), ``"ort-int8"`` (the same file statically quantized to int8 by
:mod:`kdkit.teachers.quantize`, calibrated on random inputs) and ``"tensorrt"``
(:class:`TensorRTTeacher`, fp16). :func:`compare` turns a teacher's and a student's results
into a Markdown table and a one-line summary; :func:`plot_comparison` draws them.


The package's rooms: :mod:`~kdkit.bench.source` (what is measured),
:mod:`~kdkit.bench.memory` (peak-memory probes), :mod:`~kdkit.bench.runners` (the backends),
:mod:`~kdkit.bench.measure` (timing, and the method behind the numbers) and
:mod:`~kdkit.bench.report` (tables and plots).
"""

import importlib
from typing import Any

from kdkit.bench.measure import BenchResult, bench_model, describe_device
from kdkit.bench.report import compare, plot_comparison, results_to_json
from kdkit.bench.runners import BENCH_BACKENDS, Runner
from kdkit.bench.source import ModelSource, resolve_model

__all__ = [
    "BenchResult",
    "BENCH_BACKENDS",
    "ModelSource",
    "Runner",
    "bench_model",
    "compare",
    "plot_comparison",
    "results_to_json",
    "describe_device",
    "resolve_model",
]

# The private names of the single-module kdkit.bench, for code that imported them from there
# (``from kdkit.bench import _Memory``): resolved on first use, in their module and under the
# name they have now (the ones other modules need are public there).
_MOVED = {
    "_Source": ("source", "ModelSource"),
    "_resolve": ("source", "resolve_model"),
    "_check_onnx": ("source", "_check_onnx"),
    "_count_params": ("source", "count_params"),
    "_count_flops": ("source", "count_flops"),
    "_shape_error": ("source", "shape_error"),
    "_status_kb": ("memory", "_status_kb"),
    "_trim": ("memory", "_trim"),
    "_Memory": ("memory", "PeakMemory"),
    "_onnx_for": ("runners", "onnx_file_for"),
    "_build_runner": ("runners", "build_runner"),
    "_int8_for": ("runners", "int8_file_for"),
    "_skip_reason": ("runners", "skip_reason"),
    "_Plan": ("measure", "_Plan"),
    "_bench_backend": ("measure", "_bench_backend"),
    "_time_calls": ("measure", "_time_calls"),
    "_fmt": ("report", "_fmt"),
    "_ratio": ("report", "_ratio"),
    "_table": ("report", "_table"),
    "_times": ("report", "_times"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, attr = _MOVED[name]
        return getattr(importlib.import_module(f"kdkit.bench.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
