"""The batched-decode data path (kdkit.data.decode / bytes_loader / prefetch) and the
deferred NaN check. CPU tests run everywhere; nvJPEG and stream tests are marked gpu."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from kdkit import Distiller, KDError, SoftTargetKL, Trainer
from kdkit.data import (
    DevicePrefetcher,
    EncodedImageDataset,
    FastLoader,
    ImageBytesLoader,
    ImageDecoder,
    ImageFolderManager,
    ViewSampler,
    prepare_input,
)
from kdkit.data.decode import decode_cpu, is_jpeg, jpeg_components, read_image_bytes
from kdkit.data.pipeline import InputPipeline
from kdkit.data.prefetch import move_images
from kdkit.train import load_checkpoint

CUDA = torch.device("cuda")


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """Blocky colour image: JPEG keeps it well, like a photo, unlike white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3))
    return np.kron(small, np.ones((4, 4, 1)))[:h, :w].astype(np.uint8)


def _encode(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _pil_rgb(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[tuple[Path, int]]:
    """12 images of 3 shapes and 5 encodings (baseline, progressive, grey and CMYK JPEG, PNG)."""
    root = tmp_path_factory.mktemp("imgs")
    out = []
    kinds = [
        ("jpg", {"quality": 90}),
        ("jpg", {"quality": 75, "progressive": True}),
        ("jpg", {"mode": "L"}),
        ("jpg", {"mode": "CMYK"}),
        ("png", {}),
    ]
    for i in range(12):
        h, w = [(30, 40), (40, 30), (36, 36)][i % 3]
        ext, kw = kinds[i % len(kinds)]
        path = root / f"{i:02d}.{ext}"
        path.write_bytes(_encode(_picture(h, w, i), "PNG" if ext == "png" else "JPEG", **kw))
        out.append((path, i % 3))
    return out


def test_cpu_decode_matches_pil(files):
    for path, _ in files:
        data = path.read_bytes()
        mine = decode_cpu(read_image_bytes(path))
        assert mine.dtype == torch.uint8 and mine.shape == _pil_rgb(data).shape
        # both are libjpeg-turbo here; allow the few levels JPEG decoders may differ by
        assert (mine.int() - _pil_rgb(data).int()).abs().max() <= 2, path.name
    assert is_jpeg(read_image_bytes(files[0][0]), complete=True)
    assert not is_jpeg(read_image_bytes(files[4][0]))  # the PNG
    # nvJPEG gets grey and YCbCr JPEGs only; CMYK goes to the CPU decoder
    components = [jpeg_components(read_image_bytes(p)) for p, _ in files[:5]]
    assert components == [3, 3, 1, 4, None]


def test_decoder_batches_match_pil_pipeline(files):
    data = [read_image_bytes(p) for p, _ in files]
    squash = ImageDecoder((24, 32), fit="squash")(data)
    assert squash.images.shape == (12, 3, 24, 32) and squash.keep == list(range(12))
    for row, (path, _) in enumerate(files):
        ref = ImageDecoder((24, 32)).fit_images(_pil_rgb(path.read_bytes())[None])[0]
        assert (squash.images[row].int() - ref.int()).abs().max() <= 2
    # evaluation fit vs ImageFolderManager's PIL eval transform (PIL resize vs torch resize)
    center = ImageDecoder(28, fit="center", crop_pct=0.875)(data)
    pil_eval = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(28), v2.PILToTensor()])
    for row, (path, _) in enumerate(files):
        with Image.open(path) as im:
            ref = pil_eval(im.convert("RGB"))
        diff = (center.images[row].float() - ref.float()).abs()
        assert diff.mean() < 1.0 and diff.max() <= 8, path.name


def test_views_identical_whichever_decoder(files):
    """Views depend on (seed, index, view id) only: pixels from another decoder (simulated by
    PIL decoding plus +-1 level of noise, nvJPEG's scale) give the same crops, and the
    model input moves by no more than the pixels did."""
    data = [read_image_bytes(p) for p, _ in files]
    tv = ImageDecoder(32)(data).images
    pil = torch.stack(
        [ImageDecoder(32).fit_images(_pil_rgb(p.read_bytes())[None])[0] for p, _ in files]
    )
    noise = torch.randint(-1, 2, pil.shape, generator=torch.Generator().manual_seed(0))
    other = (pil.int() + noise).clamp(0, 255).to(torch.uint8)
    sampler = ViewSampler(seed=3, num_views=4, size=(24, 24))
    index = torch.arange(len(files))
    ids = sampler.view_ids(index, epoch=5)
    a, b = sampler.sample(index, ids), sampler.sample(index, ids)
    assert torch.equal(a.box, b.box) and torch.equal(a.flip, b.flip)
    x_tv = prepare_input(tv, index, ids, sampler, None, None, "cpu")
    x_other = prepare_input(other, index, ids, sampler, None, None, "cpu")
    assert x_tv.shape == (12, 3, 24, 24)
    assert (x_tv - x_other).abs().max() <= 3.01 / 255  # decoder gap + 1 level of noise


def _bad_files(root: Path) -> list[Path]:
    good = _encode(_picture(30, 40, 99))
    bad = {
        "truncated.jpg": good[: len(good) // 2],
        "garbage.jpg": b"\xff\xd8\xff\xe0 not a jpeg at all" * 4,
        "empty.png": b"",
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return [root / name for name in bad] + [root / "vanished.jpg"]  # never written


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_files_are_skipped_and_counted(files, tmp_path, caplog, workers):
    samples = list(files) + [(p, 0) for p in _bad_files(tmp_path)]
    dataset = EncodedImageDataset(samples, ["a", "b", "c"])
    loader = ImageBytesLoader(dataset, ImageDecoder(16), batch_size=5, workers=workers)
    with caplog.at_level(logging.WARNING, logger="kdkit.data.bytes_loader"):
        seen = [i for batch in loader for i in batch.indices.tolist()]
        assert sorted(seen) == list(range(12)) and loader.skipped == 4
        for batch in loader:  # a second epoch counts again, but logs each file once
            assert batch.images.shape[1:] == (3, 16, 16) and batch.labels.dtype == torch.int64
    assert loader.skipped == 8
    per_file = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(per_file) == 3 and any("truncated.jpg" in m for m in per_file)  # first few
    assert loader.unreadable.count == 4 and "4 unreadable images" in loader.unreadable.summary()
    assert any("skipped 4 unreadable images" in r.getMessage() for r in caplog.records)
    with pytest.raises(KDError, match="truncated.jpg"):  # a cache needs every row
        loader.dataset[12]


def test_image_folder_manager_decode_cpu_trains(files, tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "val"):
        for path, label in files:
            (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            (root / split / f"c{label}" / path.name).write_bytes(path.read_bytes())
    man = ImageFolderManager(root, size=16, batch_size=4, workers=0, decode="cpu", device="cpu")
    x, y, idx = next(iter(man.train_loader))
    assert x.shape == (4, 3, 18, 18) and x.dtype == torch.uint8  # work size round(16/0.875)
    assert next(iter(man.val_loader)).images.shape == (4, 3, 16, 16)
    assert man.train_dataset.fingerprint() != man.val_dataset.fingerprint()
    student = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    tr = Trainer(
        Distiller(student, None),
        man.train_loader,
        man.val_loader,
        inputs=InputPipeline(ViewSampler(size=16), man.mean, man.std),
        progress=False,
        device="cpu",
    )
    row = tr.fit()[-1]
    assert row["step"] == 3 and "val_top1" in row


def test_prefetcher_on_cpu_is_a_pass_through():
    batches = [
        (torch.full((2, 3, 4, 4), i, dtype=torch.uint8), torch.tensor([i, -1])) for i in range(3)
    ]
    out = list(DevicePrefetcher(batches, "cpu"))
    assert len(out) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(out, batches, strict=True))
    assert len(DevicePrefetcher(batches, "cpu")) == 3
    batch = next(iter(FastLoader(_blobs(8), 4)))
    moved = move_images(batch, torch.device("cpu"))
    assert type(moved) is type(batch) and moved.labels is batch.labels  # labels stay put


# -- the deferred NaN check ----------------------------------------------------------------
class _NaNAfter(torch.nn.Module):
    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.calls > self.after else out


def _blobs(n=256):
    from kdkit.data import ArrayDataset

    g = torch.Generator().manual_seed(0)
    return ArrayDataset(
        torch.randint(0, 255, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 4, (n,), generator=g),
    )


def _net(width=8):
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * width, 4),
    )


@pytest.mark.parametrize("every", [1, 5])
def test_deferred_nan_check_stops_within_n_steps(tmp_path, every):
    student = _NaNAfter(_net(), after=10)  # 10 good steps (no lazy adapter, no dry run)
    d = Distiller(student, _net(16), SoftTargetKL())
    tr = Trainer(
        d,
        FastLoader(_blobs(), 32),  # 8 steps per epoch
        epochs=4,
        checkpoint_dir=tmp_path,
        checkpoint_every=3,
        progress=False,
        nan_check_every=every,
    )
    with pytest.raises(KDError) as err:
        tr.fit()
    msg = str(err.value)
    assert "epoch 1 step 10: output = nan" in msg and "student" in msg and "last.pt" in msg
    assert tr.step - 10 < every  # stopped within N steps of the bad one
    state = load_checkpoint(tmp_path / "last.pt")  # written at step 9, never after the NaN
    assert state["step"] == 9 and all(torch.isfinite(v).all() for v in state["student"].values())


def test_nan_check_every_is_validated():
    with pytest.raises(KDError, match="nan_check_every"):
        Trainer(
            Distiller(_net(), None), FastLoader(_blobs(32), 8), nan_check_every=-2, progress=False
        )


# -- GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_nvjpeg_matches_cpu_decode_and_views(files):
    data = [read_image_bytes(p) for p, _ in files]
    cpu = ImageDecoder(32)(data)
    gpu = ImageDecoder(32, backend="gpu", device=CUDA)(data)
    assert gpu.images.is_cuda and gpu.keep == cpu.keep == list(range(12))
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's at sharp colour edges
    diff = (gpu.images.cpu().float() - cpu.images.float()).abs()
    assert diff.mean() < 2.0 and diff.quantile(0.99) <= 32
    sampler = ViewSampler(seed=1, num_views=2, size=(24, 24))
    index = torch.arange(len(files))
    ids = sampler.view_ids(index, 0)
    x_cpu = prepare_input(cpu.images, index, ids, sampler, None, None, CUDA)
    x_gpu = prepare_input(gpu.images, index, ids, sampler, None, None, CUDA)
    assert (x_cpu - x_gpu).abs().mean() < 2.0 / 255


@pytest.mark.gpu
def test_gpu_loader_skips_corrupt_files(files, tmp_path):
    samples = list(files) + [(p, 0) for p in _bad_files(tmp_path)]
    dataset = EncodedImageDataset(samples, ["a", "b", "c"])
    loader = ImageBytesLoader(dataset, ImageDecoder(16, backend="gpu", device=CUDA), 5, workers=1)
    batches = list(loader)
    assert all(b.images.is_cuda and not b.labels.is_cuda for b in batches)
    assert sorted(i for b in batches for i in b.indices.tolist()) == list(range(12))
    assert loader.skipped == 4


@pytest.mark.gpu
def test_prefetcher_stages_on_a_side_stream():
    host = [torch.full((64, 3, 32, 32), i, dtype=torch.uint8).pin_memory() for i in range(4)]
    staged = DevicePrefetcher([(h, torch.zeros(64)) for h in host], CUDA)
    out = [(images.clone(), labels) for images, labels in staged]
    for i, (images, labels) in enumerate(out):
        assert images.is_cuda and not labels.is_cuda and int(images.float().mean()) == i


@pytest.mark.gpu
def test_image_folder_manager_decode_gpu_trains(files, tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "val"):
        for path, label in files:
            (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            (root / split / f"c{label}" / path.name).write_bytes(path.read_bytes())
    man = ImageFolderManager(root, size=16, batch_size=4, workers=1, decode="auto", device=CUDA)
    assert man.train_loader.decoder.backend == "gpu"
    student = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    tr = Trainer(
        Distiller(student, None),
        man.train_loader,
        man.val_loader,
        inputs=InputPipeline(ViewSampler(size=16), man.mean, man.std),
        progress=False,
        device=CUDA,
    )
    assert tr.fit()[-1]["step"] == 3


@pytest.mark.gpu
def test_train_step_makes_no_host_sync():  # the views' copies are non-blocking (issue 24)
    tr = Trainer(
        Distiller(_net(), _net(16), SoftTargetKL()),
        FastLoader(_blobs(64), 16),
        inputs=InputPipeline(ViewSampler(size=8)),
        device=CUDA,
        progress=False,
    )
    batches = [(x.to(CUDA), y, i) for x, y, i in FastLoader(_blobs(64), 16)]
    for b in batches[:2]:
        tr.train_step(b)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[2:]:
            tr.train_step(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_nan_flag_is_recorded_without_a_host_sync():
    from kdkit.train.trainer import StepOutput

    tr = Trainer(Distiller(_net(), None), FastLoader(_blobs(32), 8), device=CUDA, progress=False)
    assert tr.nan_guard.every == 50
    loss = torch.tensor(1.0, device=CUDA)
    out = StepOutput(loss, {"student": loss}, torch.zeros(2, 4, device=CUDA))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            tr.nan_guard.record(out.loss, out.components, 0, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad = StepOutput(loss * float("nan"), {"student": loss * float("nan")}, out.logits)
    tr.nan_guard.record(bad.loss, bad.components, 1, 0)
    with pytest.raises(KDError, match="student"):
        tr.nan_guard.check()
