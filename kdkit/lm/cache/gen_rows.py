"""The rows of a generated part against what was sampled, and the counts of a generation.

:func:`match_rows` pairs each row ``kdkit train`` builds from a written part with the sample it
came from (one row per completion: ``data.pack`` is false) and takes the sample's targets where
they are the row's: the row's ids equal the sampled sequence up to its last trained position
(the distribution at position ``j`` depends on the ids up to ``j`` only). Any other row is scored
again by the teacher, in batches, as a capture would.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.lm.align import Aligner
from kdkit.lm.sampling import Sampled, entries_of

__all__ = ["Counts", "Matched", "match_rows", "rows_sha256"]

log = logging.getLogger(__name__)


@dataclass
class Matched:
    """A part's rows with their targets in row order (what :func:`rows_arrays` takes)."""

    rows: Sequence[Any]
    entries: list[int]
    ids: list[torch.Tensor]
    logp: list[torch.Tensor]
    tail: list[torch.Tensor]
    mass: torch.Tensor
    rescored: int


def _sampled_targets(row: Any, s: Sampled) -> tuple[torch.Tensor, ...] | None:
    """``(ids, logp, tail)`` of ``row`` from the sampling pass, or None: not its own (its ids
    differ from the sampled sequence at or before a trained position, or it trains a position
    the pass did not keep)."""
    trained = np.flatnonzero(row.trainable.numpy()[1:])  # position j trains token j + 1
    if not len(trained) or bool((row.doc_ids != 0).any()):
        return None
    seq = s.sequence
    last = int(trained[-1])
    if trained[0] < s.first or last > len(seq) - 1:
        return None
    if row.input_ids[: last + 1].tolist() != seq[: last + 1]:
        return None
    return entries_of(s, trained)


def match_rows(
    rows: Sequence[Any],
    samples: Sequence[Sampled],
    scorer: Any,
    settings: Mapping[str, Any],
    batch_size: int,
    mass: torch.Tensor,
) -> Matched:
    """Each row's targets: the sample's (see the module docstring) or ``scorer.score``'s.
    ``mass``: the samples' summed distributions (:attr:`Sampled.mass`), the part's
    ``teacher_mass``; a row scored again counts there as it was sampled."""
    k, temperature = settings["capture"]["k"], settings["capture"]["temperature"]
    found: list[tuple[torch.Tensor, ...] | None] = [None] * len(rows)
    if len(rows) == len(samples):
        found = [_sampled_targets(r, s) for r, s in zip(rows, samples, strict=True)]
    else:  # a document dropped by the data path: the pairing is lost, score every row
        log.warning(
            "generate: %d completions gave %d rows; scoring the part's rows again",
            len(samples),
            len(rows),
        )
    again = [i for i, f in enumerate(found) if f is None]
    if again:
        aligner = Aligner(pad_id=scorer.pad_id, max_length=max(len(rows[i]) for i in again))
        for start in range(0, len(again), batch_size):
            chunk = again[start : start + batch_size]
            batch = aligner([rows[i] for i in chunk])
            ids, logp, tail, _ = scorer.score(batch, k, temperature)
            ends = np.cumsum(batch.mask.sum(1).tolist())
            for i, lo, hi in zip(chunk, [0, *ends[:-1]], ends, strict=True):
                found[i] = (ids[lo:hi].cpu(), logp[lo:hi].cpu(), tail[lo:hi].cpu())
    return Matched(
        rows=rows,
        entries=[int(f[0].shape[0]) for f in found],
        ids=[f[0] for f in found],
        logp=[f[1] for f in found],
        tail=[f[2] for f in found],
        mass=mass,
        rescored=len(again),
    )


def rows_sha256(folder: Path, shards: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over every row's hash in shard order: what a capture of the same rows records
    (:func:`kdkit.lm.cache.capture.rows_fingerprint`)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for shard in shards:
        with safe_open(str(folder / shard["file"]), framework="numpy") as f:
            h.update(np.ascontiguousarray(f.get_tensor("row_hash"), dtype="<u8").tobytes())
    return h.hexdigest()


def _length_bin(n: int) -> str:
    """``0``, ``1``, ``2-3``, ``4-7``, ...: completion lengths in powers of two."""
    if n < 2:
        return str(n)
    lo = 1 << (n.bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


@dataclass
class Counts:
    """What a generation did, up to a commit (cumulative; stored with each part)."""

    prompts: int = 0
    skipped_prompts: int = 0
    samples: int = 0
    kept: int = 0
    unfinished: int = 0
    unfinished_dropped: int = 0
    duplicates: int = 0
    rescored: int = 0
    redrawn: int = 0
    generated_tokens: int = 0
    kept_tokens: int = 0
    lengths: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, data: Mapping[str, Any] | None) -> Counts:
        names = {f.name for f in fields(cls)}
        return cls(**{k: copy.copy(v) for k, v in (data or {}).items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        """A copy (the counts go on growing after a part records them)."""
        return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self)}

    def add(self, events: Sequence[tuple[Any, str, Any]], n: int, rescored: int) -> None:
        """Count ``events`` (``(item, verdict, record)`` in stream order) and the rows
        ``rescored``; ``prompts`` becomes the prompts the last event finished."""
        for item, verdict, _ in events:
            if verdict == "skipped":
                self.skipped_prompts += 1
                continue
            tokens = len(item.result.tokens)
            self.samples += 1
            self.generated_tokens += tokens
            self.redrawn += item.result.redraws
            self.unfinished += not item.result.finished
            self.unfinished_dropped += verdict == "unfinished"
            self.duplicates += verdict == "duplicate"
            if verdict == "kept":
                self.kept += 1
                self.kept_tokens += tokens
                b = _length_bin(tokens)
                self.lengths[b] = self.lengths.get(b, 0) + 1
        self.rescored += rescored
        if events:
            item = events[-1][0]
            self.prompts = item.prompt.index + (item.sample is None or item.sample == n - 1)

    def line(self) -> str:
        return (
            f"{self.samples} samples of {self.prompts} prompts: {self.unfinished_dropped} "
            f"unfinished dropped, {self.duplicates} duplicates, {self.skipped_prompts} prompts "
            "skipped (no room under data.max_length)"
        )

    def histogram(self) -> str:
        """``1: 3  2-3: 10  4-7: 52 ...``: kept completions by length in tokens."""
        order = sorted(self.lengths, key=lambda b: int(b.split("-")[0]))
        return "  ".join(f"{b}: {self.lengths[b]}" for b in order) or "-"
