"""The vocabulary side of a ``task: lm`` run: which tokens the loss compares, and their bytes.

Three paths, chosen once per run by :func:`vocab_pairing`: the same tokenizer (the real vocab
both heads share: :func:`shared_vocab`, padded heads masked), a top-k cache of the student's
tokens (the cache checks the run), or a teacher (live or cached) of another tokenizer
(:func:`kdkit.run.lm_xtok.cross_tokenizer`, :mod:`kdkit.lm.xtok`). :func:`eval_byte_lengths`
gives evaluation its bits per byte.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kdkit.config import LMRunConfig
from kdkit.errors import KDError
from kdkit.lm.models import output_head
from kdkit.lm.vocab import check_vocab
from kdkit.lm.xtok.tokenbytes import token_bytes
from kdkit.run.lm_xtok import CrossTokenizer, cross_tokenizer

__all__ = ["eval_byte_lengths", "shared_vocab", "vocab_pairing"]

log = logging.getLogger(__name__)


def vocab_pairing(
    cfg: LMRunConfig, student: Any, teacher: Any, tokenizer: Any, teacher_tok: Any
) -> tuple[CrossTokenizer | None, int | None]:
    """``(cross-tokenizer setup or None, vocab_size of the loss)`` for a run's student and
    teacher (a model, a top-k cache, a served teacher or None); a cache of the student's own
    tokens is checked against the run here."""
    xtok = cross_tokenizer(cfg, student, teacher, tokenizer, teacher_tok)
    if xtok is not None:
        return xtok, xtok.student_vocab
    if teacher is not None and not isinstance(teacher, torch.nn.Module):
        teacher.check_run(cfg.data, tokenizer, output_head(student).out_features)
        return None, None
    return None, shared_vocab(student, teacher, tokenizer, teacher_tok)


def eval_byte_lengths(tokenizer: Any) -> torch.Tensor | None:
    """The run's per-token byte counts (:attr:`kdkit.lm.xtok.tokenbytes.TokenBytes.lengths`: the
    numbers of :func:`kdkit.lm.tokenizer.token_byte_lengths`, one table with the alignment's),
    so evaluation reports bits per byte beside perplexity; None (logged) for a tokenizer without
    a tokenizer.json: the run goes on with perplexity alone.

    A tokenizer that writes a space before every text (SentencePiece's dummy prefix:
    Llama-2, Mistral) gets ``[2, ids]``: row 1 is each id's bytes less that space when it
    starts with one (:attr:`kdkit.lm.xtok.tokenbytes.TokenBytes.lead`), the count of a text's
    first token after BOS or a special, so the prefix is not scored as text (the rule the
    cross-tokenizer alignment reads it by)."""
    if tokenizer is None:
        return None
    try:
        tb = token_bytes(tokenizer)  # the table the cross-tokenizer alignment reads
    except KDError as e:
        log.warning("no bits per byte: %s", e)
        return None
    table = torch.from_numpy(tb.lengths.copy())
    if tb.lead is None:
        return table
    return torch.stack([table, table - torch.from_numpy(tb.lead)])


def shared_vocab(student: Any, teacher: Any, tokenizer: Any, teacher_tokenizer: Any) -> int | None:
    """The real vocabulary a student and a live teacher share (``vocab_size`` of the loss), or
    None when their heads have the same rows and there is nothing to mask. Padded heads (more
    rows than the tokenizer, e.g. Qwen2.5 7B vs 0.5B) need it: every path that pairs the two
    models (``kdkit train``, ``kdkit eval``) asks here."""
    if not isinstance(teacher, torch.nn.Module):
        return None
    s_rows, t_rows = output_head(student).out_features, output_head(teacher).out_features
    if tokenizer is not None and teacher_tokenizer is not None:
        return check_vocab(tokenizer, teacher_tokenizer, s_rows, t_rows)
    if s_rows != t_rows:
        tok = tokenizer or teacher_tokenizer
        if tok is None:
            raise KDError(
                f"the student head has {s_rows} rows and the teacher's {t_rows}, and there is no "
                "tokenizer to say which are real; set student.tokenizer: DIR"
            )
        return check_vocab(tok, tok, s_rows, t_rows)
    return None
