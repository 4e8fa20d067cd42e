"""Does this cache belong to this run: its dataset (in any order, or a subset of it), its
teacher and its views, each compared with the cache's meta. A mismatch is one
:class:`KDError` naming the field, what the cache has and what the run expects.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kdkit.cache.store import dataset_fingerprint, teacher_fingerprint
from kdkit.data.views import ViewSampler
from kdkit.errors import KDError

__all__ = [
    "VIEW_CONFIG_KEYS",
    "check_expectations",
    "check_run_dataset",
    "views_mismatch",
    "mismatch_error",
]

log = logging.getLogger(__name__)


def mismatch_error(field: str, have: Any, want: Any, hint: str) -> KDError:
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
            raise mismatch_error("dataset_fingerprint", want_fp, dataset, hint)
        return
    base = getattr(dataset, "base", dataset)
    candidates = [dataset] if base is dataset else [dataset, base]
    lengths = [len(d) for d in candidates]
    if meta["num_samples"] not in lengths:
        raise mismatch_error("num_samples", meta["num_samples"], len(dataset), hint)
    fps = [
        dataset_fingerprint(d)
        for d, n in zip(candidates, lengths, strict=True)
        if n == meta["num_samples"]
    ]
    if want_fp in fps:
        return
    ordered = _in_index_order(dataset) if len(dataset) == meta["num_samples"] else None
    if ordered is None or dataset_fingerprint(ordered) != want_fp:
        raise mismatch_error("dataset_fingerprint", want_fp, fps[0], hint)


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
        raise mismatch_error("num_samples", meta["num_samples"], len(dataset), _WRONG_DATA)


_WRONG_DATA = (
    "the cache was precomputed on another dataset or split than this run's training loader "
    "(config keys data.train, data.unlabeled, data.labeled and data.val.split decide it); "
    "precompute it on the training data (kdkit precompute CONFIG), or open the cache with "
    "CachedTeacher(DIR, dataset_check=False) if the data is the same in another form"
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
            raise mismatch_error("teacher_fingerprint", meta["teacher_fingerprint"], fp, stale)
    if expect_views is not None:
        want = expect_views.config() if isinstance(expect_views, ViewSampler) else expect_views
        want = None if want is False else want
        if want != meta["views"]:
            raise KDError(views_mismatch(meta["views"], want))


#: where a ViewSampler setting comes from in a ``kdkit train`` config
VIEW_CONFIG_KEYS = {
    "seed": "train.seed",
    "num_views": "data.views.num_views",
    "crop": "data.views.crop",
    "scale": "data.views.scale",
    "pad": "data.views.pad",
    "size": "data.image_size",
    "flip_p": "data.views.flip",
    "mixup": "data.views.mixup",
    "cutmix": "data.views.cutmix",
}


def views_mismatch(have: dict | None, want: dict | None) -> str:
    """One line naming the view settings where the run differs from the cache, and the
    config key that fixes each (or: precompute again with the run's config)."""
    if have is None or want is None:
        side = "without views (data.views: null)" if have is None else "with views"
        return (
            f"teacher cache mismatch in views: the cache was precomputed {side}, the run "
            f"{'has' if want else 'has no'} views; set data.views to match, or precompute "
            "again with this config (kdkit precompute CONFIG)"
        )
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    diffs = ", ".join(
        f"{k} (cache {have.get(k)!r}, run {want.get(k)!r}; config key "
        f"{VIEW_CONFIG_KEYS.get(k, 'data.views.' + k)})"
        for k in keys
        if k not in ("type", "version")
    )
    return (
        f"teacher cache mismatch in views: {diffs or keys}; set those config keys to the "
        "cache's values, or precompute again with this config (kdkit precompute CONFIG)"
    )
