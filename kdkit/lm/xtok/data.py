"""Rows, dataset and collate of a cross-tokenizer run: the teacher's tokens ride with the batch.

Everything the alignment needs is computed once per row, when the dataset is built
(:class:`XTokDataset`): the teacher's tokens of the row's text (:mod:`.retokenize`) and the
paired positions (:mod:`.align`). The collate (:class:`XTokCollate`) pads the teacher's rows
like the student's (its own :class:`~kdkit.lm.align.Aligner`) and turns the pairs into one
index per student position, ``[B, L]``: the flat teacher position it pairs with, or -1. The
batch carries that as :class:`XTokBatch` in ``TokenBatch.teacher``; the step runs the teacher on
``XTokBatch.batch`` and :meth:`XTokBatch.target` makes the fused loss's target.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from kdkit.lm.align import Aligner, TokenBatch
from kdkit.lm.data import TokenRow
from kdkit.lm.targets import TeacherTarget
from kdkit.lm.tokenizer import tokenizer_fingerprint
from kdkit.lm.xtok.align import align_rows
from kdkit.lm.xtok.retokenize import teacher_ids
from kdkit.lm.xtok.target import Projection, XTokTarget
from kdkit.lm.xtok.tokenbytes import kind_tables, token_bytes

__all__ = ["XTokBatch", "XTokCollate", "XTokDataset", "XTokRow"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class XTokRow(TokenRow):
    """A student row (the :class:`~kdkit.lm.data.TokenRow` fields) with the teacher's tokens
    of the same text (``teacher_ids``, ``teacher_docs``) and the paired positions
    (``pair_student[k]`` and ``pair_teacher[k]`` predict from the same prefix)."""

    teacher_ids: torch.Tensor
    teacher_docs: torch.Tensor
    pair_student: torch.Tensor
    pair_teacher: torch.Tensor
    teacher_trainable: torch.Tensor | None = None

    def teacher_row(self) -> TokenRow:
        """The teacher's row (every token trainable, unless it came from a cached row)."""
        n = int(self.teacher_ids.numel())
        tr = self.teacher_trainable
        return TokenRow(
            self.teacher_ids,
            torch.ones(n, dtype=torch.bool) if tr is None else tr,
            self.teacher_docs,
        )


def xtok_row(
    row: TokenRow, student_tok: Any, teacher_tok: Any, teacher_max_length: int | None = None
) -> XTokRow:
    """The :class:`XTokRow` of one student row (the teacher's tokens cut at
    ``teacher_max_length``, pairs past the cut dropped)."""
    s, t = token_bytes(student_tok), token_bytes(teacher_tok)
    ks, kt = kind_tables(s, t)
    ids, docs = row.input_ids.numpy(), row.doc_ids.numpy()
    t_ids, t_docs = teacher_ids(ids, docs, s, t, teacher_tok)
    if teacher_max_length is not None:
        t_ids, t_docs = t_ids[:teacher_max_length], t_docs[:teacher_max_length]
    al = align_rows(ids, docs, t_ids, t_docs, (s.lengths, ks), (t.lengths, kt))
    return XTokRow(
        row.input_ids,
        row.trainable,
        row.doc_ids,
        torch.from_numpy(t_ids),
        torch.from_numpy(t_docs),
        torch.from_numpy(al.student),
        torch.from_numpy(al.teacher),
    )


def xtok_row_from_teacher(
    row: TokenRow, student_tok: Any, teacher_tok: Any, student_max_length: int
) -> XTokRow:
    """The :class:`XTokRow` of a *teacher* row (a cached one): the student's tokens of its
    text, cut at ``student_max_length`` (pairs past the cut dropped), every token trainable."""
    s, t = token_bytes(student_tok), token_bytes(teacher_tok)
    kt, ks = kind_tables(t, s)
    t_ids, t_docs = row.input_ids.numpy(), row.doc_ids.numpy()
    s_ids, s_docs = teacher_ids(t_ids, t_docs, t, s, student_tok)  # the other side's tokens
    s_ids, s_docs = s_ids[:student_max_length], s_docs[:student_max_length]
    al = align_rows(s_ids, s_docs, t_ids, t_docs, (s.lengths, ks), (t.lengths, kt))
    ids = torch.from_numpy(s_ids)
    return XTokRow(
        ids,
        torch.ones(len(ids), dtype=torch.bool),
        torch.from_numpy(s_docs),
        row.input_ids,
        row.doc_ids,
        torch.from_numpy(al.student),
        torch.from_numpy(al.teacher),
        row.trainable,
    )


class XTokDataset(Dataset):
    """A student :class:`~kdkit.lm.data.LMDataset` whose rows become :class:`XTokRow` s, all
    computed here, once (``paired`` reports the share of student positions with a partner)."""

    def __init__(
        self,
        rows: Any,
        student_tok: Any,
        teacher_tok: Any,
        *,
        teacher_max_length: int | None = None,
        from_teacher: int | None = None,
    ) -> None:
        """``rows``: student rows; with ``from_teacher`` (the student's max_length) teacher
        rows (a cache's), whose text the student tokenizes here."""
        self.base = rows
        if from_teacher is not None:
            self.rows = [
                xtok_row_from_teacher(rows[i], student_tok, teacher_tok, from_teacher)
                for i in range(len(rows))
            ]
        else:
            self.rows = [
                xtok_row(rows[i], student_tok, teacher_tok, teacher_max_length)
                for i in range(len(rows))
            ]
        self.description = dict(getattr(rows, "description", {}))
        self.description["teacher_tokenizer"] = tokenizer_fingerprint(teacher_tok)
        n = sum(len(r) for r in self.rows)
        self.paired = sum(int(r.pair_student.numel()) for r in self.rows) / max(n, 1)
        self.teacher_max = max((int(r.teacher_ids.numel()) for r in self.rows), default=1)
        log.info(
            "cross-tokenizer rows: %d, %.1f%% of student positions pair with a teacher position",
            len(self.rows),
            100 * self.paired,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> XTokRow:
        return self.rows[i]

    @property
    def fingerprint(self) -> str:
        """The student rows' fingerprint and the teacher tokenizer's."""
        base = getattr(self.base, "fingerprint", "")
        return hashlib.sha256((base + self.description["teacher_tokenizer"]).encode()).hexdigest()


@dataclass(frozen=True)
class XTokBatch:
    """What a cross-tokenizer batch carries for its teacher (``TokenBatch.teacher``).

    ``batch``: the teacher's rows, collated; ``index``: ``[B, L]`` (the student batch's shape)
    int64, the flat teacher position (``row * L_teacher + position``) each student position
    pairs with, -1 = none; ``projection``, ``method``, ``uld_weight``: the loss's (see
    :class:`~kdkit.lm.xtok.target.XTokTarget`)."""

    batch: TokenBatch
    index: torch.Tensor
    projection: Projection
    method: str = "project"
    uld_weight: float = 1.0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> XTokBatch:
        return replace(
            self,
            batch=self.batch.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
            projection=self.projection.to(device, non_blocking=non_blocking),
        )

    def target(
        self, teacher: TeacherTarget, mask: torch.Tensor, labels: torch.Tensor | None
    ) -> XTokTarget:
        """The fused loss's target for the student's masked positions; ``teacher`` covers the
        teacher batch's flat positions (e.g. ``DenseTeacher(hidden.flatten(0, 1), head)``)."""
        return XTokTarget(
            teacher,
            self.index[mask],
            self.projection,
            labels,
            self.method,
            self.uld_weight,
        )


@dataclass(frozen=True)
class XTokCollate:
    """Collate :class:`XTokRow` s: the student's batch with an :class:`XTokBatch` attached."""

    student: Aligner
    teacher: Aligner
    projection: Projection
    method: str = "project"
    uld_weight: float = 1.0

    def __call__(self, rows: list[XTokRow]) -> TokenBatch:
        batch = self.student(rows)
        t_batch = self.teacher([r.teacher_row() for r in rows])
        width = t_batch.input_ids.shape[1]
        index = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
        for b, r in enumerate(rows):  # one vectorized write per row
            index[b, r.pair_student] = b * width + r.pair_teacher
        xt = XTokBatch(t_batch, index, self.projection, self.method, self.uld_weight)
        return replace(batch, teacher=xt)
