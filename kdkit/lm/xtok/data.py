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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.lm.align import Aligner, TokenBatch
from kdkit.lm.data import TokenRow
from kdkit.lm.targets import DenseTeacher, TeacherTarget
from kdkit.lm.tokenizer import tokenizer_fingerprint
from kdkit.lm.xtok.align import align_many
from kdkit.lm.xtok.retokenize import teacher_ids
from kdkit.lm.xtok.target import Projection, XTokTarget
from kdkit.lm.xtok.tokenbytes import TokenBytes, align_tables, token_bytes

__all__ = [
    "XTokBatch",
    "XTokCollate",
    "XTokDataset",
    "XTokRow",
    "teacher_example",
    "text_starts",
    "with_student_bos",
]

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


def xtok_rows(
    rows: Sequence[TokenRow],
    student_tok: Any,
    teacher_tok: Any,
    *,
    teacher_max_length: int | None = None,
    from_teacher: int | None = None,
    starts: Sequence[bool] | None = None,
) -> list[XTokRow]:
    """The :class:`XTokRow` s of student ``rows`` (the teacher's tokens cut at
    ``teacher_max_length``), or, with ``from_teacher`` (the student's max_length), of *teacher*
    rows (a cache's): the student's tokens of their text, cut there, every token trainable.
    ``starts`` (with ``from_teacher``; :func:`text_starts`): per row, whether its first
    document starts a text; then each document that does begins with the student's BOS
    exactly when the student's tokenizer writes one (:func:`with_student_bos`; None: the BOS
    of the teacher's rows, carried over, as is). Pairs past a cut are dropped (a BOS takes a
    slot). One :func:`~.align.align_many` for all rows."""
    s, t = token_bytes(student_tok), token_bytes(teacher_tok)
    sides = []  # (student ids, docs, trainable), (teacher ids, docs, trainable or None)
    for i, row in enumerate(rows):
        ids, docs = row.input_ids.numpy(), row.doc_ids.numpy()
        if from_teacher is None:
            o_ids, o_docs = teacher_ids(ids, docs, s, t, teacher_tok)
            if teacher_max_length is not None:
                o_ids, o_docs = o_ids[:teacher_max_length], o_docs[:teacher_max_length]
            sides.append(((ids, docs, row.trainable), (o_ids, o_docs, None)))
        else:  # the same function, the other way: the student's tokens of a teacher row
            o_ids, o_docs = teacher_ids(ids, docs, t, s, student_tok)
            if starts is not None:
                o_ids, o_docs = with_student_bos(o_ids, o_docs, s, bool(starts[i]))
            o_ids, o_docs = o_ids[:from_teacher], o_docs[:from_teacher]
            keep = torch.ones(len(o_ids), dtype=torch.bool)
            sides.append(((o_ids, o_docs, keep), (ids, docs, row.trainable)))
    pairs = align_many(
        [(a[0], a[1]) for a, _ in sides],
        [(b[0], b[1]) for _, b in sides],
        *align_tables(s, t),
    )
    return [
        XTokRow(
            torch.as_tensor(a[0], dtype=torch.long),
            a[2],
            torch.as_tensor(a[1], dtype=torch.long),
            torch.as_tensor(b[0], dtype=torch.long),
            torch.as_tensor(b[1], dtype=torch.long),
            torch.from_numpy(al.student),
            torch.from_numpy(al.teacher),
            b[2],
        )
        for (a, b), al in zip(sides, pairs, strict=True)
    ]


def with_student_bos(
    ids: np.ndarray, docs: np.ndarray, student: TokenBytes, starts: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The student's tokens of a teacher row (``ids``, ``docs``) with a BOS at each document
    that starts a text (every document after the row's first; the first when ``starts``)
    exactly when the student's tokenizer writes one (:attr:`TokenBytes.adds_bos`), as its own
    tokenization of the files would: added where the teacher had none (a Qwen-like teacher
    for a Llama-3-like student), taken off where the teacher's BOS was carried over to a
    student that writes none. A row whose first document continues a text gets none there."""
    ids = np.asarray(ids, dtype=np.int64)
    docs = np.asarray(docs, dtype=np.int64)
    if not len(ids):
        return ids, docs
    heads = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
    if not starts:
        heads = heads[docs[heads] != docs[0]]
    if student.adds_bos:
        add = heads[ids[heads] != student.bos_id]
        return np.insert(ids, add, student.bos_id), np.insert(docs, add, docs[add])
    if student.bos_id is None:
        return ids, docs
    keep = np.ones(len(ids), dtype=bool)
    keep[heads[ids[heads] == student.bos_id]] = False
    return ids[keep], docs[keep]


def text_starts(
    rows: Sequence[TokenRow],
    description: Mapping[str, Any],
    eos: int | None,
    bos: int | None = None,
) -> list[bool] | None:
    """Per row of a loader's rows, in its order (:func:`kdkit.lm.data.load_lm_dataset`:
    ``description`` its settings, ``eos`` its tokenizer's EOS id, ``bos`` its BOS id where the
    tokenizer writes one), whether its first document starts a text; the documents after it
    always do (packing never splits a document). Only ``overflow: split`` cuts a text across
    rows. With ``bos`` a row starts a text exactly when it starts with it. Without, a piece
    after a text's first starts the row after a row that holds one document of exactly
    ``max_length`` tokens not ending with EOS (every text ends with one); inexact in one case:
    a text of ``k * max_length + 1`` tokens loses its last piece (its EOS alone trains nothing)
    and the text after it reads as a continuation (no BOS). None for chat rows: their BOS is
    the chat template's text, which is not re-rendered per tokenizer."""
    if description.get("format", "text") == "chat":
        return None
    if description.get("overflow") != "split":
        return [True] * len(rows)
    if bos is not None:
        return [len(r) > 0 and int(r.input_ids[0]) == bos for r in rows]
    size = description["max_length"]
    out = [True] * min(len(rows), 1)
    for prev in rows[:-1]:  # a piece of a text starts the row after the piece before it
        cut = len(prev) == size and int(prev.doc_ids[-1]) == 0
        out.append(not (cut and (eos is None or int(prev.input_ids[-1]) != eos)))
    return out


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
        listed = [rows[i] for i in range(len(rows))]
        starts = None
        if from_teacher is not None:  # the student's BOS where its own rows would have one
            t = token_bytes(teacher_tok)
            eos = getattr(teacher_tok, "eos_token_id", None)
            bos = t.bos_id if t.adds_bos else None
            starts = text_starts(listed, getattr(rows, "description", {}), eos, bos)
        self.rows = xtok_rows(
            listed,
            student_tok,
            teacher_tok,
            teacher_max_length=teacher_max_length,
            from_teacher=from_teacher,
            starts=starts,
        )
        self.truncation = getattr(rows, "truncation", None)  # what the report says of it
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

    def run(
        self, teacher: Any, transform: Any, mask: torch.Tensor, labels: torch.Tensor | None
    ) -> XTokTarget:
        """Run ``teacher`` (a module whose forward is ``hidden_and_head`` of a
        :class:`~kdkit.lm.align.TokenBatch`) on this batch's teacher rows, under ``no_grad``,
        and make the target (what the model does after its head: ``transform``)."""
        with torch.no_grad():
            t = teacher(self.batch)
        flat = t.hidden.reshape(-1, t.hidden.shape[-1])
        return self.target(DenseTeacher(flat, t.head, transform), mask, labels)

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


def teacher_example(example: Any) -> Any:
    """The teacher's tokens of a row or batch: its own, unless a cross-tokenizer row or batch
    carries the teacher's (the probe and the teacher's scoring run on those)."""
    if isinstance(example, XTokRow):
        return example.teacher_row()
    if isinstance(getattr(example, "teacher", None), XTokBatch):
        return example.teacher.batch
    return example
