"""The vocabulary check between student and teacher: the shared real vocab size, or an error.

Vocab mismatch is the most common LM-KD complaint, almost always the padded-head case
(Qwen2.5-7B's head has 152064 rows, 0.5B/3B 151936, one tokenizer of 151665 tokens): TRL raises,
DistillKit truncates silently, Liger pads with zeros, torchtune and ModelOpt crash with a shape
error (shared/LM-ANCHORS.md finding 7). kdkit verifies that the two tokenizers are the same (token
strings id by id, then merges and normalizer) and returns ``len(tokenizer)``: the loss slices both
heads to that many rows (rows past it are padding that no text produces). Tokenizers that differ
(:func:`same_tokenization` is False) take the cross-tokenizer path instead (:mod:`kdkit.lm.xtok`),
which ``kdkit train`` chooses by itself; same-tokenizer runs never go there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from kdkit.errors import KDError
from kdkit.lm.tokenizer import tokenizer_json

__all__ = [
    "check_borrowed_tokenizer",
    "check_vocab",
    "same_tokenization",
    "tokenization_fingerprint",
]

log = logging.getLogger(__name__)

_TOKENIZATION_KEYS = ("model", "normalizer", "pre_tokenizer", "added_tokens")


def tokenization_fingerprint(tokenizer: Any) -> str:
    """sha256 of what :func:`check_vocab` compares beyond the vocabulary (tokenizer.json's
    model, normalizer, pre-tokenizer and added tokens), so two tokenizers can be compared on
    two machines; ``""`` for a tokenizer without a tokenizer.json."""
    try:
        data = tokenizer_json(tokenizer)
    except KDError:
        return ""
    picked = {key: data.get(key) for key in _TOKENIZATION_KEYS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def same_tokenization(student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """True when the two tokenizers have the same vocabulary and split text alike (the
    same-tokenizer path, bit for bit); False sends a run across tokenizers."""
    if student_tokenizer is teacher_tokenizer:
        return True
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        return False
    s_json, t_json = tokenizer_json(student_tokenizer), tokenizer_json(teacher_tokenizer)
    return all(s_json.get(k) == t_json.get(k) for k in _TOKENIZATION_KEYS)


def _first_difference(s_vocab: dict[str, int], t_vocab: dict[str, int]) -> tuple[int, str, str]:
    s_inv = {i: t for t, i in s_vocab.items()}
    t_inv = {i: t for t, i in t_vocab.items()}
    for i in sorted(set(s_inv) | set(t_inv)):
        if s_inv.get(i) != t_inv.get(i):
            return i, s_inv.get(i, "<none>"), t_inv.get(i, "<none>")
    raise AssertionError("vocabularies differ but no id does")  # pragma: no cover


def check_vocab(
    student_tokenizer: Any, teacher_tokenizer: Any, student_rows: int, teacher_rows: int
) -> int:
    """The real vocab size both heads share, to pass to the loss as ``vocab_size``.

    ``student_rows`` / ``teacher_rows`` are the heads' output rows (``head.out_features``),
    which may exceed the tokenizer (padded heads). Raises KDError if the tokenizers differ
    (that pair takes :mod:`kdkit.lm.xtok`) or a head has fewer rows than the tokenizer.
    """
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        i, s_tok, t_tok = _first_difference(s_vocab, t_vocab)
        raise KDError(
            f"student and teacher tokenizers differ (sizes {len(s_vocab)} vs {len(t_vocab)}; "
            f"first at id {i}: {s_tok!r} vs {t_tok!r}); distil across tokenizers with "
            "kdkit.lm.xtok (kdkit train chooses it by itself when the tokenizers differ)"
        )
    s_json, t_json = tokenizer_json(student_tokenizer), tokenizer_json(teacher_tokenizer)
    for key in _TOKENIZATION_KEYS:
        if s_json.get(key) != t_json.get(key):
            raise KDError(
                f"student and teacher tokenizers have the same vocabulary but a different "
                f"{key!r} in tokenizer.json, so they split text differently; use one tokenizer"
            )
    n = len(student_tokenizer)
    if max(s_vocab.values(), default=-1) >= n:
        raise KDError(f"the tokenizer has ids up to {max(s_vocab.values())} but len() {n}")
    for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < n:
            raise KDError(
                f"the {who} head has {rows} rows but the tokenizer has {n} tokens; "
                f"resize its embeddings (model.resize_token_embeddings({n}))"
            )
    if student_rows != teacher_rows:
        log.info(
            "padded heads (student %d, teacher %d rows): distilling the %d real tokens",
            student_rows,
            teacher_rows,
            n,
        )
    return n


def check_borrowed_tokenizer(spec: str, head_rows: int, tokenizer: Any) -> None:
    """A student folder without a tokenizer takes the teacher's only when its head has a row
    per token: a randomly initialised head of 2,048 rows under a 600-token tokenizer would
    train 600 rows and export a model that samples ids no tokenizer decodes (issue 38).
    Padded heads stay possible, on purpose: name the tokenizer (``student.tokenizer``)."""
    n = len(tokenizer)
    if head_rows == n:
        log.info("%s has no tokenizer of its own: it takes the teacher's (%d tokens)", spec, n)
        return
    more = head_rows > n
    raise KDError(
        f"the student {spec} has no tokenizer and would take the teacher's ({n:,} tokens), "
        f"but its head has {head_rows:,} rows: "
        + (
            f"{head_rows - n:,} rows would never be trained and the exported model could emit "
            "ids no tokenizer decodes"
            if more
            else f"ids {head_rows:,} and up have no row"
        )
        + f"; set vocab_size: {n} in its config.json, or name the tokenizer it was meant for "
        "(student.tokenizer: DIR, which also accepts a padded head on purpose)"
    )
