"""What happens to a prompt/completion or chat document longer than ``data.max_length``.

``data.truncation`` (TRL's ``truncation_mode``, with a refusal TRL does not have):

- unset (the default): cut the end (as ``right``), but refuse the run when that would lose
  more than ``LIMIT`` (5%) of the corpus' trainable tokens, saying how many; a run that loses
  a little is logged and trains.
- ``right``: keep the first ``max_length`` tokens (the end of the completion is lost).
- ``left``: keep the last ``max_length`` tokens, a leading BOS kept (the prompt's start is
  lost; a long chat keeps its last turns).
- ``drop_row``: leave the whole document out.
- ``error``: refuse any document longer than ``max_length``, naming the first.

Trainable tokens are the targets (``trainable`` past a document's first token, which predicts
nothing). The counts go to the log, to :attr:`LMDataset.truncation` and to the run's report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kdkit.errors import KDError

__all__ = ["LIMIT", "TRUNCATIONS", "Truncation", "cut"]

TRUNCATIONS = ("drop_row", "left", "right", "error")
#: the default policy refuses a run that would lose more than this share of trainable tokens
LIMIT = 0.05


def targets(trainable: list[bool]) -> int:
    """Trained targets of a document (its first token predicts nothing)."""
    return sum(trainable[1:])


@dataclass
class Truncation:
    """The counts of one corpus' truncation (``policy`` None: the default)."""

    policy: str | None
    max_length: int
    documents: int = 0
    over: int = 0
    trainable: int = 0
    lost: int = 0
    dropped: int = 0
    longest: int = 0
    first_over: str = ""

    @classmethod
    def of(cls, counts: dict[str, Any]) -> Truncation:
        """Back from :meth:`as_dict` (a token cache's or a report's copy)."""
        return cls(**{k: v for k, v in counts.items() if k != "share"})

    @property
    def share(self) -> float:
        return self.lost / self.trainable if self.trainable else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share": round(self.share, 6)}

    def line(self) -> str:
        """One line for the log and the report."""
        how = self.policy or "right, the default"
        return (
            f"{self.over:,} of {self.documents:,} documents over max_length {self.max_length} "
            f"(longest {self.longest:,} tokens), truncation {how}: {self.lost:,} of "
            f"{self.trainable:,} trainable tokens lost ({self.share:.1%})"
            + (f", {self.dropped:,} documents dropped" if self.dropped else "")
        )

    def check(self) -> None:
        """The default's refusal and ``error``'s, one line each."""
        if self.policy == "error" and self.over:
            raise KDError(
                f"data.truncation: error: {self.over:,} of {self.documents:,} documents are "
                f"longer than max_length {self.max_length} (the first: {self.first_over}; the "
                f"longest {self.longest:,} tokens); raise data.max_length or choose "
                "data.truncation: right | left | drop_row"
            )
        if self.policy is None and self.share > LIMIT:
            raise KDError(
                f"data: max_length {self.max_length} would cut {self.lost:,} of "
                f"{self.trainable:,} trainable tokens ({self.share:.1%}) from {self.over:,} of "
                f"{self.documents:,} documents (the longest has {self.longest:,} tokens); raise "
                "data.max_length, or accept the loss with data.truncation: right | left | drop_row"
            )


def cut(
    ids: list[int],
    trainable: list[bool],
    where: str,
    counts: Truncation,
    bos: int | None,
) -> tuple[list[int], list[bool]] | None:
    """The document as ``counts.policy`` keeps it (None: left out), counted in ``counts``."""
    n, limit = len(ids), counts.max_length
    have = targets(trainable)
    counts.documents += 1
    counts.trainable += have
    if n <= limit:
        return ids, trainable
    counts.over += 1
    counts.longest = max(counts.longest, n)
    counts.first_over = counts.first_over or f"{where}, {n:,} tokens"
    policy = counts.policy or "right"
    if policy in ("drop_row", "error"):
        counts.lost += have
        counts.dropped += 1
        return None
    if policy == "right":
        ids, trainable = ids[:limit], trainable[:limit]
    else:  # left: the last tokens, after the BOS a model was trained to see first
        head = 1 if bos is not None and ids[0] == bos else 0
        ids = ids[:head] + ids[n - (limit - head) :]
        trainable = trainable[:head] + trainable[n - (limit - head) :]
    counts.lost += have - targets(trainable)
    return ids, trainable
