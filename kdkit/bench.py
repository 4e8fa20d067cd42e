"""What the student buys at deploy time: parameters, FLOPs, throughput, latency, memory.

:func:`bench_model` measures one model on each requested backend and batch size through
kdkit's own teacher backends, so the numbers are those of the code path we ship:
``"eager"`` and ``"compiled"`` (:class:`TorchTeacher`, fp32, without / with
``torch.compile``), ``"ort"`` (:class:`OnnxTeacher`, the model exported with
:func:`kdkit.export_onnx`), ``"ort-int8"`` (the same file statically quantized to int8 by
:mod:`kdkit.teachers.quantize`, calibrated on random inputs) and ``"tensorrt"``
(:class:`TensorRTTeacher`, fp16). :func:`compare` turns a teacher's and a student's results
into a Markdown table and a one-line summary; :func:`plot_comparison` draws them.

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

import copy
import ctypes
import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdkit._io import atomic_path
from kdkit.capture import unwrap
from kdkit.errors import KDError

__all__ = [
    "BenchResult",
    "BENCH_BACKENDS",
    "bench_model",
    "compare",
    "plot_comparison",
    "results_to_json",
    "describe_device",
    "resolve_model",
]

log = logging.getLogger(__name__)

BENCH_BACKENDS = ("eager", "compiled", "ort", "ort-int8", "tensorrt")


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


# -- what is being measured ---------------------------------------------------------------
@dataclass
class _Source:
    name: str
    module: nn.Module | None = None
    onnx: Path | None = None
    engine: Path | None = None
    input_shape: tuple[int, ...] | None = None


def _resolve(obj: Any, name: str | None, trust_code: bool = False) -> _Source:
    """A module, an .onnx / .engine path, a kdkit checkpoint, or a model spec such as
    ``"kdkit:fmnist_teacher"`` / ``"torchvision:resnet18"`` (random weights)."""
    if isinstance(obj, _Source):
        return obj
    if isinstance(obj, nn.Module):
        return _Source(name or type(unwrap(obj)).__name__, module=unwrap(obj))
    if not isinstance(obj, (str, os.PathLike)):
        raise KDError(f"cannot benchmark {type(obj).__name__}; give a module or a path")
    from kdkit.load import load_model, spec_from_text
    from kdkit.registry import build_model

    path = Path(obj)
    if not path.exists() and ":" in str(obj):  # a model spec, random weights
        spec = spec_from_text(str(obj), where=f"model {str(obj)!r}")
        return _Source(name or spec.name, module=build_model(spec, trust_code=trust_code))
    if not path.is_file():
        raise KDError(
            f"no model file at {path} (and not a model spec such as 'kdkit:fmnist_student')"
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        _check_onnx(path)
        return _Source(name or path.stem, onnx=path)
    if suffix in (".engine", ".plan"):
        return _Source(name or path.stem, engine=path)
    module, meta = load_model(path, trust_code=trust_code)
    shape = tuple(meta["input_shape"]) if meta.get("input_shape") else None
    return _Source(name or path.stem, module=module, input_shape=shape)


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


def resolve_model(obj: Any, name: str | None = None, *, trust_code: bool = False) -> _Source:
    """Load what :func:`bench_model` would measure, without measuring it: lets a caller
    refuse a bad second model before spending minutes on the first."""
    return _resolve(obj, name, trust_code)


def _count_params(src: _Source) -> int | None:
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


def _shape_error(what: str, shape: tuple[int, ...], err: Exception) -> KDError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return KDError(
        f"{what} does not run on input (N, {', '.join(map(str, shape))}): {first[:200]}; "
        "pass the model's own --input-shape / input_shape"
    )


def _count_flops(module: nn.Module | None, shape: tuple[int, ...]) -> float | None:
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
        raise _shape_error(type(module).__name__, shape, err) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    return float(counter.get_total_flops())


# -- memory probes --------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Memory:
    """Peak memory above a baseline taken before the model is loaded (see module docstring)."""

    def __init__(self, device: torch.device, backend: str) -> None:
        self.device = device
        self.mode = "rss"
        if device.type == "cuda":
            self.mode = "torch" if backend in ("eager", "compiled") else "device"
        self.base = 0
        self.lowest_free = 0
        try:
            self.base = self._now()
        except OSError:
            self.mode = "none"

    def _now(self) -> int:
        if self.mode == "rss":
            _trim()
            return _status_kb("VmRSS") * 1024
        torch.cuda.synchronize(self.device)
        if self.mode == "torch":
            return torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(self.device)[0]

    def reset_peak(self) -> None:
        try:
            if self.mode == "rss":
                _trim()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            elif self.mode == "torch":
                torch.cuda.reset_peak_memory_stats(self.device)
        except OSError:
            log.info("cannot reset the peak RSS here; peak memory not reported")
            self.mode = "none"

    def peak_mb(self) -> float | None:
        if self.mode == "none":
            return None
        if self.mode == "rss":
            peak = _status_kb("VmHWM") * 1024 - self.base
        elif self.mode == "torch":
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            peak = self.base - torch.cuda.mem_get_info(self.device)[0]
        return max(peak, 0) / 2**20


# -- runners ----------------------------------------------------------------------------------
Runner = Callable[[torch.Tensor], Any]


def _onnx_for(src: _Source, shape: tuple[int, ...], workdir: Path) -> Path:
    if src.onnx is None:
        from kdkit.export import export_onnx

        src.onnx = workdir / f"{src.name}.onnx"
        export_onnx(src.module, src.onnx, shape)
    return src.onnx


def _build_runner(
    src: _Source,
    backend: str,
    device: torch.device,
    max_batch: int,
    onnx_path: Path | None,
    threads: int | None,
) -> Runner | None:
    """The backend's own copy of the model, loaded now (inside the memory window)."""
    from kdkit.teachers import OnnxTeacher, TensorRTTeacher, TorchTeacher

    if backend in ("eager", "compiled"):
        if src.module is None:
            return None
        module = copy.deepcopy(src.module).to(device)
        return TorchTeacher(module, compile=backend == "compiled")
    if backend in ("ort", "ort-int8"):  # ort-int8: onnx_path is the int8 file (_int8_for)
        from kdkit.teachers.onnx_teacher import default_providers, import_onnxruntime

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


def _int8_for(onnx_path: Path, shape: tuple[int, ...], workdir: Path) -> Path:
    """The ONNX file quantized to int8 (:mod:`kdkit.teachers.quantize`), calibrated on random
    inputs: bench models may have random weights and only speed is measured here; training
    calibrates on real images behind the fidelity gate."""
    from kdkit.teachers.calibration import Calibration, CalibrationArrays
    from kdkit.teachers.onnx_teacher import import_onnxruntime, load_session
    from kdkit.teachers.quantize import int8_model

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


def _skip_reason(src: _Source, backend: str, device: torch.device) -> str | None:
    if backend in ("eager", "compiled") and src.module is None:
        return "needs a PyTorch module (this is an ONNX/engine file)"
    if backend == "tensorrt":
        import importlib.util

        if device.type != "cuda":
            return "TensorRT runs on CUDA devices only"
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed (pip install kdkit[tensorrt])"
    if backend == "ort-int8" and device.type != "cpu":
        return "int8 on a GPU is TensorRT's (TensorRTTeacher(precision='int8'))"
    if src.engine is not None and backend != "tensorrt":
        return "a TensorRT engine runs only on the tensorrt backend"
    return None


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
    src = _resolve(model_or_path, name, trust_code)
    shape = tuple(input_shape) if input_shape is not None else src.input_shape
    if not shape or any(int(d) < 1 for d in shape):
        raise KDError(f"give input_shape=(C, H, W) with positive sizes for {src.name}")
    plan = _Plan(device, shape, sorted(set(batch_sizes)), warmup, repeats, threads)
    counts = (_count_params(src), _count_flops(src.module, shape))
    results: list[BenchResult] = []
    saved_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory(prefix="kdkit-bench-") as workdir:
            for backend in backends:
                reason = _skip_reason(src, backend, device)
                if reason:
                    log.warning("%s: skipping %s: %s", src.name, backend, reason)
                    continue
                onnx_path = None
                if backend in ("ort", "ort-int8", "tensorrt") and src.engine is None:
                    onnx_path = _onnx_for(src, shape, Path(workdir))  # outside the memory window
                if backend == "ort-int8" and onnx_path is not None:
                    onnx_path = _int8_for(onnx_path, shape, Path(workdir))
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
    src: _Source,
    backend: str,
    plan: _Plan,
    onnx_path: Path | None,
    counts: tuple[int | None, float | None],
) -> list[BenchResult]:
    memory = _Memory(plan.device, backend)
    max_batch = max(plan.batch_sizes)
    runner = _build_runner(src, backend, plan.device, max_batch, onnx_path, plan.threads)
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
            raise _shape_error(f"{src.name} ({backend})", plan.shape, err) from None
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


# -- reporting ------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _table(results: Sequence[BenchResult]) -> list[str]:
    rows = [
        "| model | backend | batch | params | GFLOP/img | img/s | p50 (ms) | p95 (ms) | peak mem (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        gflop = None if r.flops_per_image is None else r.flops_per_image / 1e9
        rows.append(
            f"| {r.model} | {r.backend} | {r.batch_size} | {_fmt(r.params, ',')} "
            f"| {_fmt(gflop, '.3f')} | {r.img_per_s:,.0f} | {r.latency_p50_ms:.2f} "
            f"| {r.latency_p95_ms:.2f} | {_fmt(r.peak_mem_mb, ',.1f')} |"
        )
    return rows


def _times(x: float, more: str, less: str) -> str:
    return f"{x:.1f}x {more}" if x >= 1 else f"{1 / x:.1f}x {less}"


def compare(teacher_results: Sequence[BenchResult], student_results: Sequence[BenchResult]) -> str:
    """Markdown: both models' rows, the student/teacher ratio per backend and batch, and a
    summary line for the largest common batch on the backend where the student is fastest::

        student is 4.2x faster (batch 64, ort), 3.5x less memory, 12x fewer parameters
    """
    teacher = {(r.backend, r.batch_size): r for r in teacher_results}
    student = {(r.backend, r.batch_size): r for r in student_results}
    common = [k for k in student if k in teacher]
    if not common:
        raise KDError("teacher and student results share no (backend, batch size)")
    lines = _table([*teacher_results, *student_results])
    lines += [
        "",
        "| backend | batch | student speed-up (img/s) | teacher/student peak memory |",
        "|---|---:|---:|---:|",
    ]
    for key in sorted(common):
        t, s = teacher[key], student[key]
        mem = _ratio(t.peak_mem_mb, s.peak_mem_mb)
        lines.append(
            f"| {key[0]} | {key[1]} | {s.img_per_s / t.img_per_s:.2f}x | {_fmt(mem, '.2f')}x |"
        )
    batch = max(k[1] for k in common)
    backend = max((k for k in common if k[1] == batch), key=lambda k: student[k].img_per_s)[0]
    t, s = teacher[(backend, batch)], student[(backend, batch)]
    parts = [_times(s.img_per_s / t.img_per_s, "faster", "slower") + f" (batch {batch}, {backend})"]
    ratios = (
        (_ratio(t.peak_mem_mb, s.peak_mem_mb), "less memory", "more memory"),
        (_ratio(t.params, s.params), "fewer parameters", "more parameters"),
        (_ratio(t.flops_per_image, s.flops_per_image), "fewer FLOPs", "more FLOPs"),
    )
    parts += [_times(x, more, less) for x, more, less in ratios if x is not None]
    lines += ["", f"**student is {', '.join(parts)}**"]
    return "\n".join(lines)


def results_to_json(
    teacher_results: Sequence[BenchResult], student_results: Sequence[BenchResult]
) -> dict[str, Any]:
    """Plain data for ``json.dump``: ``{"teacher": [...], "student": [...]}``."""
    return {
        "teacher": [asdict(r) for r in teacher_results],
        "student": [asdict(r) for r in student_results],
    }


def plot_comparison(
    teacher_results: Sequence[BenchResult],
    student_results: Sequence[BenchResult],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Bar charts of throughput (log scale) and peak memory, teacher vs student, as a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({(r.backend, r.batch_size) for r in [*teacher_results, *student_results]})
    labels = [f"{b}\nbatch {n}" for b, n in keys]
    fig = Figure(figsize=(max(6.0, 1.1 * len(keys) + 2), 6.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    xs, width = np.arange(len(keys)), 0.38
    for ax, field, title in (
        (axes[0], "img_per_s", "throughput (img/s, log scale)"),
        (axes[1], "peak_mem_mb", "peak memory (MB)"),
    ):
        for i, (who, results) in enumerate(
            (("teacher", teacher_results), ("student", student_results))
        ):
            by_key = {(r.backend, r.batch_size): getattr(r, field) for r in results}
            values = [by_key.get(k) or 0.0 for k in keys]
            ax.bar(xs + (i - 0.5) * width, values, width, label=who)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if field == "img_per_s":
            ax.set_yscale("log")
    axes[0].legend()
    axes[1].set_xticks(xs, labels, fontsize=8)
    device = (teacher_results or student_results)[0].device
    fig.suptitle(title or f"teacher vs student on {device}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
