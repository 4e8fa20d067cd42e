"""Calibration inputs for an int8 teacher, drawn through the training input path.

Quantization ranges are only as good as the images they are measured on: a teacher trained on
normalised, augmented crops must be calibrated on normalised, augmented crops. So calibration
and probe images go through :func:`~kdkit.data.views.prepare_input`, the function the Trainer
and the cache precompute use, with the run's views (those of epoch 0) and normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from kdkit._io import sha256_bytes
from kdkit.data.views import prepare_input
from kdkit.errors import KDError

__all__ = [
    "Calibration",
    "CalibrationArrays",
    "as_calibration",
    "draw_calibration",
    "from_mapping",
    "input_shape_of",
]

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Calibration:
    """Where calibration and probe images come from, and how they become model input.

    ``data``: a dataset (items ``(image, label, index)`` or ``(image, ...)``, e.g. an
    :class:`~kdkit.data.ArrayDataset`), a loader of such batches, or an image tensor (N, C,
    H, W). uint8 images are scaled to [0, 1], float ones taken as already in [0, 1]; then
    ``views`` (a :class:`~kdkit.data.ViewSampler`, views of epoch 0) and ``mean``/``std``
    apply, exactly as in training. ``samples`` rows calibrate; ``probe`` other rows (from
    ``probe_data`` when given) feed the fidelity gate. ``method``: ORT's range estimator.
    """

    data: Any
    samples: int = 512
    probe: int = 512
    probe_data: Any = None
    views: Any = None
    mean: Any = None
    std: Any = None
    seed: int = 0
    method: str = "minmax"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.data is None:
            raise KDError("Calibration needs data= (training images or a loader)")
        if self.samples < 1 or self.probe < 1 or self.batch_size < 1:
            raise KDError("Calibration needs samples, probe and batch_size >= 1")
        if self.method not in METHODS:
            raise KDError(f"calibration method must be one of {list(METHODS)}, got {self.method!r}")


def from_mapping(cls: type, obj: dict, what: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(obj) - names)
    if unknown:
        raise KDError(f"unknown {what} options {unknown}; known: {sorted(names)}")
    return cls(**obj)


def as_calibration(obj: Any) -> Calibration:
    """A :class:`Calibration` from itself, a dict of its fields, or bare data."""
    if isinstance(obj, Calibration):
        return obj
    if obj is None:
        raise KDError(
            "precision='int8' needs calibration=: training images (a dataset, loader or "
            "tensor) or kdkit.teachers.quantize.Calibration(data, views=, mean=, std=)"
        )
    if isinstance(obj, dict):
        return from_mapping(Calibration, obj, "calibration")
    return Calibration(obj)


@dataclass(frozen=True)
class CalibrationArrays:
    """Prepared float32 model inputs: ``calib`` (n, ...) and held-out ``probe`` (m, ...)."""

    calib: np.ndarray
    probe: np.ndarray

    def fingerprint(self) -> str:
        """sha256 of the calibration inputs' bytes and shape (covers data, views, norm)."""
        return sha256_bytes(str(self.calib.shape).encode() + self.calib.tobytes())


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return torch.as_tensor(batch[0]), (torch.as_tensor(batch[2]) if len(batch) >= 3 else None)
    raise KDError("calibration batches must be images or (images, labels, indices)")


def _take_loader(loader: Iterable, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start..start+count`` of a loader's stream, with their dataset indices."""
    xs, keys, seen = [], [], 0
    for batch in loader:
        x, idx = _unpack(batch)
        idx = torch.arange(seen, seen + len(x)) if idx is None else idx
        lo, hi = max(start - seen, 0), min(start + count - seen, len(x))
        if hi > lo:
            xs.append(x[lo:hi])
            keys.append(idx[lo:hi])
        seen += len(x)
        if seen >= start + count:
            break
    if not xs:
        raise KDError(f"the calibration loader yielded {seen} rows; {start + count} needed")
    return torch.cat(xs), torch.cat(keys)


def _rows(source: Any) -> int | None:
    """Number of rows of a dataset or tensor; ``None`` for a loader (its len counts batches)."""
    indexable = hasattr(source, "__len__") and hasattr(source, "__getitem__")
    return len(source) if indexable else None


def _take(source: Any, start: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` raw images from a seeded permutation of ``source`` (from ``start``) + keys;
    a loader gives the rows of its stream in order."""
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if _rows(source) is None:
        return _take_loader(source, start, count)
    n = len(source)
    rows = torch.from_numpy(np.random.default_rng(seed).permutation(n)[start : start + count])
    if isinstance(source, torch.Tensor):
        return source[rows], rows
    images, keys = getattr(source, "images", None), getattr(source, "indices", None)
    if isinstance(images, torch.Tensor) and len(images) == n:
        ok = isinstance(keys, torch.Tensor) and len(keys) == n
        return images[rows], (keys[rows] if ok else rows)
    items = [source[int(r)] for r in rows]
    xs = [_unpack(it)[0] if isinstance(it, (tuple, list)) else torch.as_tensor(it) for it in items]
    ks = [_unpack(it)[1] if isinstance(it, (tuple, list)) else None for it in items]
    keys = torch.tensor([int(r) if k is None else int(k) for r, k in zip(rows, ks, strict=True)])
    return torch.stack(xs), keys


def _prepare(
    cal: Calibration, images: torch.Tensor, keys: torch.Tensor, transform: Callable | None
) -> np.ndarray:
    out = []
    for b in range(0, len(images), 256):
        x, idx = images[b : b + 256], keys[b : b + 256].to(torch.int64)
        view_ids = cal.views.view_ids(idx, 0) if cal.views is not None else None
        x = prepare_input(x, idx, view_ids, cal.views, cal.mean, cal.std, "cpu")
        out.append(transform(x) if transform is not None else x)
    return np.ascontiguousarray(torch.cat(out).float().numpy())


def draw_calibration(cal: Calibration, transform: Callable | None = None) -> CalibrationArrays:
    """Calibration and probe inputs through the training input path (disjoint rows)."""
    size = _rows(cal.data)
    n_cal, n_probe = cal.samples, cal.probe
    if cal.probe_data is None and size is not None and size < n_cal + n_probe:
        n_probe = max(1, min(n_probe, size // 4))
        n_cal = size - n_probe
        if n_cal < 1:
            raise KDError(f"calibration data has {size} rows; at least 2 are needed")
        log.warning("calibration data has %d rows: %d calibrate, %d probe", size, n_cal, n_probe)
    calib = _prepare(cal, *_take(cal.data, 0, n_cal, cal.seed), transform)
    if cal.probe_data is None:
        probe_raw = _take(cal.data, n_cal, n_probe, cal.seed)
    else:
        probe_size = _rows(cal.probe_data) or n_probe
        probe_raw = _take(cal.probe_data, 0, min(n_probe, probe_size), cal.seed + 1)
    return CalibrationArrays(calib, _prepare(cal, *probe_raw, transform))


def input_shape_of(obj: Any, transform: Callable | None = None) -> tuple[int, ...]:
    """The model input shape ``(C, H, W)`` calibration data gives, after its views, norm and
    ``transform``: what a module teacher is exported with when no ``input_shape`` is given."""
    cal = as_calibration(obj)
    return tuple(_prepare(cal, *_take(cal.data, 0, 1, cal.seed), transform).shape[1:])
