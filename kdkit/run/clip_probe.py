"""Fitting a :class:`~kdkit.teachers.clip_teacher.ClipTeacher`'s linear probe with the Trainer.

The teacher's embeddings of the labeled images are computed once (:func:`embed`, held in
memory: the teacher cache of this job) and a ``Linear(D, C)`` head on the L2-normalised
embeddings is trained by kdkit's :class:`~kdkit.Trainer` (AdamW, cosine schedule), so it
shares the loop every student uses. On a zero-shot teacher the head starts at the zero-shot
weights. This lives above ``train/`` (it trains); the teacher itself only loads a probe file
(:mod:`kdkit.teachers.clip_probe`), so importing a teacher never loads the training stack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kdkit.data.arrays import FastLoader
from kdkit.data.views import prepare_input
from kdkit.distiller import Distiller
from kdkit.errors import KDError
from kdkit.teachers.clip_teacher import ClipTeacher
from kdkit.train.trainer import Trainer

__all__ = ["embed", "fit_probe"]

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(
    teacher: ClipTeacher, dataset: Any, *, batch_size: int = 256, mean=None, std=None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings (N, D), labels (N,))`` of every image of ``dataset`` (uint8 images,
    normalised with ``mean``/``std`` as the student's input is; None: ``preprocess``'s
    ``student_mean``/``student_std``). No augmentation: one view per image."""
    mean = getattr(teacher.preprocess, "student_mean", None) if mean is None else mean
    std = getattr(teacher.preprocess, "student_std", None) if std is None else std
    device = torch.device(device) if device is not None else teacher.device
    teacher.to(device)
    if isinstance(getattr(dataset, "images", None), torch.Tensor):
        loader = FastLoader(dataset, batch_size, shuffle=False)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    embs, labels = [], []
    for batch in loader:
        images, y = batch[0], batch[1]
        x = prepare_input(images, None, None, None, mean, std, device)
        embs.append(teacher.encode(x))
        labels.append(torch.as_tensor(y, dtype=torch.int64).cpu())
    if not embs:
        raise KDError("the dataset is empty")
    return torch.cat(embs), torch.cat(labels)


def fit_probe(
    teacher: ClipTeacher,
    labeled: Any,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    val: Any = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    """Fit ``teacher``'s linear head on its embeddings of the labeled rows of ``labeled``.

    Args:
        teacher: the ClipTeacher whose ``probe`` is replaced by the fitted head.
        labeled: a dataset of (uint8 image, label) rows; rows labeled -1 are left out.
        epochs: training epochs (>= 1).
        lr: AdamW learning rate (cosine-annealed per step).
        weight_decay: AdamW weight decay.
        batch_size: batch size for embedding and for training.
        mean: the student's input normalisation (None: ``preprocess``'s).
        std: likewise.
        val: a dataset to report ``val_top1`` on after each epoch.
        seed: the head's initialisation and the shuffling.
        device: where to embed and train (None: the teacher's device).

    Returns:
        The Trainer's history (``val_top1`` per epoch when ``val`` is given).
    """
    if epochs < 1:
        raise KDError(f"epochs must be >= 1, got {epochs}")
    emb, labels = embed(teacher, labeled, batch_size=batch_size, mean=mean, std=std, device=device)
    keep = labels >= 0
    if not bool(keep.any()):
        raise KDError("fit_probe needs labeled rows (label >= 0); every label is -1")
    if int(labels.max()) >= len(teacher.class_names):
        raise KDError(
            f"labels reach {int(labels.max())} but there are {len(teacher.class_names)} classes"
        )
    train = _Embeddings(F.normalize(emb[keep], dim=-1), labels[keep])
    val_loader = None
    if val is not None:
        v_emb, v_lab = embed(teacher, val, batch_size=batch_size, mean=mean, std=std, device=device)
        val_loader = FastLoader(_Embeddings(F.normalize(v_emb, dim=-1), v_lab), 4096, False)
    torch.manual_seed(seed)
    probe = _initial_probe(teacher, emb.shape[1]).to(emb.device)
    loader = FastLoader(train, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(loader)
    torch.manual_seed(seed)  # as the Trainer's older seed= keyword did, after the probe's init
    trainer = Trainer(
        Distiller(probe, None),
        loader,
        val_loader,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps),
        scheduler_interval="step",
        epochs=epochs,
        device=emb.device,
        progress=False,
    )
    history = trainer.fit()
    teacher.probe = probe.eval().requires_grad_(False)
    return history


def _initial_probe(teacher: ClipTeacher, dim: int) -> nn.Linear:
    probe = nn.Linear(dim, len(teacher.class_names))
    if teacher.class_weights is not None:  # start at the zero-shot classifier
        with torch.no_grad():
            probe.weight.copy_(teacher.logit_scale.cpu() * teacher.class_weights.cpu())
            probe.bias.zero_()
    return probe


class _Embeddings:
    """Cached embeddings in the shape FastLoader reads (``.images`` is (N, D) float)."""

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = embeddings, labels.to(embeddings.device)
