"""Teacher backends: parity on one batch, ONNX/TensorRT specifics, ensembles, the factory."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.export import export_onnx
from kdkit.teachers import (
    EnsembleTeacher,
    OnnxTeacher,
    TensorRTTeacher,
    TorchTeacher,
    make_teacher,
)
from kdkit.teachers.tensorrt_teacher import engine_cache_key, engine_cache_path

SHAPE = (1, 8, 8)
CLASSES = 4


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )


def _synthetic(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a fixed +-1 pattern plus noise: separable, not trivially so."""
    protos = torch.randn((CLASSES, *SHAPE), generator=torch.Generator().manual_seed(7)).sign()
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return protos[y] + 0.8 * torch.randn((n, *SHAPE), generator=gen), y


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread) -> nn.Module:
    """A tiny CNN trained 200 steps (under a second): confident, like a real teacher."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = _tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        x, y = _synthetic(64, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return _synthetic(512, torch.Generator().manual_seed(2))[0]


@pytest.fixture(scope="module")
def onnx_file(trained, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(trained, path, SHAPE)
    return str(path)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the largest reference logit."""
    return float((got.float() - ref).abs().max() / ref.abs().max())


def _check_low_precision(got: torch.Tensor, ref: torch.Tensor) -> None:
    agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
    kl = F.kl_div(
        got.float().log_softmax(1), ref.log_softmax(1), reduction="batchmean", log_target=True
    )
    assert agree >= 0.99, agree
    assert kl.item() < 1e-3, kl.item()


def test_trained_model_is_confident(trained, batch):
    y = _synthetic(512, torch.Generator().manual_seed(2))[1]
    assert (trained(batch).argmax(1) == y).float().mean() > 0.9


def _parity_backends():
    cpu = ["ort", "bf16", pytest.param("compiled", marks=pytest.mark.slow)]
    gpu = ["cuda_fp32", "cuda_bf16", "cuda_ort", "tensorrt_fp32", "tensorrt_fp16"]
    return cpu + [pytest.param(b, marks=pytest.mark.gpu) for b in gpu]


def _make(kind: str, model: nn.Module, onnx_path: str):
    """(teacher, device) for one backend; skips with the reason where it cannot run."""
    if kind == "ort":
        return OnnxTeacher(onnx_path, providers=["CPUExecutionProvider"]), "cpu"
    if kind == "bf16":
        return TorchTeacher(model, precision="bf16"), "cpu"
    if kind == "compiled":  # inductor's first compile takes ~15 s on a 2-core CPU: marked slow
        return TorchTeacher(model, compile=True), "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import copy

    if kind == "cuda_fp32":
        return TorchTeacher(copy.deepcopy(model).cuda()), "cuda"
    if kind == "cuda_bf16":
        return TorchTeacher(
            copy.deepcopy(model).cuda(), precision="bf16", channels_last=True
        ), "cuda"
    if kind == "cuda_ort":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            pytest.skip("onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        return OnnxTeacher(onnx_path), "cuda"
    pytest.importorskip("tensorrt", reason="TensorRT not installed (pip install kdkit[tensorrt])")
    precision = kind.split("_")[1]
    return TensorRTTeacher(onnx_path, precision=precision, max_batch=512, opt_batch=256), "cuda"


@pytest.mark.parametrize("kind", _parity_backends())
def test_backend_parity(kind, trained, batch, onnx_file):
    """The same batch through each backend agrees with eager fp32 (bf16/fp16: top-1 + KL)."""
    with torch.no_grad():
        ref = trained(batch)
    t, device = _make(kind, trained, onnx_file)
    out = t(batch.to(device)).logits
    assert out.dtype == torch.float32 and out.device.type == device
    assert out.shape == ref.shape
    if kind in ("bf16", "cuda_bf16", "tensorrt_fp16"):
        _check_low_precision(out.cpu(), ref)
    else:
        assert _rel_err(out.cpu(), ref) < 1e-4


def test_onnx_teacher_from_module_matches(trained, batch):
    t = OnnxTeacher(trained, input_shape=SHAPE)
    with torch.no_grad():
        assert _rel_err(t(batch[:3]).logits, trained(batch[:3])) < 1e-4


def test_onnx_teacher_module_needs_shape(trained):
    with pytest.raises(KDError, match="input_shape"):
        OnnxTeacher(trained)


def test_onnx_teacher_refuses_features(onnx_file):
    t = OnnxTeacher(onnx_file)
    t.request_features([""])  # the final output is always available
    with pytest.raises(KDError, match="only final outputs"):
        t.request_features(["0", "3"])


def test_onnx_teacher_corrupt_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(KDError, match="broken.onnx"):
        OnnxTeacher(bad)
    with pytest.raises(KDError, match="no ONNX file"):
        OnnxTeacher(tmp_path / "missing.onnx")


def test_onnx_fingerprint_is_file_sha256(onnx_file):
    with open(onnx_file, "rb") as f:
        assert OnnxTeacher(onnx_file).fingerprint() == hashlib.sha256(f.read()).hexdigest()


# -- ensembles ------------------------------------------------------------------------------
class _Fixed(nn.Module):
    """Returns the same logits for every sample."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("z", torch.tensor(logits))

    def forward(self, x):
        return self.z.expand(x.shape[0], -1)


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_ensemble_mean_probs_matches_hand_computation():
    z1, z2 = [1.0, 2.0, 3.0], [3.0, 0.0, -1.0]
    t = EnsembleTeacher([_Fixed(z1), _Fixed(z2)], weights=[1, 3])
    out = t(torch.zeros(2, 5)).logits
    p1, p2 = _softmax(z1), _softmax(z2)
    expected = [math.log(0.25 * a + 0.75 * b) for a, b in zip(p1, p2, strict=True)]
    assert torch.allclose(out[0], torch.tensor(expected), atol=1e-6)
    # the log of the mean probability is a valid logit vector: softmax gives the mean back
    mean = [0.25 * a + 0.75 * b for a, b in zip(p1, p2, strict=True)]
    assert torch.allclose(out.softmax(-1)[1], torch.tensor(mean), atol=1e-6)


def test_ensemble_mean_logits_and_zero_weight():
    z1, z2 = [1.0, 2.0, 3.0], [3.0, 0.0, -1.0]
    t = EnsembleTeacher([_Fixed(z1), _Fixed(z2)], weights=[2, 2], combine="mean_logits")
    assert torch.allclose(t(torch.zeros(1, 1)).logits[0], torch.tensor([2.0, 1.0, 1.0]))
    only_first = EnsembleTeacher([_Fixed(z1), _Fixed(z2)], weights=[1, 0])
    assert torch.allclose(only_first(torch.zeros(1, 1)).logits[0], torch.tensor(z1).log_softmax(0))


def test_ensemble_bad_arguments():
    a, b = _Fixed([0.0, 1.0]), _Fixed([1.0, 0.0])
    with pytest.raises(KDError, match="2 teachers"):
        EnsembleTeacher([a, b], weights=[1.0])
    with pytest.raises(KDError, match=">= 0"):
        EnsembleTeacher([a, b], weights=[1.0, -1.0])
    with pytest.raises(KDError, match="combine"):
        EnsembleTeacher([a, b], combine="median")
    with pytest.raises(KDError, match="shape"):
        EnsembleTeacher([a, _Fixed([0.0, 1.0, 2.0])])(torch.zeros(1, 1))


def test_ensemble_of_mixed_backends(trained, onnx_file, batch):
    t = make_teacher([trained, onnx_file])
    assert isinstance(t, EnsembleTeacher)
    assert [type(m) for m in t.members] == [TorchTeacher, OnnxTeacher]
    with torch.no_grad():
        expected = trained(batch[:4]).log_softmax(-1)
    assert torch.allclose(t(batch[:4]).logits, expected, atol=1e-5)
    assert len(t.fingerprint()) == 64


# -- factory ----------------------------------------------------------------------------------
def test_factory_dispatch(trained, onnx_file, tmp_path):
    assert isinstance(make_teacher(trained), TorchTeacher)
    assert isinstance(make_teacher(onnx_file), OnnxTeacher)
    assert isinstance(make_teacher(trained, backend="onnx", input_shape=SHAPE), OnnxTeacher)
    existing = TorchTeacher(trained)
    assert make_teacher(existing) is existing
    with pytest.raises(KDError, match="suffix"):
        (tmp_path / "model.bin").write_bytes(b"x")
        make_teacher(tmp_path / "model.bin")
    with pytest.raises(KDError, match="no teacher file"):
        make_teacher(tmp_path / "absent.onnx")
    with pytest.raises(KDError, match="backend"):
        make_teacher(trained, backend="openvino")
    with pytest.raises(KDError, match="export_onnx"):
        make_teacher(trained, backend="tensorrt")


def test_factory_checkpoint_becomes_torch_teacher(tmp_path):
    from kdkit.models import fmnist_student
    from kdkit.train.checkpoint import save_checkpoint

    model = fmnist_student().eval()
    spec = {"factory": "kdkit.models:fmnist_student", "kwargs": {}}
    path = save_checkpoint(tmp_path / "s.pt", {"student": model.state_dict(), "student_spec": spec})
    t = make_teacher(path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(t(x).logits, model(x))


# -- TensorRT ---------------------------------------------------------------------------------
def _hide_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail


def test_tensorrt_missing_message(monkeypatch, onnx_file, tmp_path):
    _hide_tensorrt(monkeypatch)
    with pytest.raises(KDError, match=r"pip install kdkit\[tensorrt\]") as err:
        TensorRTTeacher(onnx_file)
    assert "NVIDIA GPU" in str(err.value)
    engine = tmp_path / "t.engine"
    engine.write_bytes(b"\0")
    with pytest.raises(KDError, match=r"kdkit\[tensorrt\]"):
        make_teacher(engine)
    with pytest.raises(KDError, match=r"kdkit\[tensorrt\]"):
        make_teacher(onnx_file, backend="tensorrt")


def test_engine_cache_key_and_path():
    base = ("ab" * 32, "10.3.0", "NVIDIA H100 80GB HBM3", "fp16", 1, 128, 256)
    path = engine_cache_path("/m/teacher.onnx", engine_cache_key(*base))
    assert path == engine_cache_path("/m/teacher.onnx", engine_cache_key(*base))
    assert path.parent.as_posix() == "/m" and path.suffix == ".engine"
    assert path.name.startswith("teacher.fp16.b1-128-256.")
    seen = {path}
    changes = ("cd" * 32, "10.4.0", "NVIDIA A100-SXM4-40GB", "bf16", 2, 64, 512)
    for i, value in enumerate(changes):
        key = list(base)
        key[i] = value
        seen.add(engine_cache_path("/m/teacher.onnx", engine_cache_key(*key)))
    assert len(seen) == 1 + len(changes)  # every field changes the file name


def test_engine_cache_files_are_checked_before_reuse(tmp_path):
    from kdkit.teachers._trt_engine import load_cached_engine, store_engine

    key = engine_cache_key("ab" * 32, "10.3.0", "gpu", "fp16", 1, 8, 16)
    path = engine_cache_path(tmp_path / "t.onnx", key)
    assert load_cached_engine(path, key) is None  # nothing cached yet
    store_engine(path, b"engine bytes", key)
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["bytes"] == 12 and sidecar["key"] == key
    assert load_cached_engine(path, key) == b"engine bytes"
    assert load_cached_engine(path, {**key, "precision": "bf16"}) is None  # another build
    path.write_bytes(b"engine bytez")  # torn or edited
    assert load_cached_engine(path, key) is None


@pytest.mark.gpu
def test_tensorrt_engine_cache_and_from_engine(trained, batch, onnx_file):
    pytest.importorskip("tensorrt", reason="TensorRT not installed (pip install kdkit[tensorrt])")
    first = TensorRTTeacher(onnx_file, precision="fp32", max_batch=64, opt_batch=32)
    assert first.engine_path.is_file()
    assert first.engine_path.with_name(first.engine_path.name + ".json").is_file()
    mtime = first.engine_path.stat().st_mtime_ns
    again = TensorRTTeacher(onnx_file, precision="fp32", max_batch=64, opt_batch=32)
    assert again.engine_path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    x = batch[:100].cuda()  # above max_batch: run in chunks
    with torch.no_grad():
        ref = trained(batch[:100])
    assert _rel_err(again(x).logits.cpu(), ref) < 1e-4
    loaded = make_teacher(first.engine_path)
    assert isinstance(loaded, TensorRTTeacher) and loaded.max_batch == 64
    assert _rel_err(loaded(x).logits.cpu(), ref) < 1e-4
    with pytest.raises(KDError, match="cuda"):
        loaded(batch[:2])


def test_import_kdkit_loads_no_optional_runtime():
    code = "import sys, kdkit; print([m for m in ('onnxruntime', 'tensorrt') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
