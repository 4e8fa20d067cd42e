"""Labeled / unlabeled splits and validation hold-outs of an :class:`ArrayDataset`.

Distillation often uses a few labeled samples plus many unlabeled ones the teacher labels
softly. The unlabeled part has its labels replaced by -1 (not merely ignored), so a bug
downstream cannot leak them. Every split keeps the original dataset indices, which the
teacher cache and the view sampler key on.
"""

from __future__ import annotations

import torch

from kdkit.data.arrays import ArrayDataset
from kdkit.errors import KDError

__all__ = ["concat", "holdout", "split_labeled"]


def split_labeled(
    dataset: ArrayDataset, n_labeled: int, seed: int = 0, stratified: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split into ``(labeled, unlabeled)``: ``n_labeled`` samples keep their labels, the rest
    get label -1.

    Args:
        dataset: an :class:`ArrayDataset`; samples already labeled -1 always go to the
            unlabeled part.
        n_labeled: size of the labeled part.
        seed: the choice depends only on (dataset, n_labeled, seed, stratified).
        stratified: pick the same number per class (as close as class sizes allow) rather
            than uniformly at random.
    """
    chosen, rest = _choose(dataset, n_labeled, seed, stratified, what="n_labeled")
    return dataset.subset(chosen), dataset.subset(rest).without_labels()


def holdout(
    dataset: ArrayDataset, n_val: int, seed: int = 0, stratified: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
    """Carve ``(train, val)`` out of a training set, both with labels.

    Pick hyper-parameters on ``val`` and report on the test split once: tuning on test
    overstates accuracy.
    """
    chosen, rest = _choose(dataset, n_val, seed, stratified, what="n_val")
    return dataset.subset(rest), dataset.subset(chosen)


def concat(first: ArrayDataset, second: ArrayDataset) -> ArrayDataset:
    """One dataset holding ``first`` then ``second`` (e.g. labeled + unlabeled for one loader).

    Both must come from the same original dataset, so their indices share one index space.
    """
    if first.base is not second.base:
        raise KDError(
            "concat needs two parts of the same dataset (from split_labeled / holdout / "
            "subset); parts of different datasets would give two images the same index"
        )
    if first.images.shape[1:] != second.images.shape[1:]:
        raise KDError(
            f"cannot concatenate images of shape {tuple(first.images.shape[1:])} and "
            f"{tuple(second.images.shape[1:])}"
        )
    return ArrayDataset(
        torch.cat([first.images, second.images]),
        torch.cat([first.labels, second.labels]),
        first.classes if first.classes is not None else second.classes,
        indices=torch.cat([first.indices, second.indices]),
        base=first.base,
    )


def _choose(
    dataset: ArrayDataset, n: int, seed: int, stratified: bool, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(chosen, rest)``, each sorted; chosen only among labeled samples."""
    if not isinstance(dataset, ArrayDataset):
        raise KDError(f"expected an ArrayDataset; got {type(dataset).__name__}")
    labels = dataset.labels
    candidates = torch.nonzero(labels >= 0).flatten()
    if not 0 <= n <= len(candidates):
        raise KDError(
            f"{what}={n} but the dataset has {len(candidates)} labeled samples "
            f"(of {len(dataset)}); choose 0 <= {what} <= {len(candidates)}"
        )
    generator = torch.Generator().manual_seed(seed)
    if stratified:
        chosen = _stratified(labels, candidates, n, generator)
    else:
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:n]]
    mask = torch.zeros(len(dataset), dtype=torch.bool)
    mask[chosen] = True
    return torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()


def _stratified(
    labels: torch.Tensor, candidates: torch.Tensor, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` positions spread as evenly over classes as their sizes allow."""
    per_class = [candidates[labels[candidates] == c] for c in torch.unique(labels[candidates])]
    sizes = [len(p) for p in per_class]
    quota = [0] * len(per_class)
    remaining = n
    # Water-filling: visiting classes from smallest to largest, each takes an equal share of
    # what is left (or all it has). The last class takes the rest, so the quotas sum to n;
    # shuffling first decides at random which equal-sized classes get the rounding extras.
    shuffled = torch.randperm(len(sizes), generator=generator).tolist()
    for k, c in enumerate(sorted(shuffled, key=lambda c: sizes[c])):
        quota[c] = min(sizes[c], remaining // (len(sizes) - k))
        remaining -= quota[c]
    picks = [
        p[torch.randperm(len(p), generator=generator)[:q]]
        for p, q in zip(per_class, quota, strict=True)
    ]
    return torch.cat(picks) if picks else candidates[:0]
