"""A teacher that reads its answers from a precomputed cache instead of running a model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.cache.store import (
    dataset_fingerprint,
    open_index,
    open_shards,
    read_meta,
    teacher_fingerprint,
    views_mix,
)
from kdkit.data.views import ViewSampler
from kdkit.errors import KDError
from kdkit.teachers.base import Teacher, TeacherOutput, TopK

__all__ = ["CachedTeacher", "check_expectations", "check_run_dataset", "check_partners"]


def _mismatch(field: str, have: Any, want: Any, hint: str) -> KDError:
    return KDError(
        f"teacher cache mismatch in {field}: cache has {have!r}, this run expects {want!r}; {hint}"
    )


def _in_index_order(dataset: Any) -> Any:
    """``dataset`` sorted by sample index, or ``None`` when it has no ``indices`` to sort by.

    A cache is keyed by sample index, so a reordering of the cached dataset (labeled rows
    first, then unlabeled: :func:`kdkit.data.concat`) replays the same rows; comparing the
    index-ordered copy with a cache precomputed in index order (a split, holdout or subset)
    accepts it without accepting other images."""
    indices = getattr(dataset, "indices", None)
    if not isinstance(indices, torch.Tensor) or not callable(getattr(dataset, "subset", None)):
        return None
    order = torch.argsort(indices)
    if torch.equal(order, torch.arange(len(order))):
        return None  # already in index order: the plain fingerprint said it all
    return dataset.subset(order)


def _check_dataset(meta: dict[str, Any], dataset: Any, hint: str) -> None:
    """The run's dataset must be the cached one (in any order, see :func:`_in_index_order`),
    or a subset whose ``.base`` is (the subset's items carry the base's indices, which the
    cache is keyed by)."""
    want_fp = meta["dataset_fingerprint"]
    if isinstance(dataset, str):
        if dataset != want_fp:
            raise _mismatch("dataset_fingerprint", want_fp, dataset, hint)
        return
    base = getattr(dataset, "base", dataset)
    candidates = [dataset] if base is dataset else [dataset, base]
    lengths = [len(d) for d in candidates]
    if meta["num_samples"] not in lengths:
        raise _mismatch("num_samples", meta["num_samples"], len(dataset), hint)
    fps = [
        dataset_fingerprint(d)
        for d, n in zip(candidates, lengths, strict=True)
        if n == meta["num_samples"]
    ]
    if want_fp in fps:
        return
    ordered = _in_index_order(dataset) if len(dataset) == meta["num_samples"] else None
    if ordered is None or dataset_fingerprint(ordered) != want_fp:
        raise _mismatch("dataset_fingerprint", want_fp, fps[0], hint)


def check_run_dataset(meta: dict[str, Any], dataset: Any) -> None:
    """The Trainer's default check: the loader's dataset (or its ``.base``) has the cache's
    length, and its fingerprint when it can give one cheaply (``dataset.fingerprint()``);
    datasets without one are checked by length (pass ``expect_dataset=`` for a full pass)."""
    base = getattr(dataset, "base", dataset)
    if callable(getattr(base, "fingerprint", None)) or callable(
        getattr(dataset, "fingerprint", None)
    ):
        _check_dataset(meta, dataset, _WRONG_DATA)
        return
    if meta["num_samples"] not in (len(dataset), len(base)):
        raise _mismatch("num_samples", meta["num_samples"], len(dataset), _WRONG_DATA)


_WRONG_DATA = (
    "the cache was precomputed on another dataset or split than this run's training loader; "
    "precompute it on the training data (or pass cache_dataset_check=False to the Trainer)"
)


def check_expectations(
    meta: dict[str, Any],
    expect_teacher: Any = None,
    expect_dataset: Any = None,
    expect_views: ViewSampler | dict | bool | None = None,
) -> None:
    """Raise :class:`KDError` naming the field where the cache differs from the run.

    ``None`` skips a check. ``expect_views=False`` asserts the cache was precomputed without
    views (a run without augmentation); a sampler or config dict must equal the cache's.
    """
    stale = "the cache is stale or belongs to another run: precompute it again"
    if expect_dataset is not None:
        _check_dataset(meta, expect_dataset, stale)
    if expect_teacher is not None:
        fp = teacher_fingerprint(expect_teacher)
        if fp != meta["teacher_fingerprint"]:
            raise _mismatch("teacher_fingerprint", meta["teacher_fingerprint"], fp, stale)
    if expect_views is not None:
        want = expect_views.config() if isinstance(expect_views, ViewSampler) else expect_views
        want = None if want is False else want
        if want != meta["views"]:
            raise _mismatch(
                "views",
                meta["views"],
                want,
                "the student would see other augmentations than the cached teacher did; "
                "use the cache's ViewSampler.from_config(meta['views']) or precompute again",
            )


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
    ``verify=False`` checks only sizes, shapes and dtypes.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        expect_teacher: Any = None,
        expect_dataset: Any = None,
        expect_views: ViewSampler | dict | bool | None = None,
        device: torch.device | str | None = None,
        verify: bool = True,
    ) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.meta = read_meta(self.cache_dir)
        check_expectations(self.meta, expect_teacher, expect_dataset, expect_views)
        shards = open_shards(self.cache_dir, self.meta, check_sha=verify)
        self._values = [s["values"] for s in shards]
        self._indices = [s.get("indices") for s in shards]
        self._partner = [s.get("partner") for s in shards]
        self._lam = [s.get("lam") for s in shards]
        self._stops = np.array([s["stop"] for s in self.meta["shards"]], dtype=np.int64)
        self._starts = np.array([s["start"] for s in self.meta["shards"]], dtype=np.int64)
        keys = open_index(self.cache_dir, self.meta, check_sha=verify)
        self._key_order = None if keys is None else np.argsort(keys, kind="stable")
        self._sorted_keys = None if keys is None else keys[self._key_order]
        self.device = None if device is None else torch.device(device)

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
            raise KDError("a CachedTeacher needs the dataset index of every row (index=...)")
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
        if indices is None:
            return TeacherOutput(logits=v)
        i = torch.from_numpy(indices).to(device, non_blocking=True).long()
        return TeacherOutput(logits=TopK(values=v, indices=i))


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
    from kdkit.cache.precompute import dataset_keys
    from kdkit.data.views import MixPool

    run_mixes = sampler is not None and sampler.mixes
    if not cached.mixes and not run_mixes:
        return
    if cached.mixes != run_mixes:
        raise _mismatch(
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
