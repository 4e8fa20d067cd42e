"""The GPU benchmark's synthetic data: photo-like JPEGs written once, decoded once, and
random batches of resident images; and a tiny CNN for the ``--small`` CPU check.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from kdkit.data import Batch
from kdkit.data.decode import ImageDecoder, read_image_bytes
from kdkit.errors import KDError

__all__ = ["decode_all", "make_jpeg_folder", "resident_batches", "tiny_cnn"]

log = logging.getLogger("bench_gpu_kd")


def tiny_cnn(widths: tuple[int, ...], classes: int) -> nn.Sequential:
    """Conv-BN-ReLU per width (stride 2 after the first), pooled, linear: ``--small``'s models."""
    layers: list[nn.Module] = []
    c_in = 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c_in, w, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(w)]
        layers.append(nn.ReLU())
        c_in = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))


def _jpeg(args: tuple[Path, int, int, int]) -> None:
    """One smooth synthetic photo-like JPEG (quality 90): blocks of colour, blurred, with noise,
    so it compresses like a photo (~100 KB at 500x375) rather than like white noise."""
    path, seed, w, h = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, "JPEG", quality=90)


def make_jpeg_folder(
    data_dir: str | os.PathLike, images: int, w: int, h: int, num_classes: int, workers: int
) -> Path:
    """``data_dir/train/cNN/*.jpg`` (+ one ``val`` image per class), reused when complete."""
    root = Path(data_dir)
    spec = {"images": images, "w": w, "h": h, "classes": num_classes}
    marker = root / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    jobs = []
    for i in range(images):
        folder = root / "train" / f"c{i % num_classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:06d}.jpg", i, w, h))
    for c in range(num_classes):
        (root / "val" / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        jobs.append((root / "val" / f"c{c:03d}" / "v.jpg", 10**7 + c, w, h))
    t0 = time.perf_counter()
    if workers > 1:
        with Pool(workers) as pool:
            pool.map(_jpeg, jobs, chunksize=64)
    else:
        for job in jobs:
            _jpeg(job)
    log.info("wrote %d JPEGs to %s in %.1f s", len(jobs), root, time.perf_counter() - t0)
    marker.write_text(json.dumps(spec))
    return root


def decode_all(samples: list[tuple[Path, int]], work_size: int, device: str) -> torch.Tensor:
    """Every training image at ``work_size``, uint8 on the CPU, in the loaders' order."""
    backend = "gpu" if device.startswith("cuda") else "cpu"
    decoder = ImageDecoder(work_size, backend=backend, device=device)
    out = []
    for b0 in range(0, len(samples), 256):
        chunk = decoder([read_image_bytes(p) for p, _ in samples[b0 : b0 + 256]])
        if chunk.failures:
            raise KDError(f"generated images failed to decode: {chunk.failures[:3]}")
        out.append(chunk.images.cpu())
    return torch.cat(out)


def resident_batches(images: torch.Tensor, labels: torch.Tensor, batch: int) -> Iterator[Batch]:
    """Random batches gathered from GPU-resident images; labels and indices stay on the host
    (as kdkit's loaders yield them: the trainer reads them without a device sync)."""
    g = torch.Generator().manual_seed(0)
    n = images.shape[0]
    while True:
        for idx in torch.randperm(n, generator=g).split(batch):
            if len(idx) == batch:
                yield Batch(images[idx.to(images.device, non_blocking=True)], labels[idx], idx)
