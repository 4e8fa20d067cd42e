"""Per-sample augmentation views that the teacher cache and the trainer derive identically.

"Consistent teaching" (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient
and consistent", arXiv:2106.05237) needs the teacher's answer on exactly the augmented image
the student sees. A *view* is the small record of augmentation parameters for one sample (a
crop box and a horizontal flip). :class:`ViewSampler` derives it from ``(seed, view id,
sample index)`` with a counter-based integer hash (splitmix64 over int64 tensors), so a
precompute job and a training run compute the same views without storing any image, and
:func:`prepare_input` is the one function both use to turn a raw batch into model input.

View ids: with ``num_views=K`` a sample has K fixed views (what a cache stores) and
:meth:`ViewSampler.view_ids` cycles through them: view ``(epoch + offset(index)) % K``, where
``offset`` is a hashed per-sample phase, so any K consecutive epochs show every sample each of
its K views exactly once while a batch mixes view ids. With ``num_views=None`` the view id is
the epoch: fresh views every epoch (online function matching).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdkit.errors import KDError

__all__ = ["Views", "ViewSampler", "prepare_input", "splitmix64", "CROPS"]

CROPS = ("resized", "pad", "none")
_CONFIG_VERSION = 1


def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_OFFSET_STREAM = 0x5EED0FF5E7  # salt of the per-sample view-id phase


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (two's-complement wrap-around = uint64 math).

    Ref: Steele, Lea, Flood 2014, "Fast splittable pseudorandom number generators".
    """
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _uniform(key: torch.Tensor, counter: int) -> torch.Tensor:
    """Uniform float64 in [0, 1) from stream ``counter`` of each key (53 exact bits)."""
    return _shr(splitmix64(key + counter), 11).double() * (2.0**-53)


@dataclass(frozen=True)
class Views:
    """Augmentation parameters of N samples.

    ``box`` (N, 4) float32 is the crop ``(x0, y0, x1, y1)`` in units of the input image
    (``(0, 0, 1, 1)`` is the whole image; a box reaching past 0..1 reads zeros there, which is
    how pad-and-crop is expressed). ``flip`` (N,) bool mirrors the crop horizontally.
    """

    box: torch.Tensor
    flip: torch.Tensor

    def __len__(self) -> int:
        return int(self.box.shape[0])

    def to(self, device: torch.device | str) -> Views:
        return Views(self.box.to(device), self.flip.to(device))


def _pair(v: float | Sequence[float], name: str) -> tuple[float, float]:
    lo, hi = (float(v), float(v)) if isinstance(v, (int, float)) else map(float, v)
    if not lo <= hi:
        raise KDError(f"{name} must be (low, high) with low <= high, got {v!r}")
    return lo, hi


class ViewSampler:
    """Deterministic per-sample crops and flips, applied on the device.

    ``crop``: ``"resized"`` (random-resized crop: area fraction in ``scale``, aspect ratio in
    ``ratio``, both in units of the input's sides, which equals pixel units for square
    images; output ``size`` or the input size), ``"pad"`` (shift by an integer number of
    pixels in ``[-pad, pad]`` with zero fill, the CIFAR/Fashion-MNIST recipe; ``size`` is the
    input = output size in pixels and is required) or ``"none"``. ``flip_p`` is the
    probability of a horizontal flip. ``num_views`` fixes K views per sample (a cache's K);
    ``None`` draws a fresh view every epoch.

    Two samplers with equal :meth:`config` produce equal views on every device: the
    parameters are derived on the CPU in float64 and only the finished boxes are moved.
    """

    def __init__(
        self,
        seed: int = 0,
        num_views: int | None = None,
        *,
        crop: str = "resized",
        scale: float | Sequence[float] = (0.35, 1.0),
        ratio: float | Sequence[float] = (3 / 4, 4 / 3),
        pad: int = 0,
        size: int | Sequence[int] | None = None,
        flip_p: float = 0.5,
    ) -> None:
        if crop not in CROPS:
            raise KDError(f"crop must be one of {list(CROPS)}, got {crop!r}")
        if num_views is not None and int(num_views) < 1:
            raise KDError(f"num_views must be >= 1 or None, got {num_views}")
        if not 0.0 <= flip_p <= 1.0:
            raise KDError(f"flip_p must be in [0, 1], got {flip_p}")
        self.seed = int(seed)
        self.num_views = None if num_views is None else int(num_views)
        self.crop = crop
        self.scale = _pair(scale, "scale")
        self.ratio = _pair(ratio, "ratio")
        if not (0.0 < self.scale[0] and self.scale[1] <= 1.0 and self.ratio[0] > 0.0):
            raise KDError(f"need 0 < scale <= 1 and ratio > 0, got {scale!r}, {ratio!r}")
        self.pad = int(pad)
        if self.pad < 0:
            raise KDError(f"pad must be >= 0 pixels, got {pad}")
        if size is None:
            self.size: tuple[int, int] | None = None
        else:
            h, w = (size, size) if isinstance(size, int) else size
            self.size = (int(h), int(w))
        if crop == "pad" and self.size is None:
            raise KDError("crop='pad' needs size=(H, W) of the images, to shift by whole pixels")
        self.flip_p = float(flip_p)

    # -- description ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able description; equal configs give equal views (stored in cache meta)."""
        return {
            "type": "ViewSampler",
            "version": _CONFIG_VERSION,
            "seed": self.seed,
            "num_views": self.num_views,
            "crop": self.crop,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "pad": self.pad,
            "size": None if self.size is None else list(self.size),
            "flip_p": self.flip_p,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ViewSampler:
        """Rebuild a sampler from :meth:`config` (e.g. read back from a cache's meta.json)."""
        cfg = dict(config)
        if cfg.pop("type", "ViewSampler") != "ViewSampler":
            raise KDError(f"not a ViewSampler config: {config!r}")
        version = cfg.pop("version", _CONFIG_VERSION)
        if version != _CONFIG_VERSION:
            raise KDError(
                f"ViewSampler config version {version} is not supported "
                f"(this kdkit reads {_CONFIG_VERSION})"
            )
        return cls(**cfg)

    def __repr__(self) -> str:
        cfg = {k: v for k, v in self.config().items() if k not in ("type", "version")}
        return f"ViewSampler({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ViewSampler) and self.config() == other.config()

    __hash__ = None  # type: ignore[assignment]

    # -- deriving views -------------------------------------------------------------------
    def view_ids(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """View id (int64, like ``index``) each sample shows in ``epoch`` (see module doc)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        if self.num_views is None:
            return torch.full_like(index, int(epoch))
        seed_key = splitmix64(torch.tensor(self.seed ^ _OFFSET_STREAM, dtype=torch.int64))
        offset = torch.remainder(splitmix64(seed_key.to(index.device) ^ index), self.num_views)
        return torch.remainder(offset + int(epoch), self.num_views)

    def _keys(self, index: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        seed_key = splitmix64(torch.tensor(self.seed, dtype=torch.int64))
        return splitmix64(splitmix64(seed_key ^ view_ids) ^ index)

    def sample(self, index: torch.Tensor, view_ids: torch.Tensor | int) -> Views:
        """The views of samples ``index`` (N,) under ``view_ids`` (N,) or one id for all.

        Computed on the CPU (a few hundred integer ops per batch) and returned there;
        :meth:`apply` moves them to the images' device.
        """
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        ids = torch.as_tensor(view_ids, dtype=torch.int64).reshape(-1).cpu()
        if ids.numel() == 1:
            ids = ids.expand_as(index)
        if ids.shape != index.shape:
            raise KDError(f"view_ids {tuple(ids.shape)} must match index {tuple(index.shape)}")
        if self.num_views is not None and bool(((ids < 0) | (ids >= self.num_views)).any()):
            raise KDError(
                f"view ids must be in [0, {self.num_views}) for num_views={self.num_views}"
            )
        key = self._keys(index, ids)
        n = index.numel()
        box = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).repeat(n, 1)
        if self.crop == "resized":
            box = self._resized_boxes(key)
        elif self.crop == "pad":
            box = self._pad_boxes(key)
        flip = _uniform(key, 4) < self.flip_p
        return Views(box=box.float(), flip=flip)

    def _resized_boxes(self, key: torch.Tensor) -> torch.Tensor:
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * _uniform(key, 0)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * _uniform(key, 1))
        w = torch.sqrt(area * aspect).clamp(max=1.0)
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        x0 = (1.0 - w) * _uniform(key, 2)
        y0 = (1.0 - h) * _uniform(key, 3)
        return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)

    def _pad_boxes(self, key: torch.Tensor) -> torch.Tensor:
        h, w = self.size  # type: ignore[misc]
        span = 2 * self.pad + 1
        dx = torch.floor(_uniform(key, 2) * span) - self.pad
        dy = torch.floor(_uniform(key, 3) * span) - self.pad
        return torch.stack([dx / w, dy / h, 1.0 + dx / w, 1.0 + dy / h], dim=1)

    # -- applying -------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, views: Views) -> torch.Tensor:
        """Crop, resize and flip float images ``x`` (N, C, H, W) -> (N, C, H', W').

        One ``affine_grid`` + bilinear ``grid_sample`` for the whole batch on ``x``'s device
        (no antialiasing; zeros outside the image). Whole-pixel shifts and flips of an
        unresized crop land on pixel centres, so they copy pixels (up to float rounding).
        """
        if x.dim() != 4 or not x.is_floating_point():
            raise KDError(
                f"apply() needs float images (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        n, c, h, w = x.shape
        if len(views) != n:
            raise KDError(f"{len(views)} views for a batch of {n} images")
        if self.crop == "pad" and (h, w) != self.size:
            raise KDError(f"crop='pad' was configured for size {self.size}, got images {(h, w)}")
        out_h, out_w = self.size or (h, w)
        box = views.box.to(device=x.device, dtype=x.dtype)
        x0, y0, x1, y1 = box.unbind(1)
        sx = torch.where(views.flip.to(x.device), x0 - x1, x1 - x0)
        zero = torch.zeros_like(x0)
        # output coordinate u in [-1, 1] samples input coordinate s*u + t (grid units)
        theta = torch.stack(
            [
                torch.stack([sx, zero, x0 + x1 - 1.0], 1),
                torch.stack([zero, y1 - y0, y0 + y1 - 1.0], 1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _channel_stat(v: float | Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=x.dtype).to(x.device, non_blocking=True)
    return t.reshape(1, -1, 1, 1) if t.dim() == 1 else t


def prepare_input(
    images: torch.Tensor,
    index: torch.Tensor | None,
    view_ids: torch.Tensor | None,
    sampler: ViewSampler | None,
    mean: float | Sequence[float] | torch.Tensor | None,
    std: float | Sequence[float] | torch.Tensor | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """Raw batch -> model input; the single path shared by training and cache precompute.

    ``images`` (N, C, H, W) uint8 (scaled to [0, 1]) or float (taken as already in [0, 1])
    moves to ``device`` once; then the views of ``(index, view_ids)`` are applied when
    ``sampler`` is given, then ``(x - mean) / std`` per channel (``None``: skip that part).
    Returns float32 (N, C, H', W') on ``device``.
    """
    x = images.to(device, non_blocking=True) if device is not None else images
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if sampler is not None:
        if index is None or view_ids is None:
            raise KDError(
                "a ViewSampler needs the batch's sample index and view ids "
                "(view_ids = sampler.view_ids(index, epoch))"
            )
        x = sampler.apply(x, sampler.sample(index, view_ids))
    if mean is not None:
        x = x - _channel_stat(mean, x)
    if std is not None:
        x = x / _channel_stat(std, x)
    return x
