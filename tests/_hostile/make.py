"""Tiny models, data and ``kdkit train`` configs the rows are made of."""

from __future__ import annotations

from pathlib import Path

import torch
from _tiny import blob_tensors, quadrant_net
from torch import nn

STUDENT = {"factory": "kdkit.models:fmnist_student", "kwargs": {}}  # the legacy spec form
SIZE = 28
MEAN, STD = (0.5,), (0.25,)
CLASSES = ("cat", "dog")


def student() -> nn.Module:
    """kdkit's Fashion-MNIST student, seeded, in eval mode (what the checkpoints hold)."""
    from kdkit.models import fmnist_student

    torch.manual_seed(0)
    return fmnist_student().eval()


def dataset(n: int = 20, seed: int = 0):
    """``n`` random 1x28x28 uint8 images, 10 classes."""
    from kdkit.data import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (n, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ArrayDataset(images, labels)


def blobs(n: int = 64, classes: int = 4, seed: int = 0):
    """8x8 images whose class is the bright quadrant: learnable in a few steps."""
    from kdkit.data import ArrayDataset

    return ArrayDataset(*blob_tensors(n, classes, seed))


def net(width: int = 8, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return quadrant_net(width, classes)


def trainer(checkpoint_dir=None, student=None, teacher=None, optimizer=None, **kw):
    """A Trainer of :func:`net` on :func:`blobs` (one epoch, CPU). ``mean``/``std`` build its
    input pipeline; ``seed`` seeds torch just before the Trainer is made."""
    import kdkit
    from kdkit.data import FastLoader
    from kdkit.data.pipeline import InputPipeline

    student = student if student is not None else net()
    criterion = kw.pop("criterion", kdkit.SoftTargetKL(2.0) if teacher is not None else None)
    balancer = kw.pop("balancer", None)
    loader = kw.pop("loader", None)
    loader = loader if loader is not None else FastLoader(blobs(), 32, seed=0)
    inputs = InputPipeline(None, kw.pop("mean", None), kw.pop("std", None))
    seed = kw.pop("seed", None)
    d = kdkit.Distiller(student, teacher, criterion, balancer)
    if seed is not None:
        torch.manual_seed(seed)
    return kdkit.Trainer(
        d,
        loader,
        epochs=kw.pop("epochs", 1),
        checkpoint_dir=checkpoint_dir,
        optimizer=optimizer,
        device="cpu",
        progress=False,
        inputs=inputs,
        **kw,
    )


def image_tree(root: Path, n_train: int = 3, n_val: int = 2, size: int = 16) -> Path:
    """root/{train,val}/{cat,dog}/i.png: noise tinted by class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (size, size, 3))
                pixels[..., label] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def teacher_weights(path: Path, seed: int = 0) -> Path:
    from kdkit.models import fmnist_student

    torch.manual_seed(seed)
    torch.save(fmnist_student(num_classes=2, in_channels=3).state_dict(), path)
    return path


def run_config(tree: Path, weights: Path, **train) -> dict:
    """A config that trains in about a second on one CPU core."""
    model = {"model": "kdkit:fmnist_student", "kwargs": {"num_classes": 2, "in_channels": 3}}
    return {
        "name": "tiny",
        "teacher": {**model, "weights": str(weights)},
        "student": dict(model),
        "data": {
            "train": {"image_folder": str(tree / "train")},
            "val": {"image_folder": str(tree / "val")},
            "image_size": 16,
            "batch_size": 4,
            "workers": 0,
            "views": None,
        },
        "train": {"epochs": 1, "device": "cpu", "progress": False, **train},
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path
