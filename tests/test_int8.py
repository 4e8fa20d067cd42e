"""int8 teachers: ONNX Runtime static quantization, its cache and its fidelity gate."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import kdkit
from kdkit.data import ArrayDataset, ViewSampler
from kdkit.errors import KDError
from kdkit.teachers.fidelity import FidelityTally, compare_logits
from kdkit.teachers.quantize import Calibration, FidelityGate

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SIZE, CLASSES = 12, 4
MEAN, STD = 0.3, 0.3


def _images(n: int, seed: int) -> ArrayDataset:
    """Separable classes: a bright 4x4 blob in one of four quadrants, on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.rand((n, 1, SIZE, SIZE), generator=g) * 90
    for q in range(CLASSES):
        rows = labels == q
        r0, c0 = 2 + 5 * (q // 2), 2 + 5 * (q % 2)
        x[rows, :, r0 : r0 + 3, c0 : c0 + 3] += 120 + 40 * torch.rand((int(rows.sum()), 1, 3, 3))
    return ArrayDataset(x.clamp(0, 255).to(torch.uint8), labels)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, CLASSES),
    )


@pytest.fixture(scope="module")
def trained(one_thread):
    """A small conv net trained for a few seconds; returns (model, train set, test set)."""
    torch.manual_seed(0)
    train, test = _images(768, seed=1), _images(512, seed=2)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_all = (train.images.float() / 255 - MEAN) / STD
    for _ in range(120):
        rows = torch.randint(0, len(train), (64,))
        loss = nn.functional.cross_entropy(model(x_all[rows]), train.labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_test = (test.images.float() / 255 - MEAN) / STD
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == test.labels).float().mean()
    assert acc > 0.9, f"the test net did not learn ({acc:.2%})"
    return model, train, test


@pytest.fixture
def onnx_file(trained, tmp_path):
    path = tmp_path / "teacher.onnx"
    kdkit.export_onnx(trained[0], path, (1, SIZE, SIZE))
    return path


def _calibration(data, **kw) -> Calibration:
    views = ViewSampler(seed=0, crop="pad", pad=1, size=SIZE)
    return Calibration(data, samples=128, probe=256, views=views, mean=MEAN, std=STD, **kw)


def _int8_files(path):
    return sorted(path.parent.glob(f"{path.stem}.int8-*.onnx"))


def test_fidelity_tally_values():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    same = compare_logits(ref, ref)
    assert same.top1_agreement == 1.0 and same.mean_kl == pytest.approx(0.0, abs=1e-7)
    flipped = compare_logits(ref, ref.flip(1), temperature=2.0)
    p, q = torch.softmax(ref / 2, 1), torch.softmax(ref.flip(1) / 2, 1)
    expected = float((p * (p.log() - q.log())).sum(1).mean())
    assert flipped.top1_agreement == 0.0
    assert flipped.mean_kl == pytest.approx(expected, rel=1e-5)
    assert flipped.max_abs_diff == pytest.approx(2.0)
    with pytest.raises(KDError, match="empty"):
        FidelityTally().report()


def test_int8_agrees_with_fp32_and_is_cached(trained, onnx_file):
    model, train, test = trained
    t = kdkit.make_teacher(
        onnx_file, backend="onnx", precision="int8", calibration=_calibration(train)
    )
    assert t.int8.built and t.path == t.int8.path and t.path.parent == onnx_file.parent
    assert t.fidelity.top1_agreement >= 0.98 and t.fidelity.n_probe == 256
    # through the teacher protocol, on held-out images prepared as the Trainer does
    x = kdkit.data.prepare_input(test.images, None, None, None, MEAN, STD, "cpu")
    with torch.no_grad():
        ref = model(x)
    report = compare_logits(ref, t(x).logits)
    assert report.top1_agreement >= 0.98, report
    nodes = onnx.load(str(t.path)).graph.node
    made_by = {out: n.op_type for n in nodes for out in n.output}
    conv = next(n for n in nodes if n.op_type == "Conv")
    gemm = next(n for n in nodes if n.op_type == "Gemm")
    assert made_by[conv.input[1]] == "DequantizeLinear"  # int8 weights
    assert made_by.get(gemm.input[1]) != "DequantizeLinear"  # the classifier stays fp32
    stamp = t.path.stat().st_mtime_ns
    again = kdkit.make_teacher(
        onnx_file, backend="onnx", precision="int8", calibration=_calibration(train)
    )
    assert not again.int8.built and again.path == t.path
    assert again.path.stat().st_mtime_ns == stamp and _int8_files(onnx_file) == [t.path]
    # another calibration set is another cache entry
    other = _calibration(train, seed=1)
    assert kdkit.make_teacher(onnx_file, precision="int8", calibration=other).int8.built
    assert len(_int8_files(onnx_file)) == 2


def test_corrupted_int8_file_is_refused_and_rebuilt(trained, onnx_file, caplog):
    cal = _calibration(trained[1])
    path = kdkit.make_teacher(onnx_file, precision="int8", calibration=cal).path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kdkit.teachers.quantize"):
        t = kdkit.make_teacher(onnx_file, precision="int8", calibration=cal)
    assert t.int8.built and "checksum mismatch" in caplog.text
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["sha256"] == kdkit._io.sha256_file(path)
    assert sidecar["key"]["fp32_sha256"] == kdkit._io.sha256_file(onnx_file)


def test_bad_calibration_is_caught_by_the_gate(trained, onnx_file):
    _, train, _ = trained
    flat = ArrayDataset(torch.full((256, 1, SIZE, SIZE), 40, dtype=torch.uint8), train.labels[:256])
    bad = _calibration(flat, probe_data=train)
    with pytest.raises(KDError, match=r"agreement .* mean KL .*(lower the threshold).*fp32"):
        kdkit.make_teacher(onnx_file, precision="int8", calibration=bad)
    # lowering the threshold is the documented way through; the cached file is reused
    t = kdkit.make_teacher(
        onnx_file, precision="int8", calibration=bad, gate={"min_agreement": 0.0}
    )
    assert not t.int8.built and t.fidelity.top1_agreement < 0.98


def test_module_teacher_is_exported_to_cache_dir(trained, tmp_path):
    model, train, _ = trained
    cal = {"data": train, "samples": 64, "probe": 128, "mean": MEAN, "std": STD}
    t = kdkit.make_teacher(
        model,
        precision="int8",
        calibration=cal,
        input_shape=(1, SIZE, SIZE),
        cache_dir=tmp_path,
        gate=FidelityGate(min_agreement=0.95, temperature=4),
    )
    assert type(t).__name__ == "OnnxTeacher" and t.path.parent == tmp_path
    assert t.fidelity.temperature == 4 and t.int8.fp32_path.is_file()
    # as the int8 issue wrote it: a bare dataset, the input shape taken from its images (not
    # normalized as the net was trained, so the gate is off: the shape is what is checked)
    bare = kdkit.make_teacher(
        model, backend="onnx", precision="int8", calibration=train, cache_dir=tmp_path / "b",
        gate={"min_agreement": 0.0},
    )  # fmt: skip
    dims = onnx.load(str(bare.int8.fp32_path)).graph.input[0].type.tensor_type.shape.dim
    assert bare.int8.built and [d.dim_value for d in dims[1:]] == [1, SIZE, SIZE]
    with pytest.raises(KDError, match="backend='onnx'"):
        kdkit.make_teacher(model, backend="torch", precision="int8", calibration=cal)
    with pytest.raises(KDError, match="needs calibration="):
        kdkit.make_teacher(model, precision="int8", input_shape=(1, SIZE, SIZE), cache_dir=tmp_path)
    with pytest.raises(KDError, match="unknown calibration options"):
        kdkit.make_teacher(
            model,
            precision="int8",
            calibration={"data": train, "sample": 3},
            input_shape=(1, SIZE, SIZE),
            cache_dir=tmp_path,
        )


def test_tensorrt_target_is_symmetric_int8(trained, onnx_file):
    """TensorRT supports only symmetric quantization: int8 zero points, all zero."""
    from onnx import numpy_helper

    from kdkit.teachers.calibration import draw_calibration
    from kdkit.teachers.onnx_teacher import import_onnxruntime, load_session
    from kdkit.teachers.quantize import int8_model

    cal = _calibration(trained[1])
    ort = import_onnxruntime()
    model = int8_model(
        onnx_file,
        draw_calibration(cal),
        cal,
        lambda p: load_session(p, ["CPUExecutionProvider"], ort),
        target="tensorrt",
    )
    assert ".int8-tensorrt." in model.path.name and model.key["target"] == "tensorrt"
    graph = onnx.load(str(model.path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    zero_points = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype.name == "int8" and not z.any() for z in zero_points)


def test_bench_has_an_int8_row():
    from kdkit.bench import bench_model

    rows = bench_model(
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(64, 3)),
        input_shape=(1, 6, 6),
        batch_sizes=[2],
        backends=["ort", "ort-int8"],
        repeats=1,
        warmup=0,
        threads=1,
    )
    assert [r.backend for r in rows] == ["ort", "ort-int8"] and rows[1].img_per_s > 0


@pytest.mark.gpu
def test_tensorrt_int8_passes_the_gate(trained, onnx_file):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    t = kdkit.make_teacher(
        onnx_file,
        backend="tensorrt",
        precision="int8",
        calibration=_calibration(trained[1]),
        max_batch=256,
    )
    assert t.precision == "int8" and t.fidelity.top1_agreement >= 0.98


def test_config_onnx_teacher_with_int8_is_quantized_and_gated(trained, onnx_file):
    """``teacher: {model: onnx:PATH, precision: int8, calibration: {...}}`` in kdkit train."""
    from kdkit.config.schema import CalibrationConfig, TeacherConfig
    from kdkit.run.models import build_teacher

    _, train, _ = trained
    views = ViewSampler(seed=0, crop="pad", pad=1, size=SIZE)
    common = dict(input_shape=(1, SIZE, SIZE), mean=(MEAN,), std=(STD,), views=views)
    tc = TeacherConfig(model=f"onnx:{onnx_file}", precision="int8",
                       calibration=CalibrationConfig(samples=128, min_agreement=0.9))  # fmt: skip
    t = build_teacher(tc, calibration=train, temperature=4.0, **common)
    assert t.int8 is not None and t.fidelity.top1_agreement >= 0.9
    assert t.fidelity.temperature == 4.0  # the gate's KL is at the run's temperature
    strict = TeacherConfig(model=f"onnx:{onnx_file}", precision="int8",
                           calibration=CalibrationConfig(samples=128, min_agreement=1.0))  # fmt: skip
    if t.fidelity.top1_agreement < 1.0:  # the config's threshold reaches the gate
        with pytest.raises(KDError, match="agreement"):
            build_teacher(strict, calibration=train, **common)


def test_a_students_refusal_names_the_student_and_the_clis_flag():
    """``kdkit export --int8`` refuses an int8 *student* (not "the fp32 teacher") and names the
    CLI's own way out (--min-agreement), not the Python options of a teacher."""
    import numpy as np

    from kdkit.teachers.quantize import FidelityGate, check_fidelity

    probe = np.random.default_rng(0).random((16, 5)).astype(np.float32)
    with pytest.raises(KDError) as err:
        check_fidelity(
            lambda x: torch.as_tensor(x),
            lambda x: -torch.as_tensor(x),
            probe,
            FidelityGate(min_agreement=0.99),
            "the int8 model student.onnx",
            role="student",
            options="lower the bar with --min-agreement",
        )
    assert "disagrees with the fp32 student" in str(err.value) and "gate=" not in str(err.value)
    assert "--min-agreement" in str(err.value)
