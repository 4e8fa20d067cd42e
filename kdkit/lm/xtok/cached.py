"""Cross-tokenizer KD from a top-k cache captured in the teacher's own tokens.

``kdkit lm capture`` of a cross-tokenizer config runs the teacher on *its* tokenization of the
corpus and stores, as for any cache, the teacher's top k over its own vocabulary at each trained
position, the row's token ids and the tokenizer itself (beside the shards). The byte offsets
are the stored ids through the stored tokenizer's byte table (:mod:`.tokenbytes`): exact, and
no new field in the cache format. Training re-reads the configured files with the cache's
tokenizer: the cache finds each of those rows by its hash (the same provenance check as any
cached run: another text, truncation or packing is refused, so the text is the same bytes), and
the student's rows are the student's tokens of that same text (:func:`.data.xtok_rows`), with
the student's BOS where its own tokenization of the files puts one (:func:`.data.text_starts`).

:class:`XTokCacheCollate` attaches an :class:`~.target.XTokTarget` whose teacher is the
batch's cached :class:`~kdkit.lm.cache.TopKTarget`; ``LMTask`` reads it like any cached target.
The tail policy matters: ``bucket`` (the default) projects the top k and keeps the rest one
bucket against the student's own rest, ``label`` projects the top k and trains on the student's
next token where no top-k id reaches it (:mod:`.bucket`); ``prior``, ``uniform`` and ``renorm``
give a whole distribution over the teacher's vocabulary, projected like a live teacher's. On the
demo (a weak, flat teacher: its top 32 hold half of its mass) ``bucket`` and ``prior`` made the
student worse than scratch from a k=32 cache and ``label`` did not; same-tokenizer KD from the
same cache was as bad: the loss is the cache's, not the projection's (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from kdkit.lm.align import Aligner, TokenBatch
from kdkit.lm.xtok.data import XTokRow
from kdkit.lm.xtok.target import Projection, XTokTarget

__all__ = ["DENSE_TAILS", "XTokCacheCollate"]

#: tail policies that give a whole distribution over the teacher's vocabulary (projectable)
DENSE_TAILS = ("renorm", "uniform", "prior")


def _entry_ranks(row: Any) -> torch.Tensor:
    """Per teacher position of ``row``, its entry in the cache (the row's trained positions in
    order, as :class:`~kdkit.lm.align.Aligner` marks them), -1 where there is none."""
    tr, doc = row.trainable, row.doc_ids
    mask = torch.zeros(len(tr), dtype=torch.bool)
    mask[:-1] = tr[1:] & (doc[1:] == doc[:-1])
    ranks = torch.cumsum(mask.long(), 0) - 1
    return torch.where(mask, ranks, torch.full_like(ranks, -1))


@dataclass(frozen=True)
class XTokCacheCollate:
    """Collate :class:`~.data.XTokRow` s built from cached rows: the student's batch with an
    :class:`~.target.XTokTarget` over the cached top k attached."""

    student: Aligner
    cache: Any
    projection: Projection
    method: str = "project"
    uld_weight: float = 1.0
    policy: str = "bucket"

    def __call__(self, rows: list[XTokRow]) -> TokenBatch:
        batch = self.student(rows)
        t_rows = [r.teacher_row() for r in rows]
        t_ranks = [_entry_ranks(t) for t in t_rows]
        labels = None  # the teacher rows' own next tokens (label; the loss reads the student's)
        if self.policy == "label":
            pairs = zip(t_rows, t_ranks, strict=True)
            labels = torch.cat([t.input_ids[1:][k[:-1] >= 0] for t, k in pairs])
        cached = self.cache.target(t_rows, self.policy, labels)
        index = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
        offset = 0
        for b, (r, ranks) in enumerate(zip(rows, t_ranks, strict=True)):
            entry = ranks[r.pair_teacher]
            ok = entry >= 0
            index[b, r.pair_student[ok]] = offset + entry[ok]
            offset += int((ranks >= 0).sum())
        target = XTokTarget(
            cached,
            index[batch.mask],
            self.projection,
            batch.labels[batch.mask],
            self.method,
            self.uld_weight,
        )
        return replace(batch, teacher=target)
