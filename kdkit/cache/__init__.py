"""Augmentation-aware teacher cache: precompute once, replay the exact views in training.

``precompute(teacher, dataset, out_dir, views=ViewSampler(num_views=K))`` stores the teacher's
logits (full or top-k) for K views of every sample; ``CachedTeacher(out_dir, ...)`` serves
them by ``(index, view)`` through the Teacher protocol; ``verify`` checks the bytes and
``check`` the fidelity against the live teacher. Format: docs/cache-format.md.
"""

from kdkit.cache.cached_teacher import CachedTeacher
from kdkit.cache.check import CacheCheckReport, check
from kdkit.cache.precompute import precompute
from kdkit.cache.store import FORMAT_VERSION, read_meta, verify

__all__ = [
    "CachedTeacher",
    "CacheCheckReport",
    "FORMAT_VERSION",
    "check",
    "precompute",
    "read_meta",
    "verify",
]
