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


def _net(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, 4),
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
