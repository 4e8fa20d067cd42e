"""A DataLoader for map-style datasets whose batch order is a pure function of (seed, epoch).

:class:`~kdkit.data.FastLoader` does this for in-memory arrays; image folders are too large
for memory, so :class:`EpochLoader` gives them the same contract: ``set_epoch``, ``__len__``,
``iter_from(batch)`` to resume mid-epoch without decoding the skipped batches, and sharding
across DDP ranks. With deterministic per-image transforms (augmentation done on the device by
a :class:`~kdkit.data.ViewSampler`), a killed run resumes to the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from kdkit.data.arrays import _epoch_seed, lone_last_sample
from kdkit.errors import KDError

__all__ = ["EpochLoader"]


class _EpochBatches:
    """The batch sampler: this epoch's batches of positions, from ``start`` on."""

    def __init__(self, loader: EpochLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader) - self.loader._start

    def __iter__(self) -> Iterator[list[int]]:
        order = self.loader.epoch_order().tolist()
        bs, n_batches = self.loader.batch_size, len(self.loader)
        fold = lone_last_sample(len(order), bs, self.loader.shuffle) and not self.loader.drop_last
        for b in range(self.loader._start, n_batches):
            end = len(order) if fold and b == n_batches - 1 else (b + 1) * bs
            yield order[b * bs : end]  # a lone last sample joins the batch before


class EpochLoader:
    """Batches of ``dataset`` in an order that depends only on (seed, epoch).

    Args mirror :class:`~kdkit.data.FastLoader`; ``workers`` and ``collate_fn`` go to the
    underlying ``torch.utils.data.DataLoader`` (workers persist across epochs).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        *,
        workers: int = 0,
        collate_fn: Callable[[list], Any] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1 or workers < 0 or seed < 0:
            raise KDError(
                f"need batch_size >= 1, workers >= 0, seed >= 0; got {batch_size=}, "
                f"{workers=}, {seed=}"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise KDError(f"need 0 <= rank < num_replicas; got rank={rank}, {num_replicas=}")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch, self._start, self._n = 0, 0, len(dataset)  # type: ignore[arg-type]
        self._loader = DataLoader(
            dataset,
            batch_sampler=_EpochBatches(self),
            num_workers=workers,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            # its own generator: each iter() draws a worker base seed, and drawing it from the
            # global RNG would shift dropout masks after a mid-epoch resume
            generator=torch.Generator().manual_seed(seed),
        )

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise KDError(f"epoch must be >= 0; got {epoch}")
        self.epoch = epoch

    def _per_replica(self) -> int:
        if self.num_replicas == 1 or self.drop_last:
            return self._n // self.num_replicas
        return math.ceil(self._n / self.num_replicas)

    def __len__(self) -> int:
        n = self._per_replica()
        if self.drop_last or lone_last_sample(n, self.batch_size, self.shuffle):
            return n // self.batch_size  # a lone last sample is folded into the batch before
        return math.ceil(n / self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """Positions this replica visits this epoch, in order."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self._n, generator=gen)
        else:
            order = torch.arange(self._n)
        if self.num_replicas > 1:
            total = self._per_replica() * self.num_replicas
            if total > self._n:
                order = order.repeat(math.ceil(total / max(self._n, 1)))
            order = order[self.rank : total : self.num_replicas]
        return order

    def __iter__(self) -> Iterator[Any]:
        return self.iter_from(0)

    def iter_from(self, batch_index: int) -> Iterator[Any]:
        """This epoch's batches from ``batch_index`` on; skipped batches are never decoded."""
        if not 0 <= batch_index <= len(self):
            raise KDError(f"batch_index must be in [0, {len(self)}]; got {batch_index}")
        self._start = batch_index
        return iter(self._loader)
