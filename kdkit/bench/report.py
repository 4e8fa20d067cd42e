"""Reporting benchmark results: a Markdown table with the student/teacher ratios and a
one-line summary (:func:`compare`), plain data for JSON, and a PNG bar chart.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kdkit._io import atomic_path
from kdkit.bench.measure import BenchResult
from kdkit.errors import KDError

__all__ = ["compare", "plot_comparison", "results_to_json"]

log = logging.getLogger(__name__)


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
    # the panel's title has its own name: a loop variable called ``title`` shadowed the
    # parameter, so every figure was titled "peak memory (MB)"
    for ax, field, panel in (
        (axes[0], "img_per_s", "throughput (img/s, log scale)"),
        (axes[1], "peak_mem_mb", "peak memory (MB)"),
    ):
        for i, (who, results) in enumerate(
            (("teacher", teacher_results), ("student", student_results))
        ):
            by_key = {(r.backend, r.batch_size): getattr(r, field) for r in results}
            values = [by_key.get(k) or 0.0 for k in keys]
            ax.bar(xs + (i - 0.5) * width, values, width, label=who)
        ax.set_title(panel, fontsize=10)
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
