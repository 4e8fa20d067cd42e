"""Files no decoder could read: skipped, counted, the first few named; a run ends only when a
whole batch is unreadable.

Real photo folders hold a few truncated downloads, empty files and text files named
``.jpg``. Ending an epoch (hours in) for one of them is worse than training without it, so
every image loader drops such a file from its batch and records it here; the epoch log
(``skipped_files`` in ``metrics.csv``) and ``report.md`` say how many. A batch in which
*nothing* decodes is a wrong folder or a broken disk, not a stray file: that stops the run
with one line naming files.

:class:`Unreadable` is the item a dataset returns instead of pixels; :func:`split_unreadable`
separates those items from the good ones in a collate function (so the record travels from
DataLoader workers with the batch), and :class:`UnreadableLog` is the per-loader record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from kdkit.errors import KDError

__all__ = ["Readable", "Unreadable", "UnreadableLog", "readable", "skip_counts", "split_unreadable"]

log = logging.getLogger(__name__)

NAMED = 3  # files named in a message; the rest are counted


@dataclass(frozen=True)
class Unreadable:
    """A dataset item whose file could not be decoded: where it is and why."""

    path: str
    reason: str


def split_unreadable(items: list) -> tuple[list, list[Unreadable]]:
    """``(good items, unreadable items)`` of a batch's items, in order."""
    bad = [item for item in items if isinstance(item, Unreadable)]
    if not bad:
        return items, []
    return [item for item in items if not isinstance(item, Unreadable)], bad


def _named(files: list[Unreadable]) -> str:
    shown = ", ".join(f"{Path(f.path).name} ({f.reason})" for f in files[:NAMED])
    more = f" and {len(files) - NAMED} more" if len(files) > NAMED else ""
    return shown + more


@dataclass
class UnreadableLog:
    """The unreadable files one loader met: distinct paths, the first few logged by name."""

    what: str = "images"
    files: dict[str, Unreadable] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """How many distinct files were skipped so far (each file counts once)."""
        return len(self.files)

    def record(self, bad: list[Unreadable], kept: int) -> None:
        """Note a batch's unreadable files; ``kept`` readable images were left in it. A batch
        of several files none of which decodes stops the run (one stray file in a last
        batch of one does not)."""
        if not bad:
            return
        if kept == 0 and len(bad) > 1:
            self._stop(bad, "a whole batch")
        for f in bad:
            if f.path in self.files:
                continue
            self.files[f.path] = f
            if self.count <= NAMED:
                log.warning("skipping unreadable image %s (%s)", f.path, f.reason)
            elif self.count == NAMED + 1:
                log.warning("more unreadable %s skipped; counted in the epoch log", self.what)

    def end_pass(self, kept: int, bad: int) -> None:
        """After a pass over the loader: ``kept`` images decoded, ``bad`` did not. A pass in
        which nothing decoded stops the run."""
        if kept == 0 and bad:
            self._stop(list(self.files.values()), "the whole split")

    def _stop(self, bad: list[Unreadable], what: str) -> None:
        folder = Path(bad[0].path).parent
        raise KDError(
            f"no image of {what} could be decoded ({len(bad)} files, in {folder} and others: "
            f"{_named(bad)}); check that the folder holds images"
        )

    def names(self) -> list[str]:
        """The first few skipped files, ``path (reason)``."""
        return [f"{f.path} ({f.reason})" for f in list(self.files.values())[:NAMED]]

    def summary(self) -> str:
        """One line for a report: how many were skipped and which."""
        if not self.files:
            return f"no unreadable {self.what}"
        return f"{self.count} unreadable {self.what} skipped: {_named(list(self.files.values()))}"


def skip_counts(train_loader: object, val_loader: object = None) -> dict[str, int]:
    """The epoch log's columns: distinct files each loader skipped (loaders with a log)."""
    out = {}
    for key, loader in (("skipped_files", train_loader), ("val_skipped_files", val_loader)):
        record = getattr(loader, "unreadable", None)
        if isinstance(record, UnreadableLog):
            out[key] = record.count
    return out


class Readable:
    """``dataset`` with each :class:`Unreadable` item replaced by the next readable one: for
    consumers that need *some* training image at every position (int8 calibration), not a
    particular one. A dataset with no readable item at all is a KDError."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        n = len(self.dataset)
        for step in range(n):
            item = self.dataset[(i + step) % n]
            if not isinstance(item, Unreadable):
                return item
        raise KDError(f"none of the {n} images could be decoded")


def readable(dataset):
    """``dataset`` as :class:`Readable` when it may return :class:`Unreadable` items (image
    folders read by ``kdkit train``), else itself (arrays keep their fast paths)."""
    return Readable(dataset) if getattr(dataset, "skip_unreadable", False) else dataset
