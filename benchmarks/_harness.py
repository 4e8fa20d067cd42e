"""The GPU benchmarks' timing harness: a row, how it is timed and recorded, and the table.

A row is a step function over batches: :func:`measure` runs ``warmup`` steps, then times
``steps`` more between two ``torch.cuda.synchronize`` calls (img/s). :func:`run_row` records
a row, a :class:`Skip` (this machine cannot run it), or a failure (``strict`` raises), with
the peak CUDA memory of the row. :func:`markdown` renders the rows per phase with each row's
ratio to its phase's naive row (:func:`ratios`).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torchvision

__all__ = [
    "Row",
    "Skip",
    "cycle",
    "markdown",
    "measure",
    "ratios",
    "run_row",
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


class Skip(Exception):
    """A row this machine cannot run (no CUDA, a backend not installed): listed, not an error."""


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
    step: Callable[[Any], Any],
    batches: Iterator[Any],
    device: torch.device,
    warmup: int,
    steps: int,
) -> float:
    """img/s of ``step`` over ``steps`` batches after ``warmup``."""
    for _ in range(warmup):
        step(next(batches))
    sync(device)
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        images += len(batch[0])
    sync(device)
    return images / (time.perf_counter() - start)


def stepped(
    make: Callable[[], tuple[Callable, Iterator]], device: torch.device, warmup: int, steps: int
) -> Callable[[], float]:
    """A row that times a step function over batches."""
    return lambda: measure(*make(), device, warmup, steps)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_row(
    rows: list[Row],
    phase: str,
    path: str,
    rate: Callable[[], float],
    device: torch.device,
    strict: bool,
) -> None:
    """Time one row (``rate()`` returns img/s) and append it, or why it did not run."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        rows.append(Row(phase, path, rate(), peak_mem_gib=_peak_gib(device)))
    except Skip as why:
        rows.append(Row(phase, path, None, note=f"skipped: {why}"))
    except Exception as err:  # a row's failure is a result; --strict makes it fatal
        if strict:
            raise
        log.error("row %r failed:\n%s", path, traceback.format_exc())
        rows.append(Row(phase, path, None, note=f"failed: {type(err).__name__}: {err}"[:300]))
    last = rows[-1]
    log.info(
        "%s | %s: %s (%.0f s)", phase, path, last.img_per_s or last.note, time.perf_counter() - t0
    )


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
            "| path | img/s | vs naive | peak GiB | note |",
            "|---|---:|---:|---:|---|",
        ]
        for r in (r for r in result["rows"] if r["phase"] == phase):
            rate = f"{r['img_per_s']:,.1f}" if r["img_per_s"] else "-"
            ratio = f"{r['vs_naive']:.2f}x" if r["vs_naive"] else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            lines.append(f"| {r['path']} | {rate} | {ratio} | {mem} | {r['note']} |")
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
