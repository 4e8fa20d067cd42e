"""The GPU benchmarks' timing harness: a row, how it is timed and recorded, and the table.

A row is a step function over batches: :func:`measure` runs warm-up steps (every shape the
row will see, and torch.compile, happen there), then times more steps between two
``torch.cuda.synchronize`` calls (img/s), within the row's time budget. A :class:`Runner`
records each row, a :class:`Skip` (this machine cannot run it) or a failure (``strict``
raises), with the peak CUDA memory the row added above what was resident when it started
(the resident dataset, shared weights), keeps to ``--only`` and to the run's deadline, and
hands every new row to ``on_row`` (the script rewrites its JSON there, so a killed run still
returns what it measured). :func:`markdown` renders the rows per phase with each row's ratio
to its phase's naive row (:func:`ratios`).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision

__all__ = [
    "Budget",
    "Row",
    "Runner",
    "Skip",
    "cycle",
    "markdown",
    "measure",
    "ratios",
    "stepped",
    "sync",
    "versions",
]

log = logging.getLogger("bench_gpu_kd")


@dataclass
class Row:
    phase: str
    path: str
    img_per_s: float | None
    vs_naive: float | None = None
    peak_mem_gib: float | None = None
    note: str = ""
    id: str = ""
    steps: int | None = None


class Skip(Exception):
    """A row this machine cannot run (no CUDA, a backend not installed): listed, not an error."""


@dataclass(frozen=True)
class Budget:
    """Steps and seconds for one row: ``warmup`` steps at most (at least 2, so compile and
    the first replay are both outside the clock), then up to ``steps`` timed steps, stopping
    once ``seconds`` of timed work have passed (at least ``min_steps``)."""

    warmup: int
    steps: int
    seconds: float
    min_steps: int = 3


@dataclass
class Measured:
    img_per_s: float
    steps: int


def cycle(loader: Any) -> Iterator[Any]:
    """Batches of ``loader`` over as many epochs as asked for."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU): timings end after the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    step: Callable[[Any], Any], batches: Iterator[Any], device: torch.device, budget: Budget
) -> Measured:
    """img/s of ``step`` over timed batches after the warm-up (see :class:`Budget`)."""
    warm = max(min(budget.warmup, 2), 1)
    t0 = None
    for i in range(max(budget.warmup, warm)):
        step(next(batches))
        sync(device)
        if i == 0:
            t0 = time.perf_counter()  # after the first step: compile time is not warm-up
        elif i + 1 >= warm and time.perf_counter() - t0 > budget.seconds / 4:
            break
    images, done, start = 0, 0, time.perf_counter()
    floor = min(budget.min_steps, budget.steps)
    while done < budget.steps:
        batch = next(batches)
        step(batch)
        images += len(batch[0])
        done += 1
        if done >= floor and time.perf_counter() - start > budget.seconds:
            break
    sync(device)
    return Measured(images / (time.perf_counter() - start), done)


def stepped(
    make: Callable[[], tuple[Callable, Iterator]], device: torch.device, budget: Budget
) -> Callable[[], Measured]:
    """A row that times a step function over batches."""
    return lambda: measure(*make(), device, budget)


def _allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_gib(device: torch.device, base: int) -> float | None:
    if device.type != "cuda":
        return None
    return max(torch.cuda.max_memory_allocated(device) - base, 0) / 2**30


@dataclass
class Runner:
    """Records rows (see the module docstring). ``only``: the row ids to run (None: all);
    ``deadline``: ``time.perf_counter()`` after which the remaining rows are skipped."""

    device: torch.device
    strict: bool = False
    only: frozenset[str] | None = None
    deadline: float | None = None
    on_row: Callable[[list[Row]], None] = lambda rows: None
    rows: list[Row] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def wants(self, row_id: str) -> bool:
        self.seen.append(row_id)
        return self.only is None or row_id in self.only

    def run(self, row_id: str, phase: str, path: str, rate: Callable[[], Measured | float]):
        """Time one row (``rate()`` returns img/s) and append it, or why it did not run."""
        if not self.wants(row_id):
            return
        t0 = time.perf_counter()
        base = _allocated(self.device)
        row = Row(phase, path, None, id=row_id)
        try:
            if self.deadline is not None and t0 > self.deadline:
                raise Skip("out of time (the run's --total-budget-s)")
            got = rate()
            row.img_per_s, row.steps = (
                (got.img_per_s, got.steps) if isinstance(got, Measured) else (got, None)
            )
            row.peak_mem_gib = _peak_gib(self.device, base)
        except Skip as why:
            row.note = f"skipped: {why}"
        except Exception as err:  # a row's failure is a result; --strict makes it fatal
            if self.strict:
                raise
            log.error("row %r failed:\n%s", path, traceback.format_exc())
            row.note = f"failed: {type(err).__name__}: {err}"[:300]
        self.rows.append(row)
        log.info(
            "%s | %s: %s (%.0f s)", phase, path, row.img_per_s or row.note, time.perf_counter() - t0
        )
        self.on_row(self.rows)


def ratios(rows: list[Row]) -> None:
    """Set each row's ``vs_naive``: its img/s over its phase's naive row's (loaders: none)."""
    for phase in dict.fromkeys(r.phase for r in rows):
        base = next(
            (r.img_per_s for r in rows if r.phase == phase and r.path.startswith("naive")), None
        )
        for r in rows:
            if r.phase == phase and base and r.img_per_s and not r.path.startswith("loader"):
                r.vs_naive = r.img_per_s / base


def markdown(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}", result["versions"], result["workload"], ""]
    for phase in dict.fromkeys(r["phase"] for r in result["rows"]):
        lines += [
            f"### {phase}",
            "",
            "| id | path | img/s | vs naive | peak GiB (above start) | steps | note |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in result["rows"] if r["phase"] == phase):
            rate = f"{r['img_per_s']:,.1f}" if r["img_per_s"] else "-"
            ratio = f"{r['vs_naive']:.2f}x" if r["vs_naive"] else "-"
            mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
            steps = r.get("steps") or "-"
            lines.append(
                f"| {r.get('id', '')} | {r['path']} | {rate} | {ratio} | {mem} | {steps} "
                f"| {r['note']} |"
            )
        lines.append("")
    return "\n".join(lines)


def versions() -> str:
    """torch, torchvision, timm, onnxruntime and tensorrt versions, and the load average."""
    parts = [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]
    for mod in ("timm", "onnxruntime", "tensorrt"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} -")
    return ", ".join(parts) + f"; load average {os.getloadavg()[0]:.2f}"
