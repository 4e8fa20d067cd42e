"""A generated "your own photos" folder: what a new user's dataset looks like.

JPEG and PNG mixed, grayscale and RGBA files among the RGB ones, a few broken files (a
truncated JPEG, an empty file, a text file named .jpg), and a flat folder of unlabeled
images at any depth. Images are small (36x40, learnable: the class tints one channel) so a
training step takes milliseconds. ``make_photos(root)`` returns the paths the tests use.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "fox")
BROKEN = ("truncated.jpg", "empty.png", "notes.jpg")  # the names of the broken files


@dataclass(frozen=True)
class Photos:
    root: Path
    train: Path  # train/<class>/*
    val: Path  # val/<class>/*
    wild: Path  # unlabeled, flat and nested
    broken: tuple[Path, ...]  # the broken files planted in train/ and wild/


def _pixels(rng: np.random.Generator, label: int) -> np.ndarray:
    pixels = rng.integers(0, 110, (36, 40, 3))
    pixels[..., label] += 140
    return pixels.astype(np.uint8)


def _save(pixels: np.ndarray, path: Path, mode: str) -> None:
    image = Image.fromarray(pixels)
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(200)
    if path.suffix == ".jpg" and image.mode == "RGBA":
        image = image.convert("RGB")
    image.save(path)


def _truncated_jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 3]


def make_photos(root: Path, n_train: int = 6, n_val: int = 3, broken: bool = True) -> Photos:
    """train/{cat,dog,fox}/ (n_train each), val/ (n_val each), wild/ (6, nested); with
    ``broken`` one truncated JPEG and one empty PNG in train/cat, a text file named .jpg in
    wild/."""
    rng = np.random.default_rng(0)
    modes = ("RGB", "L", "RGB", "RGBA")
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext = ".jpg" if i % 2 else ".png"
                _save(_pixels(rng, label), folder / f"{i}{ext}", modes[i % len(modes)])
    wild = root / "wild"
    (wild / "trip").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        where = wild if i < 3 else wild / "trip"
        _save(_pixels(rng, i % 3), where / f"w{i}.jpg", modes[i % len(modes)])
    planted: list[Path] = []
    if broken:
        cat = root / "train" / "cat"
        (cat / BROKEN[0]).write_bytes(_truncated_jpeg(_pixels(rng, 0)))
        (cat / BROKEN[1]).write_bytes(b"")
        (wild / BROKEN[2]).write_text("these are not pixels\n")
        planted = [cat / BROKEN[0], cat / BROKEN[1], wild / BROKEN[2]]
    return Photos(root, root / "train", root / "val", wild, tuple(planted))


def tiny_model(num_classes: int = 3) -> dict:
    """A model section small enough for seconds-long CLI tests (3-channel SmallCNN)."""
    return {
        "model": "kdkit:fmnist_student",
        "kwargs": {"num_classes": num_classes, "in_channels": 3},
    }
