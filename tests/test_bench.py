"""Deploy benchmark: counts, timings, memory, the comparison table, plot and CLI."""

from __future__ import annotations

import json
import sys

import pytest
from torch import nn

from kdkit.bench import BenchResult, bench_model, compare, plot_comparison, results_to_json
from kdkit.errors import KDError
from kdkit.export import export_onnx

FAST = {"repeats": 2, "warmup": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(n_in: int = 16, n_out: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out))


def test_bench_counts_and_rows():
    results = bench_model(_linear(), (1, 4, 4), batch_sizes=(4, 1), **FAST)
    assert [(r.backend, r.batch_size) for r in results] == [
        ("eager", 1),
        ("eager", 4),
        ("ort", 1),
        ("ort", 4),
    ]
    for r in results:
        assert r.params == 16 * 4 + 4
        assert r.flops_per_image == 2 * 16 * 4  # one multiply-add per weight, 2 FLOPs each
        assert r.img_per_s > 0 and r.latency_p95_ms >= r.latency_p50_ms > 0
        assert r.device == "cpu"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_bench_peak_memory_tracks_model_size():
    """A 16 MB weight matrix must show up; a 400-byte one must not."""
    big = bench_model(_linear(2048, 2048), (2048,), batch_sizes=(1,), backends=("eager",), **FAST)
    small = bench_model(_linear(10, 10), (10,), batch_sizes=(1,), backends=("eager",), **FAST)
    assert 14 < big[0].peak_mem_mb < 60, big[0].peak_mem_mb
    assert small[0].peak_mem_mb < 4, small[0].peak_mem_mb


def test_bench_onnx_path_skips_eager(tmp_path):
    path = export_onnx(_linear(), tmp_path / "lin.onnx", (1, 4, 4)).path
    results = bench_model(path, (1, 4, 4), batch_sizes=(2,), **FAST)
    assert [r.backend for r in results] == ["ort"]
    assert results[0].params == 16 * 4 + 4  # counted from the ONNX initializers
    assert results[0].flops_per_image is None and results[0].model == "lin"


def test_bench_bad_requests():
    with pytest.raises(KDError, match="unknown backend"):
        bench_model(_linear(), (1, 4, 4), backends=("tvm",))
    with pytest.raises(KDError, match="no backend"):  # TensorRT never runs on a CPU
        bench_model(_linear(), (1, 4, 4), backends=("tensorrt",))
    with pytest.raises(KDError, match="input_shape"):
        bench_model(_linear())


def _result(model, backend, batch, img_per_s, mem, params, flops=None):
    lat = 1e3 * batch / img_per_s
    return BenchResult(model, backend, "cpu", batch, params, flops, img_per_s, lat, lat, mem)


def test_compare_summary_and_table():
    teacher = [
        _result("t", "eager", 64, 50.0, 400.0, 1200, 4e9),
        _result("t", "ort", 64, 100.0, 350.0, 1200, 4e9),
        _result("t", "ort", 1, 20.0, 300.0, 1200, 4e9),
    ]
    student = [
        _result("s", "eager", 64, 150.0, 120.0, 100, 2e8),
        _result("s", "ort", 64, 420.0, 100.0, 100, 2e8),
        _result("s", "ort", 1, 90.0, 90.0, 100, 2e8),
    ]
    md = compare(teacher, student)
    assert md.splitlines()[-1] == (
        "**student is 4.2x faster (batch 64, ort), 3.5x less memory, 12.0x fewer parameters, "
        "20.0x fewer FLOPs**"
    )
    assert "| ort | 1 | 4.50x | 3.33x |" in md
    assert "| t | ort | 64 | 1,200 | 4.000 | 100 |" in md
    with pytest.raises(KDError, match="share no"):
        compare(teacher, [_result("s", "compiled", 8, 1.0, 1.0, 1)])


def test_compare_reports_slower_and_unknown_memory():
    md = compare([_result("t", "ort", 8, 100.0, None, 10)], [_result("s", "ort", 8, 50.0, 5.0, 20)])
    assert md.splitlines()[-1] == (
        "**student is 2.0x slower (batch 8, ort), 2.0x more parameters**"  # memory unknown
    )


def test_plot_and_json(tmp_path):
    teacher = [_result("t", "eager", 1, 10.0, 40.0, 1000), _result("t", "ort", 1, 20.0, 30.0, 1000)]
    student = [_result("s", "eager", 1, 50.0, 4.0, 100), _result("s", "ort", 1, 90.0, 3.0, 100)]
    png = plot_comparison(teacher, student, tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json.dumps(results_to_json(teacher, student)))
    assert data["student"][1]["img_per_s"] == 90.0 and len(data["teacher"]) == 2


def test_cli_bench_json(tmp_path, capsys):
    from kdkit.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--teacher", "kdkit.models:fmnist_teacher"]
    argv += ["--student", "kdkit.models:fmnist_student", "--input-shape", "1", "28", "28"]
    argv += ["--batch-sizes", "2", "--repeats", "2", "--json", "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {r["backend"] for r in printed["student"]} == {"eager", "ort"}
    assert printed["teacher"][0]["params"] > 10 * printed["student"][0]["params"]
    assert "**student is" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 0
    assert json.loads((out / "bench.json").read_text()) == printed


def test_bench_checkpoint_uses_recorded_shape(tmp_path):
    from kdkit.models import fmnist_student
    from kdkit.train.checkpoint import save_checkpoint

    spec = {"factory": "kdkit.models:fmnist_student", "kwargs": {}}
    state = {"student": fmnist_student().state_dict(), "student_spec": spec}
    path = save_checkpoint(tmp_path / "s.pt", {**state, "input_shape": [1, 28, 28]})
    results = bench_model(path, batch_sizes=(2,), backends=("eager",), **FAST)
    n_params = sum(p.numel() for p in fmnist_student().parameters())
    assert results[0].model == "s" and results[0].params == n_params


def test_plot_title_is_the_callers_and_the_panels_keep_theirs(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    seen: dict[str, list[str]] = {"suptitle": [], "panels": []}
    real_suptitle, real_set_title = Figure.suptitle, Axes.set_title
    monkeypatch.setattr(
        Figure, "suptitle", lambda s, t, **kw: seen["suptitle"].append(t) or real_suptitle(s, t)
    )
    monkeypatch.setattr(
        Axes, "set_title", lambda s, t, **kw: seen["panels"].append(t) or real_set_title(s, t)
    )
    teacher = [_result("t", "eager", 1, 10.0, 40.0, 1000)]
    student = [_result("s", "eager", 1, 50.0, 4.0, 100)]
    plot_comparison(teacher, student, tmp_path / "a.png", title="resnet vs cnn")
    plot_comparison(teacher, student, tmp_path / "b.png")
    assert seen["suptitle"] == ["resnet vs cnn", "teacher vs student on cpu"]
    assert seen["panels"][:2] == ["throughput (img/s, log scale)", "peak memory (MB)"]


def test_the_single_module_names_still_import_from_kdkit_bench():
    import kdkit.bench
    from kdkit.bench import _Memory, _time_calls
    from kdkit.bench.memory import PeakMemory

    assert _Memory is PeakMemory and callable(_time_calls)
    for name in kdkit.bench._MOVED:
        assert getattr(kdkit.bench, name) is not None, name
    with pytest.raises(AttributeError):
        kdkit.bench._Memry  # noqa: B018


def test_each_comparison_writes_into_a_folder_of_its_own():
    from kdkit.cli._bench import default_out

    assert default_out("runs/r50-to-r18", None, None) == "runs/r50-to-r18/bench"
    assert default_out(None, "runs/demo/teacher.pt", "runs/demo/student.pt") == (
        "runs/bench/teacher-vs-student"
    )
    assert default_out(None, "kdkit:fmnist_teacher", "torchvision:resnet18") == (
        "runs/bench/fmnist_teacher-vs-resnet18"
    )
