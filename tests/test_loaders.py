"""The loaders on the GPU path (issue 24), checked on the CPU: they hold no reference cycle,
so a dropped loader is freed by refcount and stops its persistent workers at once; close()
stops them explicitly; byte batches travel as one buffer with offsets; a batch of mixed
image shapes is resized at once; a compiled run drops its partial last batch."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdkit.data import DevicePrefetcher, EncodedImageDataset, ImageBytesLoader, ImageDecoder
from kdkit.data.epoch_loader import EpochLoader


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

    # 9 images in batches of 5: 5 + 4, or the whole batch of 5 alone (a lone last sample
    # would be folded into the batch before: batches of 4 give 4 + 5 either way)
    assert (batches(5, False), batches(5, True)) == (2, 1)
    assert batches(16, True) == 1  # fewer images than a batch: kept, not an empty epoch


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
