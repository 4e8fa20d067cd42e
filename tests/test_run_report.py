"""A run's report and logs: the teacher's size and precision whatever its backend, curves
with whole epochs, an LR panel and the val loss, epochs counted from 1 everywhere."""

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdkit
from kdkit.report import plot_run_curves, run_report_text
from kdkit.run.teacher_info import teacher_summary
from kdkit.train.metrics import MetricLog, epoch_line


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # 39 parameters


def test_teacher_summary_for_torch_onnx_and_cached_teachers(tmp_path):
    from kdkit.cache import CachedTeacher, precompute

    net = _net()
    assert teacher_summary(kdkit.make_teacher(net), "bf16") == ("39", "bf16")
    pytest.importorskip("onnxruntime")
    kdkit.export_onnx(net, tmp_path / "t.onnx", (3, 2, 2))
    onnx_teacher = kdkit.make_teacher(str(tmp_path / "t.onnx"))
    assert teacher_summary(onnx_teacher, "fp32") == ("39", "fp32, ONNX Runtime")
    data = TensorDataset(torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))
    cache = precompute(net, data, tmp_path / "cache", progress=False)
    params, precision = teacher_summary(CachedTeacher(cache), "fp32")
    assert params == "-" and precision.startswith("cached fp16 logits")


def test_curves_report_and_csv_count_epochs_from_one(tmp_path):
    rows = [
        {"epoch": e, "step": 2 * (e + 1), "loss_total": 1.0 / (e + 1), "epoch_time_s": 0.1,
         "img_per_s": 10.0, "lr": 0.1 * (e + 1), "val_top1": 50.0 + e, "val_top5": 90.0,
         "val_loss": 0.9}
        for e in range(2)
    ]  # fmt: skip
    assert plot_run_curves(rows, tmp_path / "curves.png", 60.0).stat().st_size > 0
    text = run_report_text("r", rows, [("student `x`", "39", "fp32", "51.00", "90.00")])
    assert "| model | params | precision |" in text and "| 1 | " in text and "| 2 | " in text
    assert epoch_line(rows[0], 2).startswith("epoch 1/2")
    log = MetricLog(tmp_path)
    for row in rows:
        log.append(row)
    log.close()
    assert [r["epoch"] for r in csv.DictReader((tmp_path / "metrics.csv").open())] == ["1", "2"]
    MetricLog(tmp_path, resume_epoch=1).close()  # resumed after one finished epoch
    assert [r["epoch"] for r in csv.DictReader((tmp_path / "metrics.csv").open())] == ["1"]
