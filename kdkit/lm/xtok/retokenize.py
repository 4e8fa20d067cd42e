"""The teacher's tokens for a student row: the same text bytes, in the teacher's own tokens.

A student row (:class:`~kdkit.lm.data.TokenRow`) may hold several documents (packing), a
truncated document, specials (BOS, EOS, chat markers). Its text is read back from the student's
token-bytes table (no ``decode``), cut at its special tokens, and each text run is encoded by
the teacher (``add_special_tokens=False``; one batched call per row). Specials are carried over
by class (:mod:`.tokenbytes`): an EOS becomes the teacher's EOS, a chat marker the teacher's
token of the same string, a BOS the teacher's BOS (dropped when it has none). No BOS is added
where the row has none: a row cut from the middle of a text (``overflow: split``) has no BOS,
and a BOS at every row start would teach a student that every row starts a text (measured: a
student trained from a cache with a BOS added at every row scored worse than scratch on test
rows that mostly start mid-text). A special the teacher lacks is left out (it stands for no
text). A run cut inside a multi-byte
character (truncation) keeps its complete characters; the bytes of the cut one have no teacher
token and pair with nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdkit.lm.xtok.tokenbytes import TokenBytes

__all__ = ["teacher_ids"]


def _valid_prefix(data: bytes) -> str:
    """The longest prefix of ``data`` that is whole UTF-8 characters, decoded."""
    for cut in range(4):
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode(
        "utf-8", errors="ignore"
    )  # pragma: no cover - invalid inside, not at the end


def teacher_ids(
    ids: np.ndarray,
    doc_ids: np.ndarray,
    student: TokenBytes,
    teacher: TokenBytes,
    teacher_tokenizer: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """``(teacher ids, teacher doc ids)`` for one student row (``int64``)."""
    ids = np.asarray(ids, dtype=np.int64)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    by_class = {cls: tid for tid, cls in teacher.special_class.items()}
    is_special = np.zeros(student.size, dtype=bool)
    is_special[list(student.special_class)] = True
    special = is_special[ids]
    # runs: a new one at every special token, at every token after one and at every new document
    cut = np.ones(len(ids), dtype=bool)
    cut[1:] = special[1:] | special[:-1] | (doc_ids[1:] != doc_ids[:-1])
    starts = np.flatnonzero(cut)
    ends = np.append(starts[1:], len(ids))
    texts, plan = [], []  # plan: ("text", k) | ("id", teacher id), with the run's document
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        doc = int(doc_ids[a])
        if special[a]:
            cls = student.special_class[int(ids[a])]
            tid = teacher.bos_id if cls == "bos" else by_class.get(cls)
            if tid is not None:
                plan.append((tid, doc))
            continue
        plan.append((("text", len(texts)), doc))
        texts.append(_valid_prefix(student.text_bytes(ids[a:b])))
    encoded = teacher_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out_ids: list[np.ndarray] = []
    out_doc: list[np.ndarray] = []
    for what, doc in plan:
        if isinstance(what, tuple):
            piece = np.asarray(encoded[what[1]], dtype=np.int64)
        else:
            piece = np.asarray([what], dtype=np.int64)
        out_ids.append(piece)
        out_doc.append(np.full(len(piece), doc, dtype=np.int64))
    if not out_ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_ids), np.concatenate(out_doc)
