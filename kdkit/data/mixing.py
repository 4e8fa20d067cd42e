"""Mixed views (mixup, CutMix): the partner pool, and blending a batch with its partners.

Partners are dataset samples looked up by index (see :mod:`kdkit.data.views` for why they are
keyed by ``(index, view)`` and not drawn from the batch); :func:`mix_images` blends, then
pastes the cut box, on the images' device.
"""

from __future__ import annotations

from typing import Any

import torch

from kdkit.errors import KDError

__all__ = ["MixPool", "mix_images"]


class MixPool:
    """The images partners are drawn from: a dataset's rows, looked up by sample index.

    ``keys`` (M,) int64 are the samples' dataset indices (unique) and ``images`` (M, C, H, W)
    their images in the same order. :attr:`pool` is ``keys`` sorted: the candidate partner
    indices :meth:`ViewSampler.sample` draws from, a function of the *set* of samples only,
    so a training run and a cache precompute over the same dataset draw the same partners
    whatever the row order. :meth:`fetch` returns the images of partner indices (on the
    device the images live on).
    """

    def __init__(self, images: torch.Tensor, keys: torch.Tensor) -> None:
        keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1).cpu()
        if images.shape[0] != keys.numel() or keys.numel() == 0:
            raise KDError(
                f"MixPool needs one index per image, got {keys.numel()} for {images.shape[0]}"
            )
        order = torch.argsort(keys)
        self.pool = keys[order]
        if bool((self.pool[1:] == self.pool[:-1]).any()):
            raise KDError("MixPool: sample indices repeat; partners need unique indices")
        self._order = order
        self.images = images

    @classmethod
    def from_dataset(cls, dataset: Any) -> MixPool:
        """The pool of an in-memory dataset (``.images``/``.labels`` tensors, optional
        ``.indices``, or a ``torch.utils.data.Subset`` of one), e.g. a FastLoader's."""
        from kdkit.data.arrays import dataset_tensors

        try:
            images, _, indices, rows = dataset_tensors(dataset)
        except KDError as err:
            raise KDError(
                "mixup/cutmix views fetch partner images by index, which needs an in-memory "
                f"training dataset (such as Fashion-MNIST or an ArrayDataset): {err}"
            ) from None
        if rows is not None:
            images, indices = images[rows], indices[rows]
        return cls(images, indices)

    def __len__(self) -> int:
        return int(self.pool.numel())

    def fetch(self, partner: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) of the samples with dataset indices ``partner`` (N,)."""
        idx = torch.as_tensor(partner, dtype=torch.int64).reshape(-1).cpu()
        pos = torch.searchsorted(self.pool, idx).clamp(max=len(self) - 1)
        if bool((self.pool[pos] != idx).any()):
            raise KDError("MixPool.fetch: partner indices outside the pool")
        rows = self._order[pos]
        return self.images[rows.to(self.images.device, non_blocking=True)]


def mix_images(x: torch.Tensor, views: Any, partner: torch.Tensor | None) -> torch.Tensor:
    if partner is None or partner.shape != x.shape:
        got = None if partner is None else tuple(partner.shape)
        raise KDError(f"mixed views need partner images of shape {tuple(x.shape)}, got {got}")
    n, _, h, w = x.shape
    # non_blocking: the views come from the host; a blocking copy would wait for the GPU
    partner = partner.to(device=x.device, dtype=x.dtype, non_blocking=True)
    blend = views.blend.to(device=x.device, dtype=x.dtype, non_blocking=True).reshape(n, 1, 1, 1)
    cut = views.cut.to(device=x.device, dtype=x.dtype, non_blocking=True)
    u = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
    v = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
    in_x = (u[None] >= cut[:, 0:1]) & (u[None] < cut[:, 2:3])  # (N, W)
    in_y = (v[None] >= cut[:, 1:2]) & (v[None] < cut[:, 3:4])  # (N, H)
    inside = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)  # (N, 1, H, W)
    mixed = blend * x + (1.0 - blend) * partner
    return torch.where(inside, partner, mixed)
