"""What the first GPU run would have hit (issue 24), checked on the CPU where it can be:
resume loads on the CPU, the compiled models warm up once, the teacher runs in its own
precision, and the step makes no host sync (the loaders: tests/test_loaders.py). The GPU-only
halves are marked ``gpu`` and skip without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import quadrant_net
from torch import nn

from kdkit import Distiller, SoftTargetKL, Trainer
from kdkit.data import ArrayDataset, FastLoader


def _blobs(n: int = 64, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        torch.randint(0, 255, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 4, (n,), generator=g),
    )


_net = quadrant_net


# -- 1. resume loads the checkpoint on the CPU ---------------------------------------------
def test_resume_loads_on_the_cpu_whatever_the_device(tmp_path):
    """A CUDA ``map_location`` would put the RNG states on the GPU, where ``.numpy()`` and
    ``torch.set_rng_state`` fail. The "meta" device stands in for the GPU: a resume that
    loaded onto ``trainer.device`` would fail the same way."""
    loader = FastLoader(_blobs(32), 16)
    first = Trainer(
        Distiller(_net(), _net(16), SoftTargetKL()),
        loader,
        epochs=1,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    first.fit()
    saved_rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in first.task.student.state_dict().items()}
    torch.manual_seed(123)  # a different RNG state, restored by the resume
    again = Trainer(
        Distiller(_net(), _net(16), SoftTargetKL()),
        loader,
        epochs=1,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    again.device = torch.device("meta")  # where a map_location=self.device would load
    assert again._resume(required=True)
    assert torch.equal(torch.get_rng_state(), saved_rng)
    for k, v in again.task.student.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, weights[k]), k
    assert again.step == first.step


# -- 3. a compiled model warms up once: the dry run is under training's autocast and shapes ----
@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with Dynamo's "eager" backend (no codegen: seconds on a CPU), and its
    graph counter cleared: ``unique_graphs`` counts every (re)compile."""
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))
    dynamo.reset()
    counters.clear()
    yield counters["stats"]
    dynamo.reset()


def test_compiled_teacher_and_student_compile_once_each(eager_compile):
    """The adapters' dry run (FeatureMSE's lazy projection) is the compiled models' first
    call: under the run's bf16 autocast, on a training batch, so training reuses its graphs.
    Graphs: the teacher once (its own autocast state, the same in the dry run and the steps),
    the student once in train mode and once in eval mode (dry run and validation)."""
    from kdkit import FeatureMSE
    from kdkit.teachers import TorchTeacher

    teacher = TorchTeacher(_net(16, classes=6), compile=True)
    task = Distiller(_net(), teacher, FeatureMSE())  # 4 -> 6 logits: a lazy Linear adapter
    task.student = torch.compile(task.student, dynamic=False)  # as the run builder does
    tr = Trainer(
        task,
        FastLoader(_blobs(48), 16, drop_last=True),
        FastLoader(_blobs(32, seed=1), 16, shuffle=False),
        precision="bf16",
        epochs=1,
        progress=False,
    )
    assert eager_compile["unique_graphs"] == 2  # the dry run: teacher + student (eval)
    tr.fit()
    assert eager_compile["unique_graphs"] == 3  # + the student's training graph, nothing else


def test_compiled_teacher_keeps_a_static_batch(eager_compile):
    """A partial batch compiles one more static graph instead of turning the batch dimension
    dynamic for every later call (slower kernels); one per batch size, each reused."""
    from kdkit.teachers import TorchTeacher

    teacher = TorchTeacher(_net(16), compile=True)
    for n in (8, 5, 7, 8, 5):
        teacher(torch.randn(n, 1, 8, 8))
    assert eager_compile["unique_graphs"] == 3


# -- 4. the teacher runs in the precision it was given -------------------------------------
def _record_dtype(module: nn.Module, seen: dict, name: str) -> None:
    def hook(mod, args, out):
        seen[name] = (out.dtype, torch.is_autocast_enabled("cpu"))

    module.register_forward_hook(hook)


def test_teacher_precision_under_the_trainers_bf16_autocast():
    """CPU autocast supports bfloat16: an fp32 teacher inside the Trainer's bf16 step still
    runs its convolutions in fp32 (autocast off around it), a bf16 teacher runs under
    autocast in bf16, and the student in the run's bf16."""
    from kdkit.teachers import TorchTeacher

    seen: dict = {}
    fp32_net = _net(16)
    fp32, bf16 = TorchTeacher(fp32_net), TorchTeacher(_net(16), "bf16")
    _record_dtype(fp32.module[0], seen, "fp32")
    _record_dtype(bf16.module[0], seen, "bf16")
    x = torch.randn(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32(x)
    assert seen["fp32"] == (torch.float32, False)
    assert torch.equal(out.logits, fp32_net(x))  # bit for bit the fp32 model
    bf16(x)  # no autocast around the call: the teacher turns it on for itself
    assert seen["bf16"] == (torch.bfloat16, True)

    student = _net()
    _record_dtype(student[0], seen, "student")
    tr = Trainer(Distiller(student, fp32, SoftTargetKL()), [], precision="bf16", progress=False)
    x, y = _blobs(8).images, _blobs(8).labels
    tr.train_step((x, y, torch.arange(8)))
    assert seen["fp32"] == (torch.float32, False) and seen["student"] == (torch.bfloat16, True)


# -- 5. no host sync in the step -----------------------------------------------------------
_SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}
_MOVES = {"to", "cuda", "copy_"}


class _SyncSpy(torch.overrides.TorchFunctionMode):
    """Records what would make the host wait for the GPU: a value read from a float tensor
    (the loss, logits: device-side on a GPU) and a copy to a device that is not
    ``non_blocking``. Host-side integer tensors (labels, indices) may be read: they are."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if self_t is not None and name in _SYNCS and self_t.is_floating_point():
            self.calls.append(f"{name} on a {self_t.dtype} tensor")
        if self_t is not None and name in _MOVES and not kwargs.get("non_blocking"):
            # a copy to a device; ``.to("cpu")`` is a host read of what the pipeline keeps on
            # the host (index, view ids), a no-op there
            targets = [a for a in (*args[1:], kwargs.get("device")) if a is not None]
            if any(isinstance(a, torch.device) or a in ("cuda", "meta") for a in targets):
                self.calls.append(f"blocking {name}({targets})")
        return func(*args, **kwargs)


def _views_trainer(device: str, teacher=None) -> Trainer:
    from kdkit.data import ViewSampler
    from kdkit.data.pipeline import InputPipeline

    return Trainer(
        Distiller(_net(), teacher if teacher is not None else _net(16), SoftTargetKL()),
        FastLoader(_blobs(64), 16),
        # SGD: AdamW reads its step count with .item(), a host tensor on CUDA too
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        inputs=InputPipeline(ViewSampler(size=8, num_views=2), (0.5,), (0.25,)),
        device=device,
        progress=False,
        nan_check_every=1000,
    )


def _cache(root: Path, device: str) -> Path:
    from kdkit.cache import precompute

    precompute(
        _net(16).to(device),
        _blobs(64),
        root / "cache",
        views=_views_trainer("cpu").inputs.sampler,
        batch_size=16,
        mean=(0.5,),
        std=(0.25,),
        device=device,
        progress=False,
    )
    return root / "cache"


def test_train_step_reads_no_device_value_and_copies_non_blocking(tmp_path):
    """The CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: every step of a
    distillation with device-side views, online and from the cache, reads no float value
    and copies to the device non-blocking."""
    from kdkit.cache import CachedTeacher

    cached = CachedTeacher(_cache(tmp_path, "cpu"))
    for teacher in (None, cached):
        tr = _views_trainer("cpu", teacher)
        batches = list(FastLoader(_blobs(64), 16))
        tr.train_step(batches[0])
        spy = _SyncSpy()
        with spy:
            for b in batches[1:]:
                tr.train_step(b)
        assert spy.calls == [], teacher


@pytest.mark.gpu
def test_train_step_makes_no_host_sync_on_cuda(tmp_path):
    """Online (TorchTeacher) and cached replay (CachedTeacher), views on the device, batches
    as the loaders yield them (images on the GPU, labels and indices on the host)."""
    from kdkit.cache import CachedTeacher

    data = _blobs(64)
    for teacher in (None, CachedTeacher(_cache(tmp_path, "cuda"), device="cuda")):
        tr = _views_trainer("cuda", teacher)
        batches = [(x.cuda(), y, i) for x, y, i in FastLoader(data, 16)]
        for b in batches[:2]:
            tr.train_step(b)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for b in batches[2:]:
                tr.train_step(b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
