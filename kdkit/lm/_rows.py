"""Token rows, in memory or memory-mapped from the token cache, behind one sequence.

A corpus larger than memory is never held as Python lists or tensors: the token cache
(:mod:`kdkit.lm._token_cache`) keeps its rows as flat arrays on disk, and :class:`MappedRows`
slices one row out of them when it is asked for (``__getitem__``), so the DataLoader, the val
split (a :class:`torch.utils.data.Subset` of indices), the DDP sampler and an exact resume see a
map-style dataset with a known length, as they do for rows in a list. The pages read stay in the
page cache, which the kernel reclaims, not in the process' own heap.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

__all__ = ["ConcatRows", "MappedRows", "TokenRow", "update_digest"]


@dataclass(frozen=True)
class TokenRow:
    """One row: ``input_ids`` int64 [n], ``trainable`` bool [n] (token is a target), ``doc_ids``
    int64 [n] (document index within the row, contiguous runs from 0)."""

    input_ids: torch.Tensor
    trainable: torch.Tensor
    doc_ids: torch.Tensor

    @classmethod
    def of(
        cls,
        ids: Sequence[int],
        trainable: Sequence[bool] | None = None,
        doc_ids: Sequence[int] | None = None,
    ) -> TokenRow:
        n = len(ids)
        return cls(
            torch.as_tensor(list(ids), dtype=torch.long),
            torch.as_tensor(
                list(trainable) if trainable is not None else [True] * n, dtype=torch.bool
            ),
            torch.as_tensor(list(doc_ids) if doc_ids is not None else [0] * n, dtype=torch.long),
        )

    def __len__(self) -> int:
        return int(self.input_ids.numel())


#: safetensors dtype names of the cache's arrays, as numpy reads them
_NUMPY = {"I64": np.int64, "U8": np.uint8}


class RowSequence(Sequence[TokenRow]):
    """A read-only sequence of rows that is not a list: ``row(i)`` for ``0 <= i < len``; indexing
    (negative too) and slices (a list) are answered here."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def row(self, i: int) -> TokenRow: ...

    @overload
    def __getitem__(self, i: int) -> TokenRow: ...
    @overload
    def __getitem__(self, i: slice) -> list[TokenRow]: ...
    def __getitem__(self, i: int | slice) -> TokenRow | list[TokenRow]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self.row(i % n)


class MappedRows(RowSequence):
    """The rows of one token-cache file, read lazily: ``layout`` maps ``lengths``,
    ``input_ids``, ``trainable`` and ``doc_ids`` to ``(dtype, count, byte offset)`` in ``path``.

    A row is copied out of the mapping when asked for, so what a caller holds never pins the
    file. Pickles as its path and layout (a DataLoader worker maps the file again), never as
    the arrays."""

    def __init__(self, path: Path, layout: dict[str, tuple[str, int, int]]) -> None:
        self.path = Path(path)
        self.layout = layout
        self._arrays: dict[str, np.ndarray] | None = None
        self._starts: np.ndarray | None = None

    def _map(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if self._arrays is None or self._starts is None:
            self._arrays = {
                name: np.memmap(self.path, dtype=_NUMPY[dt], mode="r", offset=off, shape=(n,))
                if n else np.zeros(0, dtype=_NUMPY[dt])
                for name, (dt, n, off) in self.layout.items()
            }  # fmt: skip
            starts = np.zeros(len(self._arrays["lengths"]) + 1, dtype=np.int64)
            np.cumsum(self._arrays["lengths"], out=starts[1:])
            self._starts = starts
        return self._arrays, self._starts

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "layout": self.layout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["layout"])  # type: ignore[misc]

    def __len__(self) -> int:
        return self.layout["lengths"][1]

    def total_tokens(self) -> int:
        return self.layout["input_ids"][1]

    def lengths(self) -> np.ndarray:
        """Every row's length (a view of the mapping)."""
        return self._map()[0]["lengths"]

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ``i``'s ``(input_ids, trainable, doc_ids)`` as views of the mapping."""
        a, starts = self._map()
        lo, hi = int(starts[i]), int(starts[i + 1])
        return a["input_ids"][lo:hi], a["trainable"][lo:hi], a["doc_ids"][lo:hi]

    def row(self, i: int) -> TokenRow:
        ids, tr, doc = self.arrays(i)
        return TokenRow(
            torch.from_numpy(np.array(ids, dtype=np.int64)),
            torch.from_numpy(np.array(tr, dtype=np.bool_)),
            torch.from_numpy(np.array(doc, dtype=np.int64)),
        )

    def __iter__(self) -> Iterator[TokenRow]:
        return (self[i] for i in range(len(self)))


class ConcatRows(RowSequence):
    """Several row sequences read as one (a corpus' train and val rows, for a capture),
    without copying either."""

    def __init__(self, *parts: Sequence[TokenRow]) -> None:
        self.parts = parts
        self._ends = np.cumsum([len(p) for p in parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def row(self, i: int) -> TokenRow:
        part = int(np.searchsorted(self._ends, i, side="right"))
        return self.parts[part][i - (int(self._ends[part - 1]) if part else 0)]

    def __iter__(self) -> Iterator[TokenRow]:
        for part in self.parts:
            yield from part


def update_digest(h: Any, rows: Sequence[TokenRow]) -> None:
    """Feed every row's ids, targets and document ids to ``h`` (a hashlib object), the same
    bytes for rows in memory and mapped ones, one row at a time."""
    if isinstance(rows, MappedRows):
        for i in range(len(rows)):
            ids, tr, doc = rows.arrays(i)
            h.update(ids.tobytes())
            h.update(tr.tobytes())  # uint8 0/1: a bool tensor's bytes
            h.update(doc.tobytes())
        return
    for r in rows:
        h.update(r.input_ids.numpy().tobytes())
        h.update(r.trainable.numpy().tobytes())
        h.update(r.doc_ids.numpy().tobytes())
