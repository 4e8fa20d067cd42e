"""Which student position and which teacher position predict from the same text prefix.

Position ``i`` of a row predicts token ``i + 1`` after reading tokens ``0..i``. A student
position and a teacher position can be compared when both have read the same text, i.e. the
same bytes, and both are about to predict the same *kind* of thing: text, or the same special
token (an EOS, a chat marker). So each position gets a key ``(document, bytes read, kind of
the next token)`` and the pairs are the keys both sides have: one merge of both sides' sorted
keys for a block of rows, no per-token Python and no ``decode``. Between two consecutive paired
byte boundaries lies an *aligned span*: the maximal groups of student and teacher tokens whose
byte boundaries coincide (:func:`spans`).

What the key gets right, each pinned by ``tests/test_lm_xtok_align.py``:

- **BOS asymmetry** (huggingface/trl#4392): a BOS has length 0, so the student's BOS position
  and the teacher's last-BOS-less position would both sit at byte 0, but only a side that has
  read the BOS *has* a position at byte 0; the one without never pairs there.
- **Chat and other specials**: their length is 0 and their kind is their class; the student
  position before ``<|im_end|>`` pairs with the teacher position before its ``<|im_end|>``.
- **Multi-byte UTF-8 split across tokens**: lengths are bytes (:mod:`.tokenbytes`), so a
  boundary inside a character is a boundary like any other; it pairs only where both split.
- **Digit splitting, different merges**: only coinciding boundaries pair; a teacher ``123``
  against a student ``1 2 3`` pairs the positions before ``123`` / ``1`` and after.
- **Identical tokenizers**: every position pairs with itself (the identity alignment).
- **A space written before every text** (SentencePiece's dummy prefix, either side): the first
  token of each run reads one byte less (:func:`dummy_prefix`), and the position before it pairs
  only with a side that writes one too (``tests/test_lm_xtok_spm.py``).

A key seen twice on one side (two specials of one class in a row) keeps its last position, the
one that has read the most. :func:`align_many` aligns a whole dataset's rows in one call (the row
is part of the key), which is what the data pipeline calls; :func:`align_flat` does the same
for rows held flat (:class:`FlatRows`) and returns the pairs flat (:class:`FlatAlignment`).
Speed (``benchmarks/bench_lm_xtok.py align``, docs/benchmarks.md): on a shared 2-core VM a page
fault costs about as much as the arithmetic on 1k positions, and the first call of each numpy
routine after other work tens of microseconds, so the code keeps fresh arrays few (blocks of
``_BLOCK_POSITIONS`` reuse memory) and numpy calls per block few.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "FlatAlignment",
    "FlatRows",
    "RowAlignment",
    "align_flat",
    "align_many",
    "align_rows",
    "dummy_prefix",
    "position_keys",
    "spans",
]

_KIND_BITS = 12  # special classes per pair of tokenizers
_BYTE_BITS = 24  # bytes per row (16 MiB)
_DOC_BITS = 12  # documents per row
_ROW_BITS = 63 - _KIND_BITS - _BYTE_BITS - _DOC_BITS  # rows per block (32k)
_END_KIND = (1 << _KIND_BITS) - 1  # the row's last position predicts nothing
_START_KIND = _END_KIND - 1  # the next token starts a run with a dummy prefix (position_keys)
_DOC_SHIFT = _BYTE_BITS + _KIND_BITS
_ROW_SHIFT = _DOC_BITS + _DOC_SHIFT
#: student positions in one block of :func:`align_flat`: its arrays stay in the cache and the
#: allocator hands the next block the same memory (fastest of 2**13..2**17 in the bench)
_BLOCK_POSITIONS = 1 << 14


@dataclass(frozen=True)
class RowAlignment:
    """Paired positions of one row: ``student[k]`` and ``teacher[k]`` (``int64``, increasing)
    predict from the same text prefix."""

    student: np.ndarray
    teacher: np.ndarray

    def __len__(self) -> int:
        return int(self.student.shape[0])


@dataclass(frozen=True)
class FlatRows:
    """Rows held flat: every row's ``ids`` and ``docs`` (``int64``) concatenated, row ``r``
    at ``starts[r]:starts[r + 1]`` (``len(rows) + 1`` offsets). What :func:`align_flat` reads
    without a per-row step; :meth:`of` makes it from ``(ids, doc_ids)`` per row."""

    ids: np.ndarray
    docs: np.ndarray
    starts: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.docs) == int(self.starts[-1]):
            raise ValueError("ids, docs and the last row's end differ in length")

    def __len__(self) -> int:
        return len(self.starts) - 1

    @classmethod
    def of(cls, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> FlatRows:
        """One ``np.concatenate`` per field, so a row costs a list entry, not numpy calls."""
        starts = np.zeros(len(rows) + 1, dtype=np.int64)
        if not rows:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), starts)
        ids, docs = zip(*rows, strict=True)
        np.cumsum(np.fromiter(map(len, ids), np.int64, len(rows)), out=starts[1:])
        return cls(
            np.concatenate(ids, dtype=np.int64, casting="unsafe"),
            np.concatenate(docs, dtype=np.int64, casting="unsafe"),
            starts,
        )


@dataclass(frozen=True)
class FlatAlignment:
    """The paired positions of many rows, flat: row ``r``'s are ``student[cuts[r]:cuts[r+1]]``
    and ``teacher[...]`` (positions within the row, as :class:`RowAlignment`)."""

    student: np.ndarray
    teacher: np.ndarray
    cuts: np.ndarray

    def __len__(self) -> int:
        return len(self.cuts) - 1

    def rows(self) -> list[RowAlignment]:
        """One :class:`RowAlignment` per row (views of these arrays)."""
        c, s, t = self.cuts.tolist(), self.student, self.teacher
        return [RowAlignment(s[a:b], t[a:b]) for a, b in zip(c[:-1], c[1:], strict=True)]


def dummy_prefix(
    ids: np.ndarray, doc_ids: np.ndarray, kinds: np.ndarray, lead: np.ndarray,
    starts: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """``int64`` 1 at each position whose token carries the space a SentencePiece-style
    tokenizer writes before a text (``lead``, :attr:`~.tokenbytes.TokenBytes.lead`): the first
    token of each *run*, a run starting a row (``starts``), a document, or after a special.
    That space is not text, so the position reads one byte less. The teacher's runs are encoded
    that way (:mod:`.retokenize`); a student row cut from the middle of a text loses a space
    its first token really had, and the teacher's text of that row does not have it either."""
    first = np.zeros(len(ids), dtype=bool)
    first[starts[starts < len(ids)]] = True
    first[1:] |= (doc_ids[1:] != doc_ids[:-1]) | (kinds[ids[:-1]] != 0)
    return lead[ids] * first


def position_keys(
    ids: np.ndarray, doc_ids: np.ndarray, lengths: np.ndarray, kinds: np.ndarray,
    row: np.ndarray | None = None, starts: np.ndarray | None = None,
    lead: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """``int64`` key per position: row, document, bytes read through this token, kind of the
    next token (one row when ``starts`` is None; else ``starts``, each row's first position in
    the concatenation; ``row``, each position's row, follows from them and may be left out).

    ``lengths`` / ``kinds`` / ``lead`` are the tokenizer's per-id tables (:mod:`.tokenbytes`;
    ``lead`` for one with a dummy prefix: :func:`dummy_prefix` bytes are not read, and a next
    token that carries one is of its own kind, text *starting a run*, so it pairs only with a
    side that predicts one too: a teacher's ``▁foo`` there is the student's ``foo``, not
    ``Ġfoo``, which the vocabulary map cannot say)."""
    del row  # each position's row follows from ``starts``
    ids = np.asarray(ids, dtype=np.int64)
    doc = np.asarray(doc_ids, dtype=np.int64)
    starts = np.zeros(1, np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lens = lengths[ids].astype(np.int64, copy=False)
    drop = None if lead is None else dummy_prefix(ids, doc, kinds, lead, starts)
    if drop is not None:
        lens -= drop
    # one cumulative sum gives every position its (row, bytes read) fields: the first position
    # of a row adds the step in row number and takes back the bytes of the row before it
    filled = np.empty(len(starts), dtype=bool)  # (np.diff and np.append cost ~20 us a call)
    np.less(starts[:-1], starts[1:], out=filled[:-1])
    filled[-1] = starts[-1] < n
    rows = np.flatnonzero(filled)
    first = starts[rows]  # the first position of each non-empty row
    jump = rows << _ROW_SHIFT
    jump[1:] -= rows[:-1] << _ROW_SHIFT
    jump[1:] -= np.add.reduceat(lens, first)[:-1] << _KIND_BITS
    key = lens
    key <<= _KIND_BITS
    key[first] += jump
    torch.from_numpy(key).cumsum_(0)  # in place, ~5x faster than np.cumsum
    if np.count_nonzero(doc):
        key |= np.left_shift(doc, _DOC_SHIFT)
    key[:-1] |= kinds[ids[1:]]
    if drop is not None:  # the next token starts a run: that kind, whatever its own
        run = np.flatnonzero(drop[1:])
        key[run] = (key[run] & ~_END_KIND) | _START_KIND
    key[first[1:] - 1] |= _END_KIND  # a row's last position predicts nothing
    key[-1] |= _END_KIND
    return key


def _last_unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Unique keys (sorted) and the last position holding each (None: the keys are unique and
    sorted, position ``i`` holds key ``i``). Keys come sorted but around zero-length special
    tokens (a special's key and the one before it share their bytes), so sorted keys skip the
    sort; the rest take a stable sort (timsort: about linear on nearly sorted keys)."""
    if (keys[1:] > keys[:-1]).all():  # sorted and unique: the usual case, one pass
        return keys, None
    if (keys[1:] >= keys[:-1]).all():
        last = np.append(keys[1:] != keys[:-1], True)
        return keys[last], np.flatnonzero(last)
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    last = np.ones(len(k), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return k[last], order[last]


def _intersect(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``i, j`` with ``a[i] == b[j]`` of two sorted unique arrays of keys ``< 2**63``.

    A merge: each key gets its side in a new lowest bit and one stable sort (timsort merges
    the two sorted runs in linear time; a binary search per key costs ~4x more) puts a key
    both hold as two neighbours, ``a``'s first; a running count of ``b``'s keys gives back
    each one's index."""
    na = len(a)
    merged = np.empty(na + len(b), dtype=np.uint64)
    np.left_shift(a.view(np.uint64), 1, out=merged[:na])
    np.left_shift(b.view(np.uint64), 1, out=merged[na:])
    merged[na:] |= 1
    merged.sort(kind="stable")
    work = np.empty_like(merged)
    hit = np.flatnonzero(np.bitwise_xor(merged[1:], 1, out=work[1:]) == merged[:-1])
    from_b = np.bitwise_and(merged, 1, out=work).view(np.int64)
    torch.from_numpy(from_b).cumsum_(0)
    j = from_b[hit]
    hit -= j
    return hit, j


def _align_block(
    s: FlatRows, t: FlatRows, b0: int, b1: int,
    s_tables: tuple[np.ndarray, ...], t_tables: tuple[np.ndarray, ...],
    out: tuple[np.ndarray, np.ndarray], k: int,
) -> np.ndarray:  # fmt: skip
    """Rows ``b0:b1``: their pairs' positions within their rows written to ``out`` from ``k``
    on; each row's count of pairs."""
    s_st, t_st = s.starts[b0 : b1 + 1], t.starts[b0 : b1 + 1]
    lo_s, hi_s, lo_t, hi_t = int(s_st[0]), int(s_st[-1]), int(t_st[0]), int(t_st[-1])
    s_st, t_st = s_st[:-1] - lo_s, t_st[:-1] - lo_t
    for docs in (s.docs[lo_s:hi_s], t.docs[lo_t:hi_t]):  # keys stay in 0 .. 2**63 - 1
        if len(docs) and int(docs.max()) >= 1 << _DOC_BITS:
            raise ValueError(f"a row holds more than {1 << _DOC_BITS} documents")
        if len(docs) and int(docs.min()) < 0:
            raise ValueError("a document id is negative")
    ks, ps = _last_unique(  # tables: (lengths, kinds[, lead])
        position_keys(s.ids[lo_s:hi_s], s.docs[lo_s:hi_s], *s_tables[:2], None, s_st,
                      *s_tables[2:])
    )  # fmt: skip
    kt, pt = _last_unique(
        position_keys(t.ids[lo_t:hi_t], t.docs[lo_t:hi_t], *t_tables[:2], None, t_st,
                      *t_tables[2:])
    )  # fmt: skip
    i, j = _intersect(ks, kt)
    if ps is not None:
        i = ps[i]
    if pt is not None:
        j = pt[j]
    if ps is not None and not (i[1:] > i[:-1]).all():  # keys that were not sorted
        order = np.argsort(i, kind="stable")
        i, j = i[order], j[order]
    cut = np.searchsorted(i, s_st)  # each row's first pair (a pair stays in its row)
    per_row = np.empty_like(cut)  # (np.diff with append costs ~20 us a call)
    np.subtract(cut[1:], cut[:-1], out=per_row[:-1])
    per_row[-1] = len(i) - cut[-1]
    np.subtract(i, np.repeat(s_st, per_row), out=out[0][k : k + len(i)])
    np.subtract(j, np.repeat(t_st, per_row), out=out[1][k : k + len(i)])
    return per_row


def align_flat(
    student: FlatRows,
    teacher: FlatRows,
    student_tables: tuple[np.ndarray, ...],
    teacher_tables: tuple[np.ndarray, ...],
) -> FlatAlignment:
    """:func:`align_many` of rows held flat, with the pairs returned flat: no per-row Python
    step at all. One key computation and one sorted intersection per block of rows (about
    ``_BLOCK_POSITIONS`` student positions): a block's arrays stay in the cache, the allocator
    hands the next block the same memory, and the only fresh memory is the result (on a
    virtual machine a page fault costs about as much as 1k positions of arithmetic)."""
    n = len(student)
    if len(teacher) != n:
        raise ValueError(f"{n} student rows, {len(teacher)} teacher rows")
    size = len(student.ids)  # at most one pair per student position
    out = np.empty(size, np.int64), np.empty(size, np.int64)  # pages touched: those used
    cuts = np.zeros(n + 1, dtype=np.int64)
    b0 = 0
    while b0 < n:  # at least one row per block, at most 2**_ROW_BITS
        b1 = int(np.searchsorted(student.starts, student.starts[b0] + _BLOCK_POSITIONS, "right"))
        b1 = min(max(b1 - 1, b0 + 1), b0 + (1 << _ROW_BITS), n)
        k = int(cuts[b0])
        per_row = _align_block(student, teacher, b0, b1, student_tables, teacher_tables, out, k)
        np.cumsum(per_row, out=cuts[b0 + 1 : b1 + 1])
        cuts[b0 + 1 : b1 + 1] += k
        b0 = b1
    return FlatAlignment(out[0][: cuts[-1]], out[1][: cuts[-1]], cuts)


def align_many(
    student_rows: Sequence[tuple[np.ndarray, np.ndarray]],
    teacher_rows: Sequence[tuple[np.ndarray, np.ndarray]],
    student_tables: tuple[np.ndarray, ...],
    teacher_tables: tuple[np.ndarray, ...],
) -> list[RowAlignment]:
    """:func:`align_rows` of many rows at once (``(ids, doc_ids)`` per row, both sides):
    :func:`align_flat` of their concatenation, so the cost per row is a list entry and two
    array slices, not a few dozen numpy calls."""
    flat = align_flat(FlatRows.of(student_rows), FlatRows.of(teacher_rows), student_tables,
                      teacher_tables)  # fmt: skip
    return flat.rows()


def align_rows(
    student_ids: np.ndarray,
    student_docs: np.ndarray,
    teacher_ids: np.ndarray,
    teacher_docs: np.ndarray,
    student_tables: tuple[np.ndarray, ...],
    teacher_tables: tuple[np.ndarray, ...],
) -> RowAlignment:
    """Pair the positions of one student row and the teacher's row of the same text.

    ``*_tables`` are ``(lengths, kinds)`` per id (:class:`~.tokenbytes.TokenBytes` ``.lengths``
    and :func:`~.tokenbytes.kind_tables`), plus ``lead`` for a tokenizer with a dummy prefix
    (:func:`~.tokenbytes.align_tables` makes all of them)."""
    s_ids, t_ids = np.asarray(student_ids, np.int64), np.asarray(teacher_ids, np.int64)
    student = FlatRows(s_ids, np.asarray(student_docs, np.int64), np.array([0, len(s_ids)]))
    teacher = FlatRows(t_ids, np.asarray(teacher_docs, np.int64), np.array([0, len(t_ids)]))
    flat = align_flat(student, teacher, student_tables, teacher_tables)
    return RowAlignment(flat.student, flat.teacher)


def spans(student_lengths: np.ndarray, teacher_lengths: np.ndarray) -> np.ndarray:
    """The aligned spans of two tokenizations of the same bytes: the byte boundaries where
    both have a token boundary (``int64``, increasing, ending at the total). Span ``k`` is
    ``(b[k-1], b[k]]``; the spans cover every byte exactly once."""
    ends_s = np.cumsum(np.asarray(student_lengths, dtype=np.int64))
    ends_t = np.cumsum(np.asarray(teacher_lengths, dtype=np.int64))
    both = np.intersect1d(ends_s, ends_t)
    return both[both > 0]
