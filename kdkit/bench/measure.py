"""Measuring one model: parameters, FLOPs, throughput, latency and peak memory.

:func:`bench_model` measures one model on each requested backend and batch size through
kdkit's own teacher backends (:mod:`kdkit.bench.runners`).

Method. Each (backend, batch) is warmed up, then timed ``repeats`` times, one call per
timing with the device synchronised after it; throughput is ``batch / median(call time)``,
latency p50/p95 are percentiles of the same call times. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on one image (convolutions and matmuls, 2 FLOPs
per multiply-add). Peak memory is what the backend adds to the process, from loading its own
copy of the model to the end of the timed calls at that batch size:

- CPU: peak resident set size (``VmHWM`` in ``/proc/self/status``) minus the resident size
  before the model was loaded. The high-water mark is reset before each batch size by
  writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), after ``gc`` and
  ``malloc_trim`` have returned freed memory to the OS, so earlier measurements do not
  leak into later ones. Batch sizes run in increasing order (ONNX Runtime's arena only grows).
  For ``compiled`` the figure includes the compiler's resident state. ``None`` where
  ``/proc`` is not available.
- CUDA, torch backends: ``torch.cuda.max_memory_allocated`` minus the allocation before
  loading. ONNX Runtime and TensorRT allocate outside PyTorch, so for them it is the drop in
  free device memory (``torch.cuda.mem_get_info``) since before loading.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.bench.memory import PeakMemory
from kdkit.bench.runners import (
    BENCH_BACKENDS,
    Runner,
    build_runner,
    int8_file_for,
    onnx_file_for,
    skip_reason,
)
from kdkit.bench.source import ModelSource, count_flops, count_params, resolve_model, shape_error
from kdkit.errors import KDError

__all__ = ["BenchResult", "bench_model", "describe_device"]

log = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """One (model, backend, batch size) measurement. ``None``: not measurable here."""

    model: str
    backend: str
    device: str
    batch_size: int
    params: int | None
    flops_per_image: float | None
    img_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    peak_mem_mb: float | None


def describe_device(device: str | torch.device = "cpu") -> str:
    """``"NVIDIA H100 80GB HBM3"`` or ``"AMD EPYC (2 cores)"``: for result tables."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({len(os.sched_getaffinity(0))} cores)"


def _time_calls(run: Runner, x: torch.Tensor, warmup: int, repeats: int) -> np.ndarray:
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            run(x)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(x)
            sync()
            times.append(time.perf_counter() - start)
    return np.asarray(times)


def bench_model(
    model_or_path: Any,
    input_shape: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1, 8, 64),
    backends: Sequence[str] = ("eager", "ort"),
    device: str | torch.device = "cpu",
    repeats: int = 20,
    *,
    warmup: int = 3,
    name: str | None = None,
    threads: int | None = None,
    trust_code: bool = False,
) -> list[BenchResult]:
    """Measure ``model_or_path`` on each backend and batch size (see the module docstring).

    ``model_or_path``: an ``nn.Module``, an ``.onnx`` or ``.engine`` path, a kdkit
    checkpoint (its ``input_shape`` is used when ``input_shape`` is None), or a model spec
    such as ``"kdkit:fmnist_student"`` (random weights; ``python:`` specs and checkpoints
    naming them need ``trust_code=True``). Backends that cannot run here (no module for
    eager, no GPU for TensorRT...) are skipped with a log message. ``threads`` sets
    PyTorch's and ONNX Runtime's CPU threads for the measurement (default: theirs).
    """
    for b in backends:
        if b not in BENCH_BACKENDS:
            raise KDError(f"unknown backend {b!r}; choose from {list(BENCH_BACKENDS)}")
    if repeats < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise KDError(
            f"need repeats >= 1, warmup >= 0 and batch sizes >= 1; got repeats={repeats}, "
            f"warmup={warmup}, batch_sizes={list(batch_sizes)}"
        )
    if threads is not None and threads < 1:
        raise KDError(f"threads must be >= 1 (or None for the default), got {threads}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise KDError(f"device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDError("device='cuda' but no CUDA device is visible")
    src = resolve_model(model_or_path, name, trust_code=trust_code)
    shape = tuple(input_shape) if input_shape is not None else src.input_shape
    if not shape or any(int(d) < 1 for d in shape):
        raise KDError(f"give input_shape=(C, H, W) with positive sizes for {src.name}")
    plan = _Plan(device, shape, sorted(set(batch_sizes)), warmup, repeats, threads)
    counts = (count_params(src), count_flops(src.module, shape))
    results: list[BenchResult] = []
    saved_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory(prefix="kdkit-bench-") as workdir:
            for backend in backends:
                reason = skip_reason(src, backend, device)
                if reason:
                    log.warning("%s: skipping %s: %s", src.name, backend, reason)
                    continue
                onnx_path = None
                if backend in ("ort", "ort-int8", "tensorrt") and src.engine is None:
                    onnx_path = onnx_file_for(
                        src, shape, Path(workdir)
                    )  # outside the memory window
                if backend == "ort-int8" and onnx_path is not None:
                    onnx_path = int8_file_for(onnx_path, shape, Path(workdir))
                results += _bench_backend(src, backend, plan, onnx_path, counts)
    finally:
        torch.set_num_threads(saved_threads)
    if not results:
        raise KDError(f"no backend among {list(backends)} can run {src.name} on {device}")
    return results


@dataclass(frozen=True)
class _Plan:
    device: torch.device
    shape: tuple[int, ...]
    batch_sizes: list[int]
    warmup: int
    repeats: int
    threads: int | None


def _bench_backend(
    src: ModelSource,
    backend: str,
    plan: _Plan,
    onnx_path: Path | None,
    counts: tuple[int | None, float | None],
) -> list[BenchResult]:
    memory = PeakMemory(plan.device, backend)
    max_batch = max(plan.batch_sizes)
    runner = build_runner(src, backend, plan.device, max_batch, onnx_path, plan.threads)
    if runner is None:
        return []
    out = []
    for b in plan.batch_sizes:
        x = torch.randn((b, *plan.shape), device=plan.device)
        memory.reset_peak()
        try:
            times = _time_calls(runner, x, plan.warmup, plan.repeats)
        except KDError:
            raise
        except Exception as err:  # onnxruntime / TensorRT raise their own types
            raise shape_error(f"{src.name} ({backend})", plan.shape, err) from None
        out.append(
            BenchResult(
                model=src.name,
                backend=backend,
                device=str(plan.device),
                batch_size=b,
                params=counts[0],
                flops_per_image=counts[1],
                img_per_s=b / float(np.median(times)),
                latency_p50_ms=float(np.percentile(times, 50)) * 1e3,
                latency_p95_ms=float(np.percentile(times, 95)) * 1e3,
                peak_mem_mb=memory.peak_mb(),
            )
        )
        log.info("%s %s batch %d: %.1f img/s", src.name, backend, b, out[-1].img_per_s)
        del x
    del runner
    return out
