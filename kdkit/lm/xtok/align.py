"""Which student position and which teacher position predict from the same text prefix.

Position ``i`` of a row predicts token ``i + 1`` after reading tokens ``0..i``. A student
position and a teacher position can be compared when both have read the same text, i.e. the
same bytes, and both are about to predict the same *kind* of thing: text, or the same special
token (an EOS, a chat marker). So each position gets a key ``(document, bytes read, kind of
the next token)`` and the pairs are the keys both sides have: one sorted intersection per row
(``np.intersect1d``), no per-token Python and no ``decode``. Between two consecutive paired
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
one that has read the most. :func:`align_many` aligns a whole dataset's rows in one pass (the row
is part of the key), which is what the data pipeline calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RowAlignment", "align_many", "align_rows", "dummy_prefix", "position_keys", "spans"]

_KIND_BITS = 12  # special classes per pair of tokenizers
_BYTE_BITS = 24  # bytes per row (16 MiB)
_DOC_BITS = 12  # documents per row
_ROW_BITS = 63 - _KIND_BITS - _BYTE_BITS - _DOC_BITS  # rows per call (32k; more: in blocks)
_END_KIND = (1 << _KIND_BITS) - 1  # the row's last position predicts nothing
_START_KIND = _END_KIND - 1  # the next token starts a run with a dummy prefix (position_keys)


@dataclass(frozen=True)
class RowAlignment:
    """Paired positions of one row: ``student[k]`` and ``teacher[k]`` (``int64``, increasing)
    predict from the same text prefix."""

    student: np.ndarray
    teacher: np.ndarray

    def __len__(self) -> int:
        return int(self.student.shape[0])


def _concat(rows: Sequence[tuple[np.ndarray, np.ndarray]]):
    """Concatenated ids and docs, each position's row, and each row's start."""
    sizes = np.fromiter((len(r[0]) for r in rows), dtype=np.int64, count=len(rows))
    starts = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    ids = np.concatenate([np.asarray(r[0], dtype=np.int64) for r in rows])
    docs = np.concatenate([np.asarray(r[1], dtype=np.int64) for r in rows])
    row = np.repeat(np.arange(len(rows), dtype=np.int64), sizes)
    return ids, docs, row, starts, sizes


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
    next token (one row when ``row`` is None; else ``row`` / ``starts`` from the concatenation).

    ``lengths`` / ``kinds`` / ``lead`` are the tokenizer's per-id tables (:mod:`.tokenbytes`;
    ``lead`` for one with a dummy prefix: :func:`dummy_prefix` bytes are not read, and a next
    token that carries one is of its own kind, text *starting a run*, so it pairs only with a
    side that predicts one too: a teacher's ``▁foo`` there is the student's ``foo``, not
    ``Ġfoo``, which the vocabulary map cannot say)."""
    ids = np.asarray(ids, dtype=np.int64)
    doc = np.asarray(doc_ids, dtype=np.int64)
    if row is None:
        row, starts = np.zeros(len(ids), dtype=np.int64), np.zeros(1, dtype=np.int64)
    lens = lengths[ids]
    drop = None if lead is None else dummy_prefix(ids, doc, kinds, lead, starts)
    ends = np.cumsum(lens if drop is None else lens - drop)
    before = np.concatenate([[0], ends])[starts]  # bytes of the rows before each row
    ends -= before[row]
    nxt = np.full_like(ids, _END_KIND)
    nxt[:-1] = kinds[ids[1:]]
    if drop is not None:
        nxt[:-1][drop[1:] > 0] = _START_KIND
    last = np.append(starts[1:], len(ids)) - 1  # each row's last position predicts nothing
    nxt[last[last >= 0]] = _END_KIND
    key = (row << (_DOC_BITS + _BYTE_BITS + _KIND_BITS)) | (doc << (_BYTE_BITS + _KIND_BITS))
    return key | (ends << _KIND_BITS) | nxt


def _last_unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys (sorted) and the last position holding each. Keys come nearly sorted (they
    fall out of order only around zero-length special tokens), which a stable sort (timsort)
    takes in about linear time."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    last = np.ones(len(k), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return k[last], order[last]


def _intersect(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``i, j`` with ``a[i] == b[j]`` of two sorted unique arrays."""
    j = np.searchsorted(b, a)
    j[j == len(b)] = 0
    hit = (b[j] == a) if len(b) else np.zeros(len(a), dtype=bool)
    return np.flatnonzero(hit), j[hit]


def align_many(
    student_rows: Sequence[tuple[np.ndarray, np.ndarray]],
    teacher_rows: Sequence[tuple[np.ndarray, np.ndarray]],
    student_tables: tuple[np.ndarray, ...],
    teacher_tables: tuple[np.ndarray, ...],
) -> list[RowAlignment]:
    """:func:`align_rows` of many rows at once (``(ids, doc_ids)`` per row, both sides): one
    key computation and one sorted intersection for every row together, so the cost per row is
    a few array slices, not a few dozen numpy calls (rows of 128 tokens: 10-20x faster)."""
    out: list[RowAlignment] = []
    block = 1 << _ROW_BITS
    for b0 in range(0, len(student_rows), block):
        s_rows, t_rows = student_rows[b0 : b0 + block], teacher_rows[b0 : b0 + block]
        ids_s, docs_s, row_s, st_s, _ = _concat(s_rows)
        ids_t, docs_t, row_t, st_t, _ = _concat(t_rows)
        for ends, what in ((docs_s, "documents"), (docs_t, "documents")):
            if len(ends) and int(ends.max()) >= 1 << _DOC_BITS:
                raise ValueError(f"a row holds more than {1 << _DOC_BITS} {what}")
        ks, ps = _last_unique(  # tables: (lengths, kinds[, lead])
            position_keys(ids_s, docs_s, *student_tables[:2], row_s, st_s, *student_tables[2:])
        )
        kt, pt = _last_unique(
            position_keys(ids_t, docs_t, *teacher_tables[:2], row_t, st_t, *teacher_tables[2:])
        )
        i_s, i_t = _intersect(ks, kt)
        s, t = ps[i_s], pt[i_t]
        order = np.argsort(s, kind="stable")
        s, t = s[order], t[order]
        rows = row_s[s]
        cuts = np.searchsorted(rows, np.arange(len(s_rows) + 1))
        local_s, local_t = s - st_s[rows], t - st_t[row_t[t]]
        out += [
            RowAlignment(local_s[a:b], local_t[a:b])
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        ]
    return out


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
    return align_many(
        [(student_ids, student_docs)], [(teacher_ids, teacher_docs)], student_tables,
        teacher_tables,
    )[0]  # fmt: skip


def spans(student_lengths: np.ndarray, teacher_lengths: np.ndarray) -> np.ndarray:
    """The aligned spans of two tokenizations of the same bytes: the byte boundaries where
    both have a token boundary (``int64``, increasing, ending at the total). Span ``k`` is
    ``(b[k-1], b[k]]``; the spans cover every byte exactly once."""
    ends_s = np.cumsum(np.asarray(student_lengths, dtype=np.int64))
    ends_t = np.cumsum(np.asarray(teacher_lengths, dtype=np.int64))
    both = np.intersect1d(ends_s, ends_t)
    return both[both > 0]
