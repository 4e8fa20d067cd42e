"""The demo report's table only formats: the numbers are measured before it is called."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import kdkit.report as report
from kdkit.errors import KDDeprecationWarning


def test_accuracy_table_formats_given_speeds_without_measuring(monkeypatch):
    def no_bench(*a, **kw):
        raise AssertionError("a table with speeds= must not measure")

    monkeypatch.setattr(report, "bench_model", no_bench)
    runs = [
        SimpleNamespace(name="teacher", data="labels", test_top1=92.5, model=None),
        SimpleNamespace(name="scratch", data="labels", test_top1=89.0, model=None),
        SimpleNamespace(name="kd", data="teacher", test_top1=90.25, model=None),
    ]
    speeds = [
        {"params": 1200, "latency_ms": 2.0, "img_per_s": 500.0},
        {"params": 100, "latency_ms": 0.5, "img_per_s": 4000.0},
        {"params": 100, "latency_ms": 0.5, "img_per_s": 4000.0},
    ]
    table = report.accuracy_table(runs, speeds=speeds)
    assert "| kd | teacher | 100 | 90.25 | 0.500 | 4,000 |" in table
    assert "12.0x fewer parameters" in table and "4.0x faster at batch 1" in table
    assert "2.25 points below the teacher (+1.25 points" in table


def test_accuracy_table_without_speeds_still_measures_and_warns(monkeypatch):
    calls = []
    monkeypatch.setattr(report, "_speed", lambda m, s: calls.append(s) or {
        "params": 10, "latency_ms": 1.0, "img_per_s": 100.0})  # fmt: skip
    runs = [SimpleNamespace(name=n, data="d", test_top1=50.0, model=None) for n in "abc"]
    with pytest.warns(KDDeprecationWarning, match="speeds="):
        report.accuracy_table(runs, (3, 8, 8))
    assert calls == [(3, 8, 8)] * 3


def test_same_architecture_is_one_interleaved_measurement(monkeypatch):
    """The demo's scratch and KD students are one architecture: one (median) speed, never a
    difference that would suggest distillation made the student faster."""
    from torch import nn

    order = []

    def fake_speed(model, shape):
        order.append(model)
        return {"params": 1, "latency_ms": float(len(order)), "img_per_s": 1.0}

    monkeypatch.setattr(report, "_speed", fake_speed)
    teacher, scratch, kd = nn.Linear(4, 8), nn.Linear(4, 2), nn.Linear(4, 2)
    runs = [SimpleNamespace(model=m) for m in (teacher, scratch, kd)]
    speeds = report.measure_speeds(runs, (4,), rounds=3)
    assert order == [teacher, scratch] * 3  # interleaved rounds, one per architecture
    assert speeds[1] == speeds[2] and speeds[0]["latency_ms"] == 3.0  # medians
