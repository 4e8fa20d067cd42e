"""benchmarks/bench_defaults.py runs every row on the real Fashion-MNIST config with a
randomly initialised demo teacher (one round, one step each), so the issue-25 table cannot rot;
timing is never asserted here."""

import argparse

import pytest
import torch
from _scripts import benchmark_module

import kdkit.data


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module(
        "bench_defaults", ("_bounds", "_gpu_kd_steps", "_harness", "_synthetic")
    )


def test_every_row_runs_and_the_table_renders(bench, tmp_path, monkeypatch, one_thread):
    from kdkit.demo import TEACHER_SPEC, spec_state
    from kdkit.models import fmnist_teacher
    from kdkit.train.checkpoint import save_checkpoint

    try:
        train = kdkit.data.load_fashion_mnist("train")
    except kdkit.KDError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    small = train.subset(torch.arange(2000))  # the config's 1k labels fit; the cache is quick
    monkeypatch.setattr(kdkit.data, "load_fashion_mnist", lambda split="train", **kw: small)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, spec_state(fmnist_teacher(), TEACHER_SPEC, role="teacher"))
    args = argparse.Namespace(threads=1, teacher=str(teacher), rounds=1, warmup=1, steps=1)
    res = bench.run(args)
    ran = {k for k, v in res["rates"].items() if v}
    one_thread_rows = set(bench.ROWS) - {"ceiling-1t", "teacher-1t"}  # those: --threads > 1
    assert ran | set(res["skipped"]) == one_thread_rows
    assert {"tutorial", "kdkit-default", "kdkit-api", "kdkit-cached", "ceiling", "teacher"} <= ran
    assert all(r > 0 for v in res["rates"].values() for r in v)
    assert "teacher.backend: auto ->" in res["choices"]["kdkit-api"][0]  # settled on batch 1
    table = bench.markdown([res])
    assert "| 1 | tutorial |" in table and "1.00x" in table and "100%" in table
    assert "| 1 | sequential bound |" in table and "| 1 | work bound |" in table


def test_bounds(bench):
    res = {"threads": 2, "rates": {"ceiling": [300.0], "teacher": [600.0],
                                   "ceiling-1t": [200.0], "teacher-1t": [400.0]}}  # fmt: skip
    seq, work = bench.bounds(res)
    assert seq == pytest.approx(200.0)  # 1 / (1/300 + 1/600)
    assert work == pytest.approx(2 / (1 / 200 + 1 / 400))  # one thread is the most efficient
