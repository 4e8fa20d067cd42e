"""A tiny teacher cache for the cache tests (tests/test_cache*.py): 40 random 8x8 images of 12
classes, a one-conv teacher and three padded-crop views."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdkit.cache import precompute, read_meta
from kdkit.data.arrays import ArrayDataset
from kdkit.data.views import ViewSampler

N, SIZE, CLASSES = 40, 8, 12
MEAN, STD = (0.3,), (0.4,)


def tiny_dataset(n: int = N, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return ArrayDataset(images, torch.randint(0, CLASSES, (n,), generator=g))


def tiny_teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * SIZE * SIZE, CLASSES)
    ).eval()


def tiny_views(num_views: int = 3) -> ViewSampler:
    return ViewSampler(seed=4, num_views=num_views, crop="pad", pad=1, size=SIZE)


def make_cache(out: Path, **kwargs) -> Path:
    args = dict(views=tiny_views(), batch_size=8, shard_size=16, mean=MEAN, std=STD, progress=False)
    args.update(kwargs)
    return precompute(
        args.pop("teacher", tiny_teacher()), args.pop("dataset", tiny_dataset()), out, **args
    )


def shard_path(out: Path, i: int = 1) -> Path:
    return out / read_meta(out)["shards"][i]["files"]["values"]["file"]
