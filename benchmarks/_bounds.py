"""Issue 39's two bounds of online distillation, and a loop run at a given thread count.

- **sequential bound**: the student's step then the teacher's forward, one after the other,
  ``1 / (1/student + 1/teacher)`` (rates in items/s at the run's thread count);
- **work bound**: ``N`` threads divided by the core-seconds per item of the student's step and of
  the teacher's forward, each at its most efficient thread count: the most any split of the
  ``N`` cores between the two can give.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def sequential_bound(student: float, teacher: float) -> float:
    return 1 / (1 / student + 1 / teacher)


def work_bound(threads: int, student: Mapping[int, float], teacher: Mapping[int, float]) -> float:
    """``student`` / ``teacher``: items/s by thread count (e.g. ``{1: r1, 2: r2}``)."""

    def core_s(rates: Mapping[int, float]) -> float:
        return min(t / rate for t, rate in rates.items())

    return threads / (core_s(student) + core_s(teacher))


def on_threads(loop: Callable, threads: int | None) -> Callable:
    """``loop`` run with this thread's PyTorch thread count set to ``threads`` (None: as is);
    an ONNX Runtime teacher follows the calling thread's count."""
    if threads is None:
        return loop

    def run(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return loop(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return run
