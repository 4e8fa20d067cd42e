"""The sparse teacher-to-student vocabulary map, built once per pair and cached by fingerprints.

The teacher's next-token distribution is over its own vocabulary; the student's next token is
the *first student token* of whatever text comes next. So each teacher token ``t`` is sent to
the student token its text starts with (X-Token's projection, arXiv 2605.21699, restricted to
the first-token mass; Boizard et al.'s ULD takes what cannot be sent):

- **exact**: the student has a token with exactly ``t``'s bytes (after the byte-level /
  SentencePiece alphabets are undone: ``Ġ`` and ``▁`` are both a space, ``<0xNN>`` a byte).
- **decomposed**: otherwise, the first token of the student's own encoding of ``t``'s text
  (a teacher ``Ġ123`` to a digit-splitting student's ``Ġ``), or, when ``t`` is part of a
  multi-byte character (not valid UTF-8 alone), the student's longest token that is a prefix.
  The map says what the student writes *inside* a text: a student's dummy prefix (the space a
  SentencePiece-style tokenizer writes before every text) is taken off its encoding. At the
  first token of a text the map would be wrong where one side writes that prefix (a teacher
  ``▁foo`` there is the student's ``foo``, not ``Ġfoo``): those positions are not paired
  (:func:`~.align.position_keys`).
- **special**: specials by class (:mod:`.tokenbytes`): EOS to EOS, a chat marker to the same
  marker; a special the student lacks (a BOS it never predicts) stays **unmapped**.

The map is ``first[Vt]`` (student id or -1) and ``kind[Vt]``; a projection is one
``index_add`` over the teacher's vocabulary. Built in ~1 s for 150k tokens (one batched encode),
it is cached in memory and, given ``cache_dir``, on disk as ``<teacher fp>-<student fp>.npz``
(:func:`kdkit.lm.vocab.tokenization_fingerprint` plus the specials' classes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.lm.vocab import tokenization_fingerprint
from kdkit.lm.xtok.tokenbytes import TokenBytes, token_bytes

__all__ = ["EXACT", "DECOMPOSED", "SPECIAL", "UNMAPPED", "VocabMap", "vocab_map"]

log = logging.getLogger(__name__)

UNMAPPED, EXACT, DECOMPOSED, SPECIAL = 0, 1, 2, 3
KIND_NAMES = {UNMAPPED: "unmapped", EXACT: "exact", DECOMPOSED: "decomposed", SPECIAL: "special"}
_FORMAT = 2  # 2: a student's dummy prefix is taken off (decomposed)
_MEMO: dict[str, VocabMap] = {}


@dataclass(frozen=True)
class VocabMap:
    """Teacher id -> student id (``first``, -1 = unmapped) and how (``kind``), ``pieces`` the
    number of student tokens the teacher token's text takes (1 for exact)."""

    first: np.ndarray
    kind: np.ndarray
    pieces: np.ndarray
    student_vocab: int
    key: str

    @property
    def teacher_vocab(self) -> int:
        return int(self.first.shape[0])

    def only_exact(self) -> VocabMap:
        """The map GOLD's exact-match split uses: decomposed tokens count as unmapped."""
        keep = (self.kind == EXACT) | (self.kind == SPECIAL)
        first = np.where(keep, self.first, -1)
        kind = np.where(keep, self.kind, UNMAPPED)
        return VocabMap(first, kind, self.pieces, self.student_vocab, self.key + "-exact")

    def padded(self, teacher_rows: int) -> VocabMap:
        """The map over ``teacher_rows`` ids (a padded teacher head: the extra ids unmapped)."""
        extra = teacher_rows - self.teacher_vocab
        if extra <= 0:
            return self
        first = np.concatenate([self.first, np.full(extra, -1, np.int64)])
        kind = np.concatenate([self.kind, np.zeros(extra, np.int8)])
        pieces = np.concatenate([self.pieces, np.zeros(extra, np.int32)])
        return VocabMap(first, kind, pieces, self.student_vocab, self.key)

    def counts(self) -> dict[str, int]:
        return {name: int((self.kind == k).sum()) for k, name in KIND_NAMES.items()}


def _key(teacher: Any, student: Any, t: TokenBytes, s: TokenBytes) -> str:
    h = hashlib.sha256(f"xtok-map-v{_FORMAT}".encode())
    for tok, table in ((teacher, t), (student, s)):
        h.update(tokenization_fingerprint(tok).encode())
        h.update(json.dumps(sorted(table.special_class.items())).encode())
        h.update(str(table.size).encode())
    return h.hexdigest()[:32]


def _inside_a_text(s: TokenBytes, ids: np.ndarray, text: bytes) -> np.ndarray | None:
    """The student's tokens of ``text`` as they stand inside a text: its own encoding, less
    the dummy prefix a SentencePiece-style student writes before it (``▁``, a token of its
    own, is dropped); None where that space merged with the text (``▁foo``), which leaves the
    longest student token that is a prefix of ``text``."""
    if s.lead is None or not len(ids) or not s.lead[ids[0]] or s.text_bytes(ids) == text:
        return ids
    return ids[1:] if s.piece(int(ids[0])) == b" " else None


def _build(teacher: Any, student: Any, t: TokenBytes, s: TokenBytes, key: str) -> VocabMap:
    vt = t.size
    first = np.full(vt, -1, dtype=np.int64)
    kind = np.zeros(vt, dtype=np.int8)
    pieces = np.zeros(vt, dtype=np.int32)
    student_by_bytes: dict[bytes, int] = {}
    for sid in np.flatnonzero(s.lengths > 0).tolist():
        student_by_bytes.setdefault(s.piece(sid), sid)
    by_class = {cls: sid for sid, cls in s.special_class.items()}
    texts, text_ids, partial = [], [], []
    for tid in range(vt):
        if tid in t.special_class:
            sid = by_class.get(t.special_class[tid])
            if sid is not None:
                first[tid], kind[tid], pieces[tid] = sid, SPECIAL, 1
            continue
        b = t.piece(tid)
        if not b:
            continue  # an unused id
        sid = student_by_bytes.get(b)
        if sid is not None:
            first[tid], kind[tid], pieces[tid] = sid, EXACT, 1
            continue
        try:
            texts.append(b.decode("utf-8"))
            text_ids.append(tid)
        except UnicodeDecodeError:
            partial.append(tid)
    if texts:
        encoded = student(texts, add_special_tokens=False)["input_ids"]
        for tid, ids in zip(text_ids, encoded, strict=True):
            ids = _inside_a_text(s, np.asarray(ids, dtype=np.int64), t.piece(tid))
            if ids is None:
                partial.append(tid)
            elif len(ids):
                first[tid], kind[tid], pieces[tid] = int(ids[0]), DECOMPOSED, len(ids)
    longest = max((len(b) for b in student_by_bytes), default=0)
    for tid in partial:  # part of a character: the longest student token that is a prefix
        b = t.piece(tid)
        for n in range(min(len(b), longest), 0, -1):
            sid = student_by_bytes.get(b[:n])
            if sid is not None:
                first[tid], kind[tid] = sid, DECOMPOSED
                pieces[tid] = 1 + (len(b) - n)  # at most one byte token per byte left
                break
    return VocabMap(first, kind, pieces, s.size, key)


def _save(path: Path, m: VocabMap) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    np.savez(tmp, first=m.first, kind=m.kind, pieces=m.pieces, student_vocab=m.student_vocab)
    os.replace(tmp, path)


def vocab_map(
    teacher: Any, student: Any, *, cache_dir: str | os.PathLike[str] | None = None
) -> VocabMap:
    """The map from ``teacher``'s vocabulary to ``student``'s (Hugging Face fast tokenizers),
    from memory, from ``cache_dir`` or built (then saved there)."""
    t, s = token_bytes(teacher), token_bytes(student)
    key = _key(teacher, student, t, s)
    if key in _MEMO:
        return _MEMO[key]
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as z:
            m = VocabMap(z["first"], z["kind"], z["pieces"], int(z["student_vocab"]), key)
    else:
        m = _build(teacher, student, t, s, key)
        if path is not None:
            _save(path, m)
        log.info("vocabulary map %s: %s", key, m.counts())
    _MEMO[key] = m
    return m
