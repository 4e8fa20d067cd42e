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
text) and the text around it is one run. With a dummy prefix (SentencePiece: a space written
before every text) the text is read less the student's, and every teacher run carries its own
(:func:`~.align.dummy_prefix`, docs/lm-xtok.md). A run cut inside a multi-byte
character (truncation) keeps its complete characters; the bytes of the cut one have no teacher
token and pair with nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdkit.errors import KDError
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


def _run_bytes(ids: np.ndarray, table: TokenBytes) -> bytes:
    """The text of one run of ``table``'s tokens: its bytes less the dummy prefix its first
    token carries (:func:`~.align.dummy_prefix`: every run starts a run)."""
    data = table.text_bytes(ids)
    return data[1:] if table.lead is not None and len(ids) and table.lead[ids[0]] else data


def _encode(tokenizer: Any, table: TokenBytes, texts: list[str]) -> list[list[int]]:
    """The teacher's ids of each text run. With a dummy prefix (:attr:`TokenBytes.lead`),
    every run must start with it, as the alignment reads it off: a text that starts with a
    space gets none from Metaspace's ``prepend_scheme: first`` (measured, tokenizers 0.23:
    ``" hello"`` -> ``▁ he llo``, as ``"hello"``), so it is encoded with one more space
    before it (``▁ ▁ he llo``: SentencePiece's own ``add_dummy_prefix`` tokens)."""
    if not texts:
        return []
    encoded = [list(e) for e in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if table.lead is None:
        return encoded

    def ok(k: int) -> bool:
        e = np.asarray(encoded[k], dtype=np.int64)
        return _run_bytes(e, table) == texts[k].encode() and len(e) > 0 and bool(table.lead[e[0]])

    again = [k for k in range(len(texts)) if not ok(k)]
    if again:
        redo = tokenizer([" " + texts[k] for k in again], add_special_tokens=False)["input_ids"]
        for k, e in zip(again, redo, strict=True):
            encoded[k] = list(e)
            if not ok(k):
                raise KDError(
                    f"the teacher tokenizer does not spell {texts[k][:40]!r} as its text after "
                    "one dummy-prefix space (a normalizer that rewrites text, or an unknown "
                    "token without byte fallback): its byte offsets would not be the text's"
                )
    return encoded


def teacher_ids(
    ids: np.ndarray,
    doc_ids: np.ndarray,
    student: TokenBytes,
    teacher: TokenBytes,
    teacher_tokenizer: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """``(teacher ids, teacher doc ids)`` for one student row (``int64``).

    The row's text is the student's bytes less its dummy prefixes; a special the teacher lacks
    joins the text around it into one run, so every teacher run begins after a row start, a
    document start or a teacher special, where the alignment looks for the teacher's prefix."""
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
    texts: list[bytes] = []
    plan: list = []  # (("text", k) | teacher id, document)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        doc = int(doc_ids[a])
        if special[a]:
            cls = student.special_class[int(ids[a])]
            tid = teacher.bos_id if cls == "bos" else by_class.get(cls)
            if tid is not None:
                plan.append((tid, doc))
            continue
        data = _run_bytes(ids[a:b], student)
        if plan and isinstance(plan[-1][0], tuple) and plan[-1][1] == doc:
            texts[plan[-1][0][1]] += data  # only a dropped special lay between
            continue
        plan.append((("text", len(texts)), doc))
        texts.append(data)
    decoded = [_valid_prefix(t) for t in texts]
    todo = [k for k, t in enumerate(decoded) if t]
    encoded: list[list[int]] = [[] for _ in decoded]
    for k, e in zip(
        todo, _encode(teacher_tokenizer, teacher, [decoded[k] for k in todo]), strict=True
    ):
        encoded[k] = e
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
