"""A DataLoader for map-style datasets whose batch order is a pure function of (seed, epoch).

:class:`~kdkit.data.FastLoader` does this for in-memory arrays; image folders are too large
for memory, so :class:`EpochLoader` gives them the same contract: ``set_epoch``, ``__len__``,
``iter_from(batch)`` to resume mid-epoch without decoding the skipped batches, and sharding
across DDP ranks. With deterministic per-image transforms (augmentation done on the device by
a :class:`~kdkit.data.ViewSampler`), a killed run resumes to the same weights.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from kdkit.data._workers import stop_workers
from kdkit.data.arrays import epoch_seed, lone_last_sample
from kdkit.data.unreadable import Unreadable, UnreadableLog, split_unreadable
from kdkit.errors import KDError

__all__ = ["EpochLoader"]


class _EpochBatches:
    """The batch sampler: this epoch's batches of positions, from ``start`` on.

    It reads the loader through a weak reference: the loader holds the DataLoader that holds
    this sampler, and a strong reference back would make a cycle that only the cyclic GC
    frees (keeping the persistent workers alive until then)."""

    def __init__(self, loader: EpochLoader) -> None:
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> EpochLoader:
        loader = self._loader()
        if loader is None:
            raise KDError("the EpochLoader of this DataLoader was freed; iterate the EpochLoader")
        return loader

    def __len__(self) -> int:
        return len(self.loader) - self.loader._start

    def __iter__(self) -> Iterator[list[int]]:
        loader = self.loader
        order = loader.epoch_order().tolist()
        bs, n_batches = loader.batch_size, len(loader)
        fold = lone_last_sample(len(order), bs, loader.shuffle) and not loader.drop_last
        for b in range(loader._start, n_batches):
            end = len(order) if fold and b == n_batches - 1 else (b + 1) * bs
            yield order[b * bs : end]  # a lone last sample joins the batch before


class _DropUnreadable:
    """The collate step, with :class:`~kdkit.data.unreadable.Unreadable` items taken out of
    the batch first and sent back beside it (from the workers to the loader's log)."""

    def __init__(self, collate_fn: Callable[[list], Any] | None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: list) -> tuple[Any, list[Unreadable], int]:
        good, bad = split_unreadable(items)
        return (self.collate_fn(good) if good else None), bad, len(good)


class EpochLoader:
    """Batches of ``dataset`` in an order that depends only on (seed, epoch).

    Args mirror :class:`~kdkit.data.FastLoader`; ``workers`` and ``collate_fn`` go to the
    underlying ``torch.utils.data.DataLoader`` (workers persist across epochs). Items the
    dataset returns as :class:`~kdkit.data.unreadable.Unreadable` are dropped from their
    batch and recorded in :attr:`unreadable`; a batch with none left stops with a KDError.
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
        self.unreadable = UnreadableLog()
        self._loader = DataLoader(
            dataset,
            batch_sampler=_EpochBatches(self),
            num_workers=workers,
            collate_fn=_DropUnreadable(collate_fn),
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
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
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

    def close(self) -> None:
        """Stop the DataLoader workers now (they persist across epochs otherwise, until the
        loader is freed); iterating again starts new ones."""
        stop_workers(self._loader)

    def __enter__(self) -> EpochLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iter_from(self, batch_index: int) -> Iterator[Any]:
        """This epoch's batches from ``batch_index`` on; skipped batches are never decoded."""
        if not 0 <= batch_index <= len(self):
            raise KDError(f"batch_index must be in [0, {len(self)}]; got {batch_index}")
        self._start = batch_index
        return self._batches(iter(self._loader))

    def _batches(self, it: Iterator[tuple[Any, list[Unreadable], int]]) -> Iterator[Any]:
        n_kept = n_bad = 0
        for batch, bad, kept in it:
            self.unreadable.record(bad, kept)  # raises when a whole batch is unreadable
            n_kept, n_bad = n_kept + kept, n_bad + len(bad)
            if kept:
                yield batch
        self.unreadable.end_pass(n_kept, n_bad)  # raises when nothing at all decoded
