"""benchmarks/bench_gpu_kd.py --device cpu --small: every row's code path runs, so the GPU
benchmark cannot rot in CI (in-process: no second torch import)."""

import json

import pytest
import torch
from _scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    siblings = ("_gpu_kd_rows", "_gpu_kd_steps", "_harness", "_synthetic")
    yield from benchmark_module("bench_gpu_kd", siblings)


def test_small_mode_runs_every_row(bench, tmp_path, one_thread):
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--small", "--data-dir", str(tmp_path / "jpegs")]
    result = bench.main([*argv, "--json", str(out), "--strict"])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {r["path"]: r for r in result["rows"]}
    phases = list(dict.fromkeys(r["phase"] for r in result["rows"]))
    assert len(phases) == 2  # resident tensors, then the generated JPEG folder
    for r in result["rows"]:
        # on a CPU only the CUDA-only rows may be missing, and they say why
        ran = r["img_per_s"] is not None and r["img_per_s"] > 0
        assert ran or r["note"].startswith("skipped:"), r
    assert len(rows) == len(result["rows"])  # no duplicate rows (compile is off here)
    assert [r["id"] for r in result["rows"]] == [i for i in bench.ROW_IDS if i != "online-compiled"]
    skipped = {p for p, r in rows.items() if r["img_per_s"] is None}
    assert all("TensorRT" in p or "decode=gpu" in p for p in skipped), skipped
    naive = [r for r in result["rows"] if r["path"].startswith("naive")]
    assert len(naive) == 2 and all(r["vs_naive"] == 1.0 for r in naive)
    for needed in ("timm", "OnnxTeacher", "cached replay", "precompute", "teacher alone"):
        assert any(needed in p and rows[p]["img_per_s"] for p in rows), needed
    assert sum(1 for _ in (tmp_path / "jpegs" / "train").rglob("*.jpg")) == 48


def test_full_mode_refuses_a_cpu(bench):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="--device cpu --small"):
        bench.main([])


def _smoke(tmp_path, *more):
    return ["--device", "cpu", "--smoke", "--skip-files", "--data-dir", str(tmp_path / "j"), *more]


def test_only_reruns_some_rows_and_merges_them_into_the_json(bench, tmp_path, one_thread):
    out = tmp_path / "rows.json"
    bench.main(_smoke(tmp_path, "--json", str(out), "--only", "naive,student"))
    first = json.loads(out.read_text())
    assert first["complete"] and [r["id"] for r in first["rows"]] == ["naive", "student"]
    bench.main(_smoke(tmp_path, "--json", str(out), "--only", "teacher"))
    rows = json.loads(out.read_text())["rows"]
    assert [r["id"] for r in rows] == ["naive", "teacher", "student"]  # the run's order
    assert rows[0] == first["rows"][0]  # kept as measured
    naive = rows[0]["img_per_s"]
    assert rows[1]["vs_naive"] == pytest.approx(rows[1]["img_per_s"] / naive)
    with pytest.raises(SystemExit, match="the ids are naive, timm-fp32"):
        bench.main(_smoke(tmp_path, "--only", "navie"))


def test_the_json_holds_every_row_measured_before_a_kill(bench, tmp_path, one_thread, monkeypatch):
    def killed(self, compile):
        raise KeyboardInterrupt  # what a timeout's SIGINT does mid-row

    monkeypatch.setattr(bench.Bench, "teacher_alone", killed)
    out = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(_smoke(tmp_path, "--json", str(out), "--only", "naive,cached,teacher,student"))
    partial = json.loads(out.read_text())
    assert not partial["complete"]
    assert [r["id"] for r in partial["rows"]] == ["naive", "cached"]
    assert partial["rows"][1]["note"].startswith("skipped: no cache")  # needs precompute


def test_row_budget_caps_the_timed_steps(bench):
    calls = []
    from _harness import Budget, measure

    budget = Budget(warmup=5, steps=100, seconds=0.0, min_steps=3)

    batches = iter([(torch.zeros(2),)] * 200)
    got = measure(calls.append, batches, torch.device("cpu"), budget)
    assert got.steps == 3 and len(calls) == 2 + 3  # 2 warm-up steps at least, then the floor
