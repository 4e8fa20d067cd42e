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

A key seen twice on one side (two specials of one class in a row) keeps its last position, the
one that has read the most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RowAlignment", "align_rows", "position_keys", "spans"]

_KIND_BITS = 12
_BYTE_BITS = 36
_END_KIND = (1 << _KIND_BITS) - 1  # the row's last position predicts nothing


@dataclass(frozen=True)
class RowAlignment:
    """Paired positions of one row: ``student[k]`` and ``teacher[k]`` (``int64``, increasing)
    predict from the same text prefix."""

    student: np.ndarray
    teacher: np.ndarray

    def __len__(self) -> int:
        return int(self.student.shape[0])


def position_keys(
    ids: np.ndarray, doc_ids: np.ndarray, lengths: np.ndarray, kinds: np.ndarray
) -> np.ndarray:
    """``int64`` key per position: document, bytes read through this token, kind of the next.

    ``lengths`` / ``kinds`` are the tokenizer's per-id tables (:mod:`.tokenbytes`)."""
    ids = np.asarray(ids, dtype=np.int64)
    doc = np.asarray(doc_ids, dtype=np.int64)
    ends = np.cumsum(lengths[ids])
    nxt = np.empty_like(ids)
    nxt[:-1] = kinds[ids[1:]]
    nxt[-1:] = _END_KIND
    return (doc << (_BYTE_BITS + _KIND_BITS)) | (ends << _KIND_BITS) | nxt


def _last_unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys (sorted) and the last position holding each."""
    rev = keys[::-1]
    uniq, first_in_rev = np.unique(rev, return_index=True)
    return uniq, len(keys) - 1 - first_in_rev


def align_rows(
    student_ids: np.ndarray,
    student_docs: np.ndarray,
    teacher_ids: np.ndarray,
    teacher_docs: np.ndarray,
    student_tables: tuple[np.ndarray, np.ndarray],
    teacher_tables: tuple[np.ndarray, np.ndarray],
) -> RowAlignment:
    """Pair the positions of one student row and the teacher's row of the same text.

    ``*_tables`` are ``(lengths, kinds)`` per id (:class:`~.tokenbytes.TokenBytes` ``.lengths``
    and :func:`~.tokenbytes.kind_tables`)."""
    ks, ps = _last_unique(position_keys(student_ids, student_docs, *student_tables))
    kt, pt = _last_unique(position_keys(teacher_ids, teacher_docs, *teacher_tables))
    _, i_s, i_t = np.intersect1d(ks, kt, assume_unique=True, return_indices=True)
    s, t = ps[i_s], pt[i_t]
    order = np.argsort(s, kind="stable")
    return RowAlignment(s[order].astype(np.int64), t[order].astype(np.int64))


def spans(student_lengths: np.ndarray, teacher_lengths: np.ndarray) -> np.ndarray:
    """The aligned spans of two tokenizations of the same bytes: the byte boundaries where
    both have a token boundary (``int64``, increasing, ending at the total). Span ``k`` is
    ``(b[k-1], b[k]]``; the spans cover every byte exactly once."""
    ends_s = np.cumsum(np.asarray(student_lengths, dtype=np.int64))
    ends_t = np.cumsum(np.asarray(teacher_lengths, dtype=np.int64))
    both = np.intersect1d(ends_s, ends_t)
    return both[both > 0]
