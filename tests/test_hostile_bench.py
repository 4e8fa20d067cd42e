"""Hostile inputs to ``kdkit bench`` and ``bench_model`` (issue 10): devices, counts, shapes,
model files and specs. Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import pytest
from _hostile import Case, cli_rows, judge_row, net, no_cuda, params, pwned

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench(fx, *extra, teacher=None, student=None):
    out = fx.root / "work" / "bench"
    return [
        "bench", "--teacher", str(teacher or fx.ckpt), "--student", str(student or fx.ckpt),
        "--batch-sizes", "1", "--repeats", "1", "--backends", "eager", "--out", str(out), *extra,
    ]  # fmt: skip


def _bench_threads(fx):
    from kdkit.bench import bench_model

    bench_model(net(), (1, 8, 8), batch_sizes=(1,), backends=("eager",), repeats=1, threads=-1)


def _bench_device(fx):
    from kdkit.bench import bench_model

    bench_model(net(), (1, 8, 8), batch_sizes=(1,), backends=("eager",), device="foo")


_ORT = ("--backends", "ort", "--input-shape", "1", "28", "28")

CLI: list[Case] = cli_rows([
    Case("bench-device-foo", lambda fx: _bench(fx, "--device", "foo"), "not a device"),
    Case("bench-threads-negative", lambda fx: _bench(fx, "--threads", "-1"), "--threads"),
    Case("bench-threads-zero", lambda fx: _bench(fx, "--threads", "0"), "--threads"),
    Case("bench-repeats-zero", lambda fx: _bench(fx, "--repeats", "0"), "--repeats"),
    Case("bench-batch-size-zero", lambda fx: _bench(fx, "--batch-sizes", "0"), "--batch-sizes"),
    Case("bench-input-shape-negative", lambda fx: _bench(fx, "--input-shape", "-1", "28", "28"), "input-shape"),
    Case("bench-out-in-proc", lambda fx: _bench(fx, "--out", "/proc/kdkit-nope"), "cannot write"),
    Case("bench-out-is-a-file", lambda fx: _bench(fx, "--out", fx.a_file), "is an existing file|not a directory"),
    Case("bench-teacher-missing", lambda fx: _bench(fx, teacher=fx.root / "nope.pt"), "no model file"),
    Case("bench-teacher-truncated-onnx", lambda fx: _bench(fx, *_ORT, teacher=fx.truncated_onnx), "ONNX"),
    Case("bench-teacher-corrupt-onnx", lambda fx: _bench(fx, *_ORT, teacher=fx.corrupt_onnx), "ONNX"),
    Case("bench-onnx-input-shape-mismatch", lambda fx: _bench(fx, "--backends", "ort", "--input-shape", "3", "32", "32", teacher=fx.onnx, student=fx.onnx), "does not run on input"),
    Case("bench-markdown-as-checkpoint", lambda fx: _bench(fx, teacher=fx.markdown), "not a readable checkpoint"),
    Case("bench-pwned-checkpoint", lambda fx: _bench(fx, teacher=fx.pwned), "would import 'subprocess'", post=pwned),
    Case("bench-python-spec-string", lambda fx: _bench(fx, teacher="python:os:getcwd"), "would import 'os'"),
    Case("bench-legacy-spec-string-untrusted", lambda fx: _bench(fx, teacher="os:getcwd"), "unknown model prefix|would import"),
    Case("bench-unknown-kdkit-model", lambda fx: _bench(fx, teacher="kdkit:nope"), "no model 'nope'"),
    Case("bench-bad-student-refused-before-teacher-runs", lambda fx: _bench(fx, student=fx.corrupt_onnx.with_suffix(".pt")), "no model file"),
    Case("bench-backend-foo", lambda fx: _bench(fx, "--backends", "foo"), "invalid choice"),
    no_cuda(Case("bench-device-cuda-without-gpu", lambda fx: _bench(fx, "--device", "cuda"), "CUDA")),
])  # fmt: skip

LIB: list[Case] = [
    Case("bench-threads-negative-lib", _bench_threads, "threads"),
    Case("bench-device-foo-lib", _bench_device, "not a device"),
]

CASES = CLI + LIB


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_bench(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
