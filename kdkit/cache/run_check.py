"""Does this cache belong to this run? The checks a run builder makes before training starts.

A cached teacher must have been precomputed on the run's training dataset (length, and
fingerprint when the dataset has one: a cache of the test split never trains a run on the
train split), draw the same mixing partners, and, when a live teacher is at hand, agree with it
on a probe of the run's own views and normalisation (the fidelity gate). The builders in
``kdkit/run/`` call :func:`check_cache_for_run`; the Trainer does not know caches exist.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kdkit.cache.cached_teacher import CachedTeacher
from kdkit.cache.check import check, check_partners
from kdkit.cache.match import check_run_dataset
from kdkit.errors import KDError

__all__ = ["check_cache_for_run"]

log = logging.getLogger(__name__)


def check_cache_for_run(
    teacher: Any,
    dataset: Any,
    *,
    sampler: Any = None,
    live_teacher: Any = None,
    n_probe: int = 64,
    mean: Any = None,
    std: Any = None,
    device: torch.device | str = "cpu",
    dataset_check: bool = True,
) -> None:
    """Refuse a cache that does not fit the run (see the module docstring); a no-op for any
    other teacher. ``live_teacher`` runs the fidelity gate on ``n_probe`` samples."""
    if not isinstance(teacher, CachedTeacher):
        if live_teacher is not None:
            raise KDError("cache_check_teacher= is for runs whose teacher is a CachedTeacher")
        return
    if dataset_check and dataset is not None:
        check_run_dataset(teacher.meta, dataset)
        check_partners(teacher, sampler, dataset)  # mixed views: the run's partners
    if live_teacher is None:
        return
    if dataset is None:
        raise KDError("the cache check needs a loader with a .dataset")
    # the cache was precomputed on this dataset (any order: check() looks rows up by sample
    # index) or on the dataset it is a subset of
    if len(dataset) != teacher.num_samples:
        dataset = getattr(dataset, "base", dataset)
    report = check(
        teacher.cache_dir,
        live_teacher,
        dataset,
        n_probe=n_probe,
        views=sampler,
        mean=mean,
        std=std,
        device=device,
    )
    log.info("cache check passed: %s", report)
