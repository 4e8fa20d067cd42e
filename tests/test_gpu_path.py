"""What the first GPU run would have hit (issue 24), checked on the CPU where it can be:
resume loads on the CPU, loaders free themselves by refcount, the compiled models warm up
once, the teacher runs in its own precision, and the step makes no host sync. The GPU-only
halves are marked ``gpu`` and skip without CUDA."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from kdkit import Distiller, SoftTargetKL, Trainer
from kdkit.data import (
    ArrayDataset,
    DevicePrefetcher,
    EncodedImageDataset,
    FastLoader,
    ImageBytesLoader,
    ImageDecoder,
)
from kdkit.data.epoch_loader import EpochLoader


def _blobs(n: int = 64, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        torch.randint(0, 255, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 4, (n,), generator=g),
    )


def _net(width: int = 8, classes: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


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


# -- 2. loaders are freed by refcount, and close() stops their workers -----------------------
def _jpeg_files(root: Path, shapes=((20, 24), (24, 20), (18, 18)), per_shape: int = 3):
    """Small JPEGs of several shapes (mixed sizes, like a photo folder), labels 0..2."""
    rng = np.random.default_rng(0)
    out = []
    for s, (h, w) in enumerate(shapes):
        for k in range(per_shape):
            small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3))
            pixels = np.kron(small, np.ones((4, 4, 1)))[:h, :w].astype(np.uint8)
            path = root / f"{s}_{k}.jpg"
            Image.fromarray(pixels).save(path, "JPEG", quality=90)
            out.append((path, s))
    return out


class _Items(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 4, 4), i, dtype=torch.uint8), i % 4


def _workers(loader) -> list:
    return list(loader._loader._iterator._workers)


@pytest.fixture
def no_gc():
    """Only refcounting frees objects: what a reference cycle would keep alive stays alive."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _bytes_loader(tmp_path: Path) -> ImageBytesLoader:
    files = _jpeg_files(tmp_path)
    return ImageBytesLoader(
        EncodedImageDataset(files, ["a", "b", "c"]),
        ImageDecoder(16, backend="cpu"),
        4,
        shuffle=True,
        workers=2,
    )


def _epoch_loader(tmp_path: Path) -> EpochLoader:
    return EpochLoader(_Items(), 4, workers=2)


@pytest.mark.parametrize("make", [_bytes_loader, _epoch_loader], ids=["bytes", "epoch"])
def test_loader_is_freed_by_refcount_and_stops_its_workers(make, tmp_path, no_gc):
    loader = make(tmp_path)
    assert sum(len(b[0]) for b in loader) == (9 if make is _bytes_loader else 12)
    workers = _workers(loader)  # persistent: alive between epochs
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    ref = weakref.ref(loader)
    del loader
    assert ref() is None  # no cycle: freed by refcount, with the GC off
    assert not any(w.is_alive() for w in workers)  # and the workers were joined, not left


def test_close_stops_the_workers_and_a_new_pass_restarts_them(tmp_path, no_gc):
    with _bytes_loader(tmp_path) as loader:
        next(iter(loader))
        first = _workers(loader)
        loader.close()
        assert not any(w.is_alive() for w in first)
        assert sum(len(b.images) for b in loader) == 9  # new workers for the next pass
    assert loader._loader._iterator is None
    epoch = _epoch_loader(tmp_path)
    list(epoch)
    workers = _workers(epoch)
    epoch.close()
    assert not any(w.is_alive() for w in workers)
    assert len(list(epoch)) == 3
    epoch.close()


def test_prefetcher_holds_no_cycle(no_gc):
    batches = [(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))]
    prefetcher = DevicePrefetcher(batches, "cpu")
    assert len(list(prefetcher)) == 1
    ref = weakref.ref(prefetcher)
    del prefetcher
    assert ref() is None


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
    tr = Trainer(
        task,
        FastLoader(_blobs(48), 16, drop_last=True),
        FastLoader(_blobs(32, seed=1), 16, shuffle=False),
        precision="bf16",
        compile=True,
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


def test_compile_drops_the_partial_last_batch(tmp_path):
    """``kdkit train`` with ``train.compile`` builds its training loader with ``drop_last``
    (no partial batch to compile for), unless the data holds less than one batch."""
    from kdkit.config import load_config
    from kdkit.run.data import build_data

    for label in ("a", "b", "c"):
        (tmp_path / label).mkdir()
    for i, (path, label) in enumerate(_jpeg_files(tmp_path)):  # 9 images
        path.rename(tmp_path / "abc"[label] / f"{i}.jpg")

    def batches(batch_size: int, drop_last: bool) -> int:
        raw = {"train": {"image_folder": str(tmp_path)}, "batch_size": batch_size, "workers": 0}
        model = {"model": "torchvision:resnet18"}
        cfg = load_config(data={"teacher": model, "student": model, "data": raw}).data
        return len(build_data(cfg, seed=0, drop_last=drop_last).train_loader)

    assert (batches(4, False), batches(4, True)) == (3, 2)
    assert batches(16, True) == 1  # fewer images than a batch: kept, not an empty epoch


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

    return Trainer(
        Distiller(_net(), teacher if teacher is not None else _net(16), SoftTargetKL()),
        FastLoader(_blobs(64), 16),
        # SGD: AdamW reads its step count with .item(), a host tensor on CUDA too
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        views=ViewSampler(size=8, num_views=2),
        mean=(0.5,),
        std=(0.25,),
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


# -- 6. byte batches travel as one buffer; mixed sizes resize in one batch -----------------
def test_byte_batches_travel_as_one_buffer_with_offsets(tmp_path):
    from kdkit.data.bytes_loader import _Collate, _Finish, unpack_bytes
    from kdkit.data.decode import read_image_bytes

    files = _jpeg_files(tmp_path, per_shape=1)
    (tmp_path / "empty.jpg").write_bytes(b"")
    files.append((tmp_path / "empty.jpg", 0))
    dataset = EncodedImageDataset(files, ["a", "b", "c"])
    raw = _Collate(None)([dataset[i] for i in range(len(dataset))])
    assert raw.data.dim() == 1 and raw.offsets.tolist()[0] == 0 and len(raw.offsets) == 5
    parts = unpack_bytes(raw.data, raw.offsets)
    for part, (path, _) in zip(parts, files, strict=True):
        assert torch.equal(part, read_image_bytes(path))
        assert part.numel() == 0 or part.data_ptr() >= raw.data.data_ptr()  # views, no copy
    decoder = ImageDecoder(16, backend="cpu")
    batch = _Finish(decoder, dataset)(raw)
    direct = decoder([read_image_bytes(p) for p, _ in files[:3]])
    assert torch.equal(batch.images, direct.images)
    assert batch.indices.tolist() == [0, 1, 2]  # the empty file is skipped, not fatal


@pytest.mark.parametrize("fit", ["squash", "center"])
def test_mixed_sizes_resize_in_one_batch_like_torchvision(fit, monkeypatch):
    """The batched path (two matmuls, what a GPU decoder runs on a batch of mixed shapes)
    against torchvision's resize of each image alone; a small memory budget splits the
    batch into chunks without changing the result."""
    from kdkit.data import _resize

    g = torch.Generator().manual_seed(0)
    shapes = [(30, 40), (40, 30), (23, 57), (64, 64), (16, 16), (30, 40)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    decoder = ImageDecoder((20, 24), fit=fit, crop_pct=0.875)
    shorter = None if fit == "squash" else round(24 / 0.875)
    batched = _resize.resize_mixed(images, (20, 24), shorter=shorter)
    alone = torch.cat([decoder.fit_images(image[None]) for image in images])
    assert batched.shape == alone.shape == (6, 3, 20, 24) and batched.dtype == torch.uint8
    assert (batched.int() - alone.int()).abs().max() <= 1
    monkeypatch.setattr(_resize, "_BUDGET_BYTES", 3 * 64 * 64 * 4)  # one image per chunk
    assert torch.equal(_resize.resize_mixed(images, (20, 24), shorter=shorter), batched)
