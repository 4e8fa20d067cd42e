"""A teacher that reads its answers from a precomputed cache instead of running a model.

Whether a cache belongs to a run is :mod:`kdkit.cache.match`; whether a mixing cache replays
the run's partners is :func:`check_partners` (here: the check needs no live teacher).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.cache.match import check_expectations, check_run_dataset, mismatch_error
from kdkit.cache.precompute import dataset_keys
from kdkit.cache.store import feature_key, open_index, open_shards, read_meta, views_mix
from kdkit.data.views import MixPool, ViewSampler
from kdkit.errors import KDError
from kdkit.teachers.base import Teacher, TeacherOutput, TopK

__all__ = ["CachedTeacher", "check_expectations", "check_partners", "check_run_dataset"]


class CachedTeacher(Teacher):
    """Teacher outputs looked up by ``(dataset index, view id)`` in a cache directory.

    ``cached(x, index=idx, view=view_ids)`` returns ``TeacherOutput(logits)`` with full
    float32 logits (N, C) or :class:`TopK` (float32 values, int64 indices, (N, k)), on
    ``device`` or else ``x``'s device; ``x`` itself is not read. ``view`` may be omitted for
    a one-view cache. Reads are vectorised: one fancy-indexed memmap read per shard touched.

    Opening checks the format version and, when given, the expected teacher, dataset
    (length and fingerprint) and view sampler (``False``: no views), naming the differing
    field; a subset of the cached dataset is accepted (its ``.base``). ``verify=True``
    (default) hashes every shard once on open: a sequential read of the whole cache (about
    1 s per GB per core), in exchange for refusing a corrupted shard before training starts;
    ``verify=False`` checks only sizes, shapes and dtypes. The Trainer asks
    :meth:`check_dataset` once whether its training data is the cache's (length and
    fingerprint, mixing partners); ``dataset_check=False`` skips that, for the same images in
    another form.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        expect_teacher: Any = None,
        expect_dataset: Any = None,
        expect_views: ViewSampler | dict | bool | None = None,
        device: torch.device | str | None = None,
        verify: bool = True,
        dataset_check: bool = True,
    ) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.dataset_check = dataset_check  # check_dataset: the run's data is the cache's
        self.meta = read_meta(self.cache_dir)
        check_expectations(self.meta, expect_teacher, expect_dataset, expect_views)
        shards = open_shards(self.cache_dir, self.meta, check_sha=verify)
        self._values = [s["values"] for s in shards]
        self._indices = [s.get("indices") for s in shards]
        self._partner = [s.get("partner") for s in shards]
        self._features = {
            name: [s[feature_key(name)] for s in shards] for name in self.meta.get("features") or {}
        }
        self._lam = [s.get("lam") for s in shards]
        self._stops = np.array([s["stop"] for s in self.meta["shards"]], dtype=np.int64)
        self._starts = np.array([s["start"] for s in self.meta["shards"]], dtype=np.int64)
        keys = open_index(self.cache_dir, self.meta, check_sha=verify)
        self._key_order = None if keys is None else np.argsort(keys, kind="stable")
        self._sorted_keys = None if keys is None else keys[self._key_order]
        self.device = None if device is None else torch.device(device)

    def check_dataset(self, dataset: Any, sampler: Any = None) -> None:
        """The run's training dataset is the one precomputed (length, and fingerprint where
        the dataset gives one), and a mixing cache's partners are the run's (the checks of
        :func:`kdkit.cache.run_check.check_cache_for_run` that need no live teacher)."""
        if dataset is None or not self.dataset_check:
            return
        check_run_dataset(self.meta, dataset)
        check_partners(self, sampler, dataset)

    def request_features(self, names) -> None:
        """Feature pairs replay the named teacher features the cache stores (format 4)."""
        wanted = tuple(n for n in dict.fromkeys(names) if n != "")
        missing = [n for n in wanted if n not in self._features]
        if missing:
            held = sorted(self._features) or "none"
            raise KDError(
                f"the teacher cache {self.cache_dir} holds no teacher feature {missing} (it "
                f"holds {held}); precompute it with those features (kdkit precompute CONFIG "
                "stores the teacher layers the config's distill.pairs name)"
            )
        self.feature_names = wanted

    def read_features(self, index: Any, view: Any = None) -> dict[str, np.ndarray]:
        """The stored features of the requested names, (N, *shape) each, as numpy."""
        idx, vid = self._rows(index, view)
        shard_of = np.searchsorted(self._stops, idx, side="right")
        out = {}
        for name in self.feature_names:
            arrays = self._features[name]
            values = np.empty((idx.size, *arrays[0].shape[2:]), arrays[0].dtype)
            for s in np.unique(shard_of):
                rows = np.flatnonzero(shard_of == s)
                values[rows] = arrays[s][idx[rows] - self._starts[s], vid[rows]]
            out[name] = values
        return out

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def num_views(self) -> int:
        return int(self.meta["num_views"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def topk(self) -> int | None:
        return self.meta["topk"]

    def views(self) -> ViewSampler | None:
        """The sampler the cache was precomputed with (``None``: no augmentation)."""
        cfg = self.meta["views"]
        return None if cfg is None else ViewSampler.from_config(cfg)

    def fingerprint(self) -> str:
        return str(self.meta["teacher_fingerprint"])

    def to(self, device: torch.device | str) -> CachedTeacher:
        self.device = torch.device(device)
        return self

    def _rows(self, index: Any, view: Any) -> tuple[np.ndarray, np.ndarray]:
        if index is None:
            raise KDError(
                "a CachedTeacher needs the dataset index of every row (index=...): a plain "
                "(x, y) loader does not carry it; wrap its dataset, "
                "DataLoader(kdkit.data.WithIndex(dataset), ...), so batches are (x, y, index)"
            )
        idx = torch.as_tensor(index).reshape(-1).to("cpu", torch.int64).numpy()
        if view is None:
            if self.num_views != 1:
                raise KDError(f"this cache holds {self.num_views} views per sample; pass view=")
            vid = np.zeros_like(idx)
        else:
            vid = torch.as_tensor(view).reshape(-1).to("cpu", torch.int64).numpy()
            vid = np.broadcast_to(vid, idx.shape) if vid.size == 1 else vid
        if vid.shape != idx.shape:
            raise KDError(f"view {vid.shape} and index {idx.shape} must have the same length")
        if self._sorted_keys is not None:
            idx = self._rows_of_keys(idx)
        elif idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise KDError(
                f"index out of range: [{idx.min()}, {idx.max()}] not within "
                f"[0, {self.num_samples}) samples of the cache"
            )
        if vid.size and (vid.min() < 0 or vid.max() >= self.num_views):
            raise KDError(
                f"view id out of range: [{vid.min()}, {vid.max()}] not within "
                f"[0, {self.num_views}) views of the cache"
            )
        return idx, vid

    def _rows_of_keys(self, idx: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._sorted_keys, idx).clip(max=self.num_samples - 1)
        missing = self._sorted_keys[pos] != idx
        if missing.any():
            raise KDError(
                f"sample indices {idx[missing][:5].tolist()} are not in the cache "
                f"(it holds {self.num_samples} samples of a subset)"
            )
        return self._key_order[pos]

    def read(self, index: Any, view: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw stored rows: values (N, C or k) and, for top-k, indices (N, k) as numpy."""
        idx, vid = self._rows(index, view)
        shard_of = np.searchsorted(self._stops, idx, side="right")
        values = np.empty((idx.size, self._values[0].shape[2]), self._values[0].dtype)
        indices = None
        if self.topk:
            indices = np.empty((idx.size, self.topk), self._indices[0].dtype)
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            local = idx[rows] - self._starts[s]
            values[rows] = self._values[s][local, vid[rows]]
            if indices is not None:
                indices[rows] = self._indices[s][local, vid[rows]]
        return values, indices

    @property
    def mixes(self) -> bool:
        """Whether the cache was precomputed on mixed views (and stores their partners)."""
        return views_mix(self.meta["views"])

    def read_mix(self, index: Any, view: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The stored partner (int64 (N,)) and share ``lam`` (float32 (N,)) of mixed views."""
        if not self.mixes:
            raise KDError(f"the cache in {self.cache_dir} was not precomputed on mixed views")
        idx, vid = self._rows(index, view)
        shard_of = np.searchsorted(self._stops, idx, side="right")
        partner = np.empty(idx.size, np.int64)
        lam = np.empty(idx.size, np.float32)
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            local = idx[rows] - self._starts[s]
            partner[rows] = self._partner[s][local, vid[rows]]
            lam[rows] = self._lam[s][local, vid[rows]]
        return partner, lam

    def forward(self, x, *, index=None, view=None) -> TeacherOutput:
        if isinstance(x, torch.Tensor) and index is not None and x.shape[0] != len(index):
            raise KDError(f"batch has {x.shape[0]} rows but index has {len(index)}")
        values, indices = self.read(index, view)
        device = self.device or (x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
        v = torch.from_numpy(values).to(device, non_blocking=True).float()
        features = {
            name: torch.from_numpy(f).to(device, non_blocking=True).float()
            for name, f in (self.read_features(index, view) if self.feature_names else {}).items()
        }
        if indices is None:
            return TeacherOutput(logits=v, features=features)
        i = torch.from_numpy(indices).to(device, non_blocking=True).long()
        return TeacherOutput(logits=TopK(values=v, indices=i), features=features)


def check_partners(
    cached: CachedTeacher, sampler: ViewSampler | None, dataset: Any, n_probe: int = 512
) -> None:
    """A mixing cache replays a run's mixed views only if the run draws the same partners.

    Partners come from the run's partner pool (its training dataset's sample indices), so a
    run on a subset of the cached dataset, or with another sampler, mixes other images than
    the cached teacher saw. Compares the stored partner and ``lam`` with ``sampler``'s on
    ``n_probe`` seeded (index, view) pairs of ``dataset``; :class:`KDError` on any difference.
    Nothing to check when neither the cache nor the sampler mixes.
    """
    run_mixes = sampler is not None and sampler.mixes
    if not cached.mixes and not run_mixes:
        return
    if cached.mixes != run_mixes:
        raise mismatch_error(
            "views (mixing)",
            cached.meta["views"],
            None if sampler is None else sampler.config(),
            "the student would see other images than the cached teacher did; precompute again",
        )
    keys = dataset_keys(dataset)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(keys.size, min(n_probe, keys.size), replace=False))
    index = torch.from_numpy(keys[rows])
    view = torch.from_numpy(rng.integers(0, cached.num_views, size=rows.size))
    stored_partner, stored_lam = cached.read_mix(index, view)
    pool = MixPool.from_dataset(dataset)
    mine = sampler.sample(index, view, pool)  # type: ignore[union-attr]
    same_partner = np.array_equal(mine.partner.numpy(), stored_partner)
    if not same_partner or not np.array_equal(mine.lam.numpy(), stored_lam):
        raise KDError(
            f"teacher cache {cached.cache_dir} stores other mixed views than this run draws "
            f"(partner {'ok' if same_partner else 'differs'}, lam differs or not): the run's "
            f"partner pool ({len(pool)} samples) or sampler is not the precompute's; train on "
            "the dataset the cache was precomputed on, or precompute again"
        )
