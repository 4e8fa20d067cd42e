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

Mixing (mixup, CutMix): Beyer et al. mix *images* (not labels) and let the teacher label the
mixture, which only helps when the teacher sees exactly the student's mixture. The partner
of sample ``i`` under view ``v`` is therefore derived like the crop, from ``(seed, v, i)``:
``partner = pool[h % len(pool)]`` where ``h`` is a hash of that key and ``pool`` is the
sorted set of sample indices of the training dataset (:class:`MixPool`). It is *not* chosen
within the batch: batch composition depends on the shuffle, so a cache keyed by ``(i, v)``
could never replay a batch-mate mixture, while a partner fixed by ``(i, v)`` and the dataset
makes ``(i, v)`` name one mixed image, whose teacher output a cache can store. The cache also
stores the partner and weight it used, so a run on another pool (another dataset, a subset)
is caught instead of silently learning from other images' targets. The mixing weight
``lam`` ~ Beta(alpha, alpha) comes from the same key and is folded to ``max(lam, 1 - lam)``:
the sample itself always owns at least half of the pixels, so its hard label (when it has
one) stays the majority label. Mixing happens on the raw ``[0, 1]`` images before the crop:
the mixture is then cropped and flipped with the sample's own view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdkit.data._hash import OFFSET_STREAM as _OFFSET_STREAM
from kdkit.data._hash import beta_symmetric as _beta_symmetric
from kdkit.data._hash import splitmix64
from kdkit.data._hash import uniform as _uniform
from kdkit.data.mixing import MixPool, mix_images
from kdkit.data.pipeline import prepare_input
from kdkit.errors import KDError

__all__ = ["Views", "ViewSampler", "MixPool", "prepare_input", "splitmix64", "CROPS"]

# moved out of this module; still importable from here
_ = (MixPool, prepare_input)

CROPS = ("resized", "pad", "none")
#: version 2 adds ``mixup``/``cutmix``; a sampler that does not mix still writes version 1,
#: byte-for-byte what older kdkit wrote, so old caches' meta compares equal
_CONFIG_VERSION = 2
_READABLE_CONFIG_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Views:
    """Augmentation parameters of N samples.

    ``box`` (N, 4) float32 is the crop ``(x0, y0, x1, y1)`` in units of the input image
    (``(0, 0, 1, 1)`` is the whole image; a box reaching past 0..1 reads zeros there, which is
    how pad-and-crop is expressed). ``flip`` (N,) bool mirrors the crop horizontally.

    Mixing (``None`` when the sampler does not mix): ``partner`` (N,) int64 is the dataset
    index of the image mixed in, ``blend`` (N,) float32 the sample's weight in a mixup blend
    (1 for CutMix samples), ``cut`` (N, 4) float32 the box, in input units, where the
    partner's pixels replace the sample's (empty for mixup samples). ``lam`` is the sample's
    share of the mixture, ``blend * (1 - area(cut))``, in [0.5, 1].
    """

    box: torch.Tensor
    flip: torch.Tensor
    partner: torch.Tensor | None = None
    blend: torch.Tensor | None = None
    cut: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.box.shape[0])

    @property
    def mixed(self) -> bool:
        return self.partner is not None

    @property
    def lam(self) -> torch.Tensor | None:
        """The sample's own share of each mixed image (``None`` without mixing)."""
        if self.blend is None or self.cut is None:
            return None
        area = (self.cut[:, 2] - self.cut[:, 0]) * (self.cut[:, 3] - self.cut[:, 1])
        return self.blend * (1.0 - area)

    def to(self, device: torch.device | str) -> Views:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Views(
            self.box.to(device, non_blocking=True),
            self.flip.to(device, non_blocking=True),
            move(self.partner),
            move(self.blend),
            move(self.cut),
        )


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
        mixup: float = 0.0,
        cutmix: float = 0.0,
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
        for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
            if not (math.isfinite(float(alpha)) and float(alpha) >= 0.0):
                raise KDError(f"{name} is a Beta(alpha, alpha) alpha >= 0 (0: off), got {alpha}")
        self.mixup = float(mixup)
        self.cutmix = float(cutmix)

    @property
    def mixes(self) -> bool:
        """Whether views mix in a partner image (then sampling needs a :class:`MixPool`)."""
        return self.mixup > 0.0 or self.cutmix > 0.0

    # -- description ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able description; equal configs give equal views (stored in cache meta).

        A sampler that does not mix writes the version 1 description (no mixing keys), so
        caches precomputed before mixing existed still compare equal to it.
        """
        cfg: dict[str, Any] = {
            "type": "ViewSampler",
            "version": _CONFIG_VERSION if self.mixes else 1,
            "seed": self.seed,
            "num_views": self.num_views,
            "crop": self.crop,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "pad": self.pad,
            "size": None if self.size is None else list(self.size),
            "flip_p": self.flip_p,
        }
        if self.mixes:
            cfg["mixup"], cfg["cutmix"] = self.mixup, self.cutmix
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ViewSampler:
        """Rebuild a sampler from :meth:`config` (e.g. read back from a cache's meta.json)."""
        cfg = dict(config)
        if cfg.pop("type", "ViewSampler") != "ViewSampler":
            raise KDError(f"not a ViewSampler config: {config!r}")
        version = cfg.pop("version", _CONFIG_VERSION)
        if version not in _READABLE_CONFIG_VERSIONS:
            raise KDError(
                f"ViewSampler config version {version} is not supported "
                f"(this kdkit reads {list(_READABLE_CONFIG_VERSIONS)})"
            )
        if version == 1 and ({"mixup", "cutmix"} & set(cfg)):
            raise KDError(f"ViewSampler config version 1 has no mixing keys: {config!r}")
        try:
            return cls(**cfg)
        except TypeError as err:
            raise KDError(f"not a ViewSampler config ({err}): {config!r}") from None

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
        offset = torch.remainder(
            splitmix64(seed_key.to(index.device, non_blocking=True) ^ index), self.num_views
        )
        return torch.remainder(offset + int(epoch), self.num_views)

    def _keys(self, index: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        seed_key = splitmix64(torch.tensor(self.seed, dtype=torch.int64))
        return splitmix64(splitmix64(seed_key ^ view_ids) ^ index)

    def sample(
        self,
        index: torch.Tensor,
        view_ids: torch.Tensor | int,
        pool: MixPool | torch.Tensor | None = None,
    ) -> Views:
        """The views of samples ``index`` (N,) under ``view_ids`` (N,) or one id for all.

        ``pool``: the candidate partners when the sampler mixes, a :class:`MixPool` or a
        tensor of dataset indices (a set: its order does not matter). Computed on the CPU
        (a few hundred integer ops per batch) and returned there; :meth:`apply` moves them to
        the images' device.
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
        if not self.mixes:
            return Views(box=box.float(), flip=flip)
        if pool is None:
            raise KDError(
                "a mixing ViewSampler (mixup/cutmix) needs the partner pool: "
                "MixPool.from_dataset(training dataset)"
            )
        if isinstance(pool, MixPool):
            keys = pool.pool
        else:  # a set of indices: its order must not matter
            keys = torch.sort(torch.as_tensor(pool, dtype=torch.int64).reshape(-1).cpu()).values
        partner, blend, cut = self._mix(key, keys)
        return Views(box.float(), flip, partner, blend.float(), cut.float())

    def _mix(self, key: torch.Tensor, pool: torch.Tensor):
        n = key.numel()
        pos = torch.floor(_uniform(key, 9) * pool.numel()).long().clamp(max=pool.numel() - 1)
        partner = pool[pos]
        use_cut = torch.zeros(n, dtype=torch.bool)
        if self.cutmix > 0.0 and self.mixup > 0.0:
            use_cut = _uniform(key, 8) < 0.5
        elif self.cutmix > 0.0:
            use_cut = torch.ones(n, dtype=torch.bool)
        lam_mix = _beta_symmetric(key, self.mixup) if self.mixup > 0 else torch.ones(n).double()
        lam_cut = _beta_symmetric(key, self.cutmix) if self.cutmix > 0 else torch.ones(n).double()
        lam_mix = torch.maximum(lam_mix, 1.0 - lam_mix)
        lam_cut = torch.maximum(lam_cut, 1.0 - lam_cut)
        # CutMix box: a square (in input units) of area 1 - lam, centre uniform, clipped
        side = torch.sqrt(1.0 - lam_cut)
        cx, cy = _uniform(key, 10), _uniform(key, 11)
        cut = torch.stack(
            [
                (cx - side / 2).clamp(0.0, 1.0),
                (cy - side / 2).clamp(0.0, 1.0),
                (cx + side / 2).clamp(0.0, 1.0),
                (cy + side / 2).clamp(0.0, 1.0),
            ],
            dim=1,
        )
        cut = torch.where(use_cut[:, None], cut, torch.zeros_like(cut))
        blend = torch.where(use_cut, torch.ones_like(lam_mix), lam_mix)
        return partner, blend, cut

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
    def apply(
        self, x: torch.Tensor, views: Views, partner_images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(Mix,) crop, resize and flip float images ``x`` (N, C, H, W) -> (N, C, H', W').

        Mixed views first combine ``x`` with ``partner_images`` (the partners' images, same
        shape and scale) on ``x``'s device: the blend ``b*x + (1-b)*p``, then inside the cut
        box (pixel centres) the partner's pixels. Then one ``affine_grid`` + bilinear
        ``grid_sample`` for the whole batch (no antialiasing; zeros outside the image).
        Whole-pixel shifts and flips of an unresized crop land on pixel centres, so they copy
        pixels (up to float rounding).
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
        if views.mixed:
            x = mix_images(x, views, partner_images)
        out_h, out_w = self.size or (h, w)
        # non_blocking: a blocking host-to-device copy waits for the whole GPU queue
        box = views.box.to(device=x.device, dtype=x.dtype, non_blocking=True)
        x0, y0, x1, y1 = box.unbind(1)
        sx = torch.where(views.flip.to(x.device, non_blocking=True), x0 - x1, x1 - x0)
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
