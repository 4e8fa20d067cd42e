"""ONNX export (verified), checkpoint -> student, and the ``kdkit export`` command."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.export import DEFAULT_OPSET, export_onnx, load_student
from kdkit.models import fmnist_student
from kdkit.train.checkpoint import save_checkpoint

SPEC = {"factory": "kdkit.models:fmnist_student", "kwargs": {}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _small() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def test_export_report_and_dynamic_batch(tmp_path):
    model = _small()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is exercised
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    report = export_onnx(model, tmp_path / "sub" / "m.onnx", (1, 6, 6))
    data = report.path.read_bytes()
    assert report.opset == DEFAULT_OPSET and report.exporter == "torchscript"
    assert report.size_bytes == len(data) and report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    assert report.verify_batch == 3 and report.input_shape == (1, 6, 6)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 6, 6)
    out = session.run(["logits"], {"input": x.numpy()})[0]
    model.eval()
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-5)
    props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert props["kdkit.format_version"] == "1" and len(props["kdkit.model_fingerprint"]) == 64
    assert not list(tmp_path.glob("sub/.*tmp"))  # the temporary file was renamed


def test_export_restores_train_flags(tmp_path):
    model = _small().train()
    model[3].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    export_onnx(model, tmp_path / "m.onnx", (1, 6, 6))
    assert [m.training for m in model.modules()] == before


class _Drifting(nn.Module):
    """Scales its input by how often it was called: the trace freezes one factor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * float(self.calls)


def test_export_refuses_unfaithful_graph(tmp_path):
    with pytest.raises(KDError, match="differs from PyTorch"):
        export_onnx(_Drifting(), tmp_path / "d.onnx", (4,))
    report = export_onnx(_Drifting(), tmp_path / "d2.onnx", (4,), verify=False)
    assert report.max_abs_diff is None


def test_export_bad_shape(tmp_path):
    with pytest.raises(KDError, match="without the batch axis"):
        export_onnx(_small(), tmp_path / "m.onnx", (0, 6, 6))


def _checkpoint(tmp_path, model, **extra):
    state = {"student": model.state_dict(), "student_spec": SPEC, "input_shape": [1, 28, 28]}
    return save_checkpoint(tmp_path / "best.pt", {**state, **extra})


def test_load_student_roundtrip(tmp_path):
    model = fmnist_student().eval()
    path = _checkpoint(tmp_path, model, epoch=4, rng={"torch": torch.get_rng_state()})
    rebuilt, meta = load_student(path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert not rebuilt.training
    assert meta["input_shape"] == [1, 28, 28] and meta["epoch"] == 4
    assert "student" not in meta and "rng" not in meta  # state, not metadata


def test_load_student_strips_compile_and_ddp_prefixes(tmp_path):
    model = fmnist_student().eval()
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "c.pt", {"student": state, "student_spec": SPEC})
    rebuilt, _ = load_student(path)
    assert torch.equal(rebuilt.fc.weight, model.fc.weight)


def test_load_student_errors(tmp_path):
    with pytest.raises(KDError, match="no checkpoint"):
        load_student(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(KDError, match="not a kdkit checkpoint"):
        load_student(tmp_path / "foreign.pt")
    model = fmnist_student()
    no_spec = save_checkpoint(tmp_path / "n.pt", {"student": model.state_dict()})
    with pytest.raises(KDError, match="student_spec"):
        load_student(no_spec)
    bad = save_checkpoint(
        tmp_path / "b.pt", {"student": model.state_dict(), "student_spec": {"factory": "nope:fn"}}
    )
    with pytest.raises(KDError, match="it would import 'nope'"):
        load_student(bad)
    with pytest.raises(KDError, match="cannot import 'nope'"):
        load_student(bad, trust_code=True)
    other = {"factory": "kdkit.models:fmnist_student", "kwargs": {"num_classes": 5}}
    wrong = save_checkpoint(
        tmp_path / "w.pt", {"student": model.state_dict(), "student_spec": other}
    )
    with pytest.raises(KDError, match="do not fit"):
        load_student(wrong)


def test_cli_export(tmp_path, capsys, caplog):
    from kdkit.cli import main

    path = _checkpoint(tmp_path, fmnist_student(), mean=[0.3], std=[0.35])
    out = tmp_path / "student.onnx"
    caplog.set_level("INFO", logger="kdkit")
    assert main(["export", str(path), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MiB" in printed and "max abs diff:" in printed
    assert printed.count("MiB") == 1 and "MiB" not in caplog.text  # the summary once
    assert "mean=[0.3]" in printed
    assert out.is_file()
    assert main(["export", str(tmp_path / "nope.pt"), "--onnx", str(out)]) == 2
    assert "kdkit: error: no checkpoint" in capsys.readouterr().err
