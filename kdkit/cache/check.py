"""The fidelity gate: does the cache still say what the live teacher says?

Checksums prove the bytes are the ones precompute wrote; they cannot tell that the teacher
was retrained since, that the training run normalises differently, or that its views differ.
:func:`check` recomputes the live teacher on a probe of ``(index, view)`` pairs and compares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdkit.cache.cached_teacher import CachedTeacher, check_partners
from kdkit.cache.precompute import dataset_keys
from kdkit.cache.store import stat_json
from kdkit.data.views import MixPool, ViewSampler, prepare_input
from kdkit.errors import KDError
from kdkit.teachers.base import TopK
from kdkit.teachers.factory import make_teacher
from kdkit.teachers.fidelity import FidelityTally, kl_sum

__all__ = ["CacheCheckReport", "check", "check_partners"]

_CAUSES = (
    "likely causes: (1) a stale cache: the teacher changed after precompute (precompute "
    "again); (2) wrong normalisation: mean/std differ from the precompute's {norm}; "
    "(3) wrong views: the run's ViewSampler differs from the cache's {views}; (4) another "
    "dataset or order of samples"
)


@dataclass(frozen=True)
class CacheCheckReport:
    """Agreement between cached and live teacher outputs on ``n_probe`` (index, view) pairs.

    ``mean_kl`` is KL(live || cached) of the softmax at temperature 1, averaged over rows; for
    a top-k cache both sides are reduced to top-k the same way first, so it measures
    staleness, not truncation. ``max_abs_diff`` is over the stored values (logits).
    """

    n_probe: int
    top1_agreement: float
    mean_kl: float
    max_abs_diff: float

    def __str__(self) -> str:
        return (
            f"{self.n_probe} probes: top-1 agreement {self.top1_agreement:.2%}, "
            f"mean KL {self.mean_kl:.2e}, max |logit diff| {self.max_abs_diff:.3g}"
        )


def _probs(logits: torch.Tensor | TopK, num_classes: int) -> torch.Tensor:
    if isinstance(logits, TopK):
        from kdkit.losses import topk_to_probs

        return topk_to_probs(logits.values, logits.indices, num_classes, 1.0)
    return F.softmax(logits.float(), dim=1)


def _probe_images(dataset: Any, rows: np.ndarray) -> torch.Tensor:
    images = getattr(dataset, "images", None)
    if isinstance(images, (torch.Tensor, np.ndarray)) and len(images) == len(dataset):
        return torch.as_tensor(images[torch.as_tensor(rows)])
    return torch.stack([torch.as_tensor(dataset[int(r)][0]) for r in rows])


def check(
    out_dir: str | os.PathLike,
    teacher: Any,
    dataset: Any,
    n_probe: int = 256,
    views: ViewSampler | None = None,
    mean: Any = None,
    std: Any = None,
    max_disagreement: float = 0.01,
    max_kl: float = 0.01,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> CacheCheckReport:
    """Compare the cache in ``out_dir`` with the live ``teacher`` on a seeded probe.

    ``views``, ``mean`` and ``std`` default to the cache's own (from its meta); pass the
    training run's to test that the run and the cache agree. Raises :class:`KDError` listing
    likely causes when top-1 disagreement exceeds ``max_disagreement`` or mean KL exceeds
    ``max_kl`` (fp16 rounding alone gives ~1e-6; a bf16 teacher ~1e-3). Checksums are
    :func:`~kdkit.cache.verify`'s job, not this one's.
    """
    cached = CachedTeacher(out_dir, verify=False)
    meta = cached.meta
    if len(dataset) != cached.num_samples:
        raise KDError(f"the cache holds {cached.num_samples} samples, the dataset {len(dataset)}")
    norm = meta.get("normalization") or {}
    mean = norm.get("mean") if mean is None else mean
    std = norm.get("std") if std is None else std
    views = cached.views() if views is None else views
    t = make_teacher(teacher)
    if device is not None:
        t.to(device)
    in_device = torch.device(device) if device is not None else (t.device or torch.device("cpu"))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(cached.num_samples, min(n_probe, cached.num_samples), replace=False))
    index = torch.from_numpy(dataset_keys(dataset)[rows])
    view = torch.from_numpy(rng.integers(0, cached.num_views, size=rows.size))
    pool = MixPool.from_dataset(dataset) if views is not None and views.mixes else None
    tally = FidelityTally()  # the comparison the int8 gate uses too
    for b in range(0, rows.size, 256):
        sl = slice(b, b + 256)
        x = prepare_input(
            _probe_images(dataset, rows[sl]),
            index[sl],
            view[sl],
            views,
            mean,
            std,
            in_device,
            pool,
        )
        live = t(x, index=index[sl], view=view[sl]).logits.float().cpu()
        stored = cached(x, index=index[sl], view=view[sl]).logits
        if isinstance(stored, TopK):
            values, indices = torch.topk(live, cached.topk, dim=1)
            live = TopK(values, indices)
            stored = TopK(stored.values.cpu(), stored.indices.cpu())
            p_live, p_cached = _probs(live, cached.num_classes), _probs(stored, cached.num_classes)
            tally.add(
                n=len(values),
                agree=float((indices[:, 0] == stored.indices[:, 0]).sum()),
                kl=kl_sum(p_live, p_cached),
                max_abs_diff=float((values - stored.values).abs().max()),
            )
        else:
            tally.add_logits(live, stored.cpu())
    r = tally.report()
    report = CacheCheckReport(r.n_probe, r.top1_agreement, r.mean_kl, r.max_abs_diff)
    if 1.0 - report.top1_agreement > max_disagreement or report.mean_kl > max_kl:
        causes = _CAUSES.format(norm=norm, views=meta["views"])
        run_views = None if views is None else views.config()
        if run_views != meta["views"]:
            causes = f"the views given differ from the cache's ({run_views}); " + causes
        run_norm = {"mean": stat_json(mean), "std": stat_json(std)}
        if run_norm != norm:
            causes = f"the normalisation given differs from the cache's ({run_norm}); " + causes
        raise KDError(
            f"cache {out_dir} disagrees with the live teacher: {report} (allowed: "
            f"{max_disagreement:.2%} disagreement, KL {max_kl:g}); {causes}"
        )
    return report
