"""``backend="auto"``: time each teacher backend that can run here on a real batch, keep the
fastest that agrees with the eager teacher.

Why: measured side by side (issue 25: one thread, the demo's teacher, batch 128), the default
eager teacher gave 1.20x the tutorial loop, ONNX Runtime 1.25x and the int8 teacher 1.41x;
which one wins depends on the model, the batch and the machine, so a default that is fast
everywhere has to measure. The cost is kept small: one warm-up and a few timed batches per
backend, a budget of seconds checked before each candidate (:data:`BUDGET_S`), and the ONNX
export every ONNX candidate needs made once and cached by the weights' fingerprint
(:func:`kdkit.teachers.quantize.export_path`, the file ``precision: int8`` uses too).

Candidates, in the order they are tried: ``torch`` (eager, the reference), ``torch-compiled``
(GPU only), ``onnx`` (ONNX Runtime fp32), ``onnx-int8`` (behind the int8 fidelity gate, when
calibration images are given) and ``tensorrt`` (GPU, when ``tensorrt`` imports). ONNX and
TensorRT give final logits only, so a run that distils teacher features keeps the torch ones.
Every candidate but the reference must also agree with the reference's top-1 on the timed
batch at least ``gate.min_agreement`` (default 0.99): a fast wrong teacher is never chosen,
and a later candidate must be :data:`MARGIN` (5%) faster to displace an earlier one.

The student's memory format (``channels_last: auto``, :func:`choose_channels_last`) is measured
the same way, on a copy of the student, by ``kdkit train``'s builder and by the Trainer for a
Python-API :class:`~kdkit.data.pipeline.InputPipeline` whose ``channels_last`` is ``"auto"``.

``KDKIT_AUTOTUNE=off`` makes ``auto`` mean ``torch`` without measuring (runs that must pick
the same backend every time, e.g. tests that compare two runs bit for bit).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.teachers.base import Teacher

__all__ = [
    "BUDGET_S",
    "CANDIDATES",
    "MARGIN",
    "Choice",
    "autotune_enabled",
    "backend_candidates",
    "build_backend",
    "choose_backend",
    "choose_channels_last",
    "measure",
    "pick_fastest",
]

log = logging.getLogger(__name__)

CANDIDATES = ("torch", "torch-compiled", "onnx", "onnx-int8", "tensorrt")
#: seconds of measuring (builds included) after which no further candidate is started
BUDGET_S = {"cpu": 5.0, "cuda": 60.0}
_REPEATS = {"cpu": (1, 3), "cuda": (3, 10)}  # (warm-up, timed) calls


def autotune_enabled() -> bool:
    """False when ``KDKIT_AUTOTUNE`` is ``off`` / ``0`` / ``false``: ``auto`` then keeps the
    first candidate without measuring."""
    return os.environ.get("KDKIT_AUTOTUNE", "on").strip().lower() not in ("off", "0", "false")


@dataclass
class Choice:
    """One measured choice: ``value`` kept, seconds per batch of each candidate timed, the
    reason each other one was skipped, and what measuring cost (``cost_s``, builds included).
    ``measured`` is False when the value came from a run's record or had no rival."""

    key: str
    value: Any
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    cost_s: float = 0.0
    measured: bool = True

    def line(self) -> str:
        """The one log line: the table and the choice."""
        if not self.measured:
            return f"{self.key}: auto -> {self.value} (recorded by the run, not measured again)"
        parts = [f"{name} {1000 * s:.1f} ms/batch" for name, s in self.seconds.items()]
        if not self.seconds:
            parts.append("the only candidate, not timed")
        parts += [f"{name} skipped ({why})" for name, why in self.skipped.items()]
        return f"{self.key}: auto -> {self.value} [{'; '.join(parts)}] ({self.cost_s:.1f} s)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "seconds_per_batch": dict(self.seconds),
            "skipped": dict(self.skipped),
            "cost_s": round(self.cost_s, 3),
        }

    @classmethod
    def recorded(cls, key: str, record: dict[str, Any]) -> Choice:
        """A choice read back from a run's record (``--resume``): kept, not re-measured."""
        return cls(
            key,
            record["value"],
            dict(record.get("seconds_per_batch", {})),
            dict(record.get("skipped", {})),
            float(record.get("cost_s", 0.0)),
            measured=False,
        )


def measure(label: str, fn: Callable[[], Any], device: torch.device) -> float:
    """Median seconds of one ``fn()`` call after a warm-up (tests replace this function:
    timings on a shared machine prove nothing, the choice logic is what they check)."""
    warmup, repeats = _REPEATS["cuda" if device.type == "cuda" else "cpu"]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def backend_candidates(
    device: torch.device, *, precision: str = "fp32", features: bool = False, calibration=None
) -> tuple[list[str], dict[str, str]]:
    """The backends worth timing here, and why each other one is left out."""
    keep, skipped = ["torch"], {}
    gpu = device.type == "cuda"
    if gpu:
        keep.append("torch-compiled")
    else:
        skipped["torch-compiled"] = "GPU only"
    onnx_why = None
    if features:
        onnx_why = "teacher features are distilled (torch only)"
    elif precision != "fp32":
        onnx_why = f"precision {precision} (ONNX runs fp32 or int8)"
    elif importlib.util.find_spec("onnxruntime") is None:
        onnx_why = "onnxruntime not installed"
    if onnx_why is None:
        keep.append("onnx")
        if calibration is not None:
            keep.append("onnx-int8")
        else:
            skipped["onnx-int8"] = "no calibration images"
    else:
        skipped["onnx"] = skipped["onnx-int8"] = onnx_why
    if onnx_why is not None:
        skipped["tensorrt"] = onnx_why
    elif not gpu:
        skipped["tensorrt"] = "GPU only"
    elif importlib.util.find_spec("tensorrt") is None:
        skipped["tensorrt"] = "tensorrt not installed"
    else:
        keep.append("tensorrt")
    return keep, skipped


def build_backend(
    name: str,
    module: nn.Module,
    *,
    input_shape: Sequence[int],
    precision: str = "fp32",
    calibration: Any = None,
    gate: Any = None,
    batch_size: int = 256,
) -> Teacher:
    """The teacher of candidate ``name`` (also how a recorded choice is rebuilt on resume)."""
    from kdkit.teachers.torch_teacher import TorchTeacher

    if name in ("torch", "torch-compiled"):
        return TorchTeacher(module, precision=precision, compile=name == "torch-compiled")
    if name not in CANDIDATES:
        raise KDError(f"unknown teacher backend {name!r}; expected one of {list(CANDIDATES)}")
    from kdkit.teachers.onnx_teacher import OnnxTeacher

    path = onnx_file(module, input_shape)
    if name == "onnx":
        return OnnxTeacher(path)
    if name == "onnx-int8":
        return OnnxTeacher(path, precision="int8", calibration=calibration, gate=gate)
    from kdkit.teachers.tensorrt_teacher import TensorRTTeacher

    return TensorRTTeacher(path, precision="fp16", max_batch=batch_size)


def onnx_file(module: nn.Module, input_shape: Sequence[int]):
    """The module's lasting fp32 export (made once per set of weights, then reused): the file
    ``onnx``, ``onnx-int8`` and ``tensorrt`` all start from, and ``precision: int8`` uses."""
    from kdkit.export import export_onnx
    from kdkit.teachers import quantize

    path = quantize.export_path(module)
    if not path.is_file():
        export_onnx(module, path, tuple(input_shape))
    return path


#: a later candidate must be this much faster than the best so far to replace it: the order
#: puts the exact ones first (eager before ORT before int8; contiguous before channels_last),
#: so a difference within timing noise never trades fidelity or a format change for nothing
MARGIN = 0.05


def pick_fastest(seconds: dict[str, float]) -> str:
    """The fastest candidate, in the listed order, each later one kept only when it is at
    least :data:`MARGIN` faster than the best before it."""
    best = None
    for name, s in seconds.items():
        if best is None or s < seconds[best] * (1 - MARGIN):
            best = name
    if best is None:
        raise KDError("no candidate was timed")
    return best


def choose_backend(
    module: nn.Module,
    example: torch.Tensor,
    *,
    precision: str = "fp32",
    features: bool = False,
    calibration: Any = None,
    gate: Any = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    budget_s: float | None = None,
) -> tuple[Teacher, Choice]:
    """Time every candidate on ``example`` (one real batch, on the run's device, under the
    run's ``autocast``) and return the fastest teacher that agrees with eager torch."""
    from kdkit.teachers.fidelity import compare_logits
    from kdkit.teachers.quantize import as_gate

    device = example.device
    kind = "cuda" if device.type == "cuda" else "cpu"
    budget = BUDGET_S[kind] if budget_s is None else budget_s
    names, skipped = backend_candidates(
        device, precision=precision, features=features, calibration=calibration
    )
    if not autotune_enabled():
        skipped.update({n: "KDKIT_AUTOTUNE=off" for n in names[1:]})
        names = names[:1]
    choice = Choice("teacher.backend", "torch", skipped=skipped)
    min_agreement = as_gate(gate).min_agreement
    start = time.perf_counter()
    teachers: dict[str, Teacher] = {}
    reference = None
    if len(names) > 1 and "onnx" in names:
        try:  # while the module is still on the CPU (the torch candidates move it)
            onnx_file(module.cpu(), example.shape[1:])
        except Exception as err:
            why = f"export failed: {type(err).__name__}: {err}"[:160]
            skipped.update({n: why for n in names if n.startswith("onnx") or n == "tensorrt"})
            names = [n for n in names if n not in skipped]
    for name in names:
        if name != "torch" and time.perf_counter() - start > budget:
            choice.skipped[name] = f"over the {budget:g} s budget"
            continue
        try:
            t = build_backend(
                name,
                module,
                input_shape=tuple(example.shape[1:]),
                precision=precision,
                calibration=calibration,
                gate=gate,
                batch_size=int(example.shape[0]),
            ).to(device)

            def run(t: Teacher = t) -> torch.Tensor:
                with torch.no_grad(), autocast():
                    return t(example).logits

            logits = run()
        except KDError as err:  # below the int8 gate, or a model an exporter cannot take
            if name == "torch":
                raise
            choice.skipped[name] = f"{err}".split(";")[0][:160]
            continue
        except Exception as err:  # an optional runtime's own error: skip it, say why
            if name == "torch":
                raise
            choice.skipped[name] = f"failed to build: {type(err).__name__}: {err}"[:160]
            continue
        if reference is None:
            reference = logits
        else:
            agree = compare_logits(reference, logits).top1_agreement
            if agree < min_agreement:
                choice.skipped[name] = (
                    f"top-1 agreement {agree:.2%} with torch < {min_agreement:.0%}"
                )
                continue
        teachers[name] = t
        if len(names) > 1:  # a lone candidate needs no clock
            choice.seconds[name] = measure(name, run, device)

    choice.value = pick_fastest(choice.seconds) if choice.seconds else "torch"
    choice.cost_s = time.perf_counter() - start
    for name, t in teachers.items():  # the losers' sessions and hooks go now
        if name != choice.value and hasattr(t, "close"):
            t.close()
    log.info("%s", choice.line())
    return teachers[choice.value], choice


def _student_step(student: nn.Module, x: torch.Tensor, autocast) -> Callable[[], None]:
    def step() -> None:
        with autocast():
            out = student(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        out.float().mean().backward()

    return step


def choose_channels_last(
    student: nn.Module,
    x: torch.Tensor,
    *,
    recorded: dict[str, Any] | None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Choice:
    """``train.channels_last: auto``: forward + backward of a copy of the student in each
    memory format on ``x``; channels_last is kept when it is at least
    :data:`~kdkit.teachers.autotune.MARGIN` (5%) faster. The student itself and
    the RNG are left as they were."""
    if recorded is not None:
        choice = Choice.recorded("train.channels_last", recorded)
    elif x.dim() != 4:
        choice = Choice("train.channels_last", False, skipped={"true": "inputs are not 4-D"})
    elif not autotune_enabled():
        choice = Choice("train.channels_last", False, skipped={"true": "KDKIT_AUTOTUNE=off"})
    else:
        start = time.perf_counter()
        seconds = {}
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for name, fmt in (("false", torch.contiguous_format), ("true", torch.channels_last)):
                model = copy.deepcopy(student).to(x.device, memory_format=fmt).train()
                step = _student_step(model, x.contiguous(memory_format=fmt), autocast)
                seconds[name] = measure(f"channels_last={name}", step, x.device)
                del model
        value = pick_fastest(seconds) == "true"
        choice = Choice("train.channels_last", value, seconds, cost_s=time.perf_counter() - start)
    log.info("%s", choice.line())
    return choice
