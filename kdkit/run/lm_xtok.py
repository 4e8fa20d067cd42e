"""A ``task: lm`` run whose teacher tokenizes differently: the pieces ``lm_job`` adds.

:func:`cross_tokenizer` decides (the tokenizers differ: :func:`kdkit.lm.vocab.same_tokenization`)
and builds the vocabulary map once (cached by the pair's fingerprints under
``~/.cache/kdkit/xtok``); :class:`CrossTokenizer` turns the run's datasets into
:class:`~kdkit.lm.xtok.data.XTokDataset` s and makes their collate. A same-tokenizer run gets
None and never touches :mod:`kdkit.lm.xtok` (its path stays bit for bit what it was).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.config import LMCrossTokenizerConfig, LMRunConfig
from kdkit.errors import KDError
from kdkit.lm.align import Aligner
from kdkit.lm.models import max_positions, output_head
from kdkit.lm.tokenizer import pad_id
from kdkit.lm.vocab import same_tokenization
from kdkit.lm.xtok.cached import DENSE_TAILS, XTokCacheCollate
from kdkit.lm.xtok.data import XTokCollate, XTokDataset
from kdkit.lm.xtok.target import Projection
from kdkit.lm.xtok.tokenbytes import check_alignable, token_bytes
from kdkit.lm.xtok.vocabmap import VocabMap, vocab_map

__all__ = ["CrossTokenizer", "cross_tokenizer", "map_cache_dir"]

log = logging.getLogger(__name__)


def map_cache_dir() -> Path:
    """Where vocabulary maps are kept (``$XDG_CACHE_HOME/kdkit/xtok``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdkit" / "xtok"


@dataclass
class CrossTokenizer:
    """The run's cross-tokenizer settings and the map (see :func:`cross_tokenizer`)."""

    student_tok: Any
    teacher_tok: Any
    vmap: VocabMap
    options: LMCrossTokenizerConfig
    teacher_max_length: int | None = None
    #: a top-k cache captured in the teacher's tokens (kdkit.lm.xtok.cached), else None
    cache: Any = None
    policy: str = "bucket"
    student_max_length: int = 0

    @property
    def student_vocab(self) -> int:
        return self.vmap.student_vocab

    @property
    def source_tokenizer(self) -> Any:
        """What the run's files are read with: the student's tokenizer, or, from a cache, the
        teacher's (the cache finds those rows by hash: the same text bytes)."""
        return self.teacher_tok if self.cache is not None else self.student_tok

    def wrap(self, rows: Any) -> XTokDataset | None:
        if rows is None:
            return None
        if self.cache is not None:
            return XTokDataset(
                rows, self.student_tok, self.teacher_tok, from_teacher=self.student_max_length
            )
        return XTokDataset(
            rows, self.student_tok, self.teacher_tok, teacher_max_length=self.teacher_max_length
        )

    def collate(self, student: Aligner, *datasets: Any) -> Any:
        method, weight = self.options.method, self.options.uld_weight
        if self.cache is not None:
            vmap = self.vmap.padded(self.cache.vocab)
            projection = Projection.of(vmap, method)
            return XTokCacheCollate(student, self.cache, projection, method, weight, self.policy)
        longest = max(getattr(d, "teacher_max", 2) for d in datasets if d is not None)
        aligner = Aligner(pad_id=pad_id(self.teacher_tok), max_length=max(int(longest), 2))
        return XTokCollate(student, aligner, Projection.of(self.vmap, method), method, weight)


def cross_tokenizer(
    cfg: LMRunConfig, student: Any, teacher: Any, tokenizer: Any, teacher_tok: Any
) -> CrossTokenizer | None:
    """The cross-tokenizer setup when ``teacher`` is a live model or a top-k cache whose
    tokenizer differs from the student's; None otherwise (the same-tokenizer path)."""
    cached = getattr(teacher, "fixed_rows", False)  # a TopKCache (a served teacher: no tokenizer)
    if not (isinstance(teacher, torch.nn.Module) or cached):
        return None
    if teacher_tok is None or tokenizer is None or same_tokenization(tokenizer, teacher_tok):
        return None
    if cached:
        return _from_cache(cfg, student, teacher, tokenizer, teacher_tok)
    dc = cfg.distill
    if dc.pairs:
        raise KDError(
            "the teacher's tokenizer differs from the student's: distill.pairs compares hidden "
            "states position by position, which two tokenizations do not share; drop it"
        )
    if dc.on_policy is not None and dc.on_policy.lam > 0:
        raise KDError(
            "the teacher's tokenizer differs from the student's: cross-tokenizer KD runs "
            "off-policy only; set distill.on_policy.lambda: 0"
        )
    tc = cfg.teacher
    if tc is not None and (tc.backend, tc.precision) != ("torch", "fp32"):
        raise KDError(
            "config key 'teacher.backend': a teacher of another tokenizer runs in PyTorch "
            "(backend: torch, precision: fp32) for now"
        )
    _check_pair(tokenizer, teacher_tok, student=student, teacher=teacher)
    vmap = vocab_map(teacher_tok, tokenizer, cache_dir=map_cache_dir())
    options = dc.cross_tokenizer or LMCrossTokenizerConfig()
    log.info(
        "cross-tokenizer KD (method %s): teacher vocabulary %d -> student %d, map %s",
        options.method,
        vmap.teacher_vocab,
        vmap.student_vocab,
        vmap.counts(),
    )
    return CrossTokenizer(tokenizer, teacher_tok, vmap, options, max_positions(teacher))


def _check_pair(tokenizer: Any, teacher_tok: Any, **models: Any) -> None:
    """Both tokenizers alignable, and each of ``models`` (``student=``, ``teacher=``) with a
    head as large as its tokenizer: the checks of a live teacher and of a cache, in one place."""
    tables = {"student": token_bytes(tokenizer), "teacher": token_bytes(teacher_tok)}
    for who, table in tables.items():
        check_alignable(table, who)
    for who, model in models.items():
        rows, size = output_head(model).out_features, tables[who].size
        if rows < size:
            raise KDError(
                f"the {who} head has {rows} rows but its tokenizer has {size} tokens; "
                f"resize its embeddings (model.resize_token_embeddings({size}))"
            )


def _from_cache(
    cfg: LMRunConfig, student: Any, cache: Any, tokenizer: Any, teacher_tok: Any
) -> CrossTokenizer:
    """A cache captured in the teacher's tokens, for a student of another tokenizer."""
    if cfg.data.loss_on != "all":
        raise KDError(
            "config key 'data.loss_on': cross-tokenizer KD from a cache trains every token "
            f"(loss_on: all), got {cfg.data.loss_on!r}; or use the live teacher (hf:DIR)"
        )
    cache.check_run(cfg.data, teacher_tok, cache.vocab)  # data settings as captured
    _check_pair(tokenizer, teacher_tok, student=student)  # the cache has no head
    # bucket (the default) projects the top k and keeps the tail one bucket, label puts the text's
    # token for it (lm/xtok/bucket.py); drop, and bucket / label for ULD (which sorts whole
    # distributions), become prior
    options = cfg.distill.cross_tokenizer or LMCrossTokenizerConfig()
    tail = cfg.distill.tail
    policy = tail if tail in (*DENSE_TAILS, "bucket", "label") else "prior"
    if policy in ("bucket", "label") and options.method == "uld":
        policy = "prior"
    if policy != tail:
        log.info("cross-tokenizer KD from a cache: tail %s -> %s", tail, policy)
    vmap = vocab_map(teacher_tok, tokenizer, cache_dir=map_cache_dir())
    log.info("cross-tokenizer KD from the cache %s (method %s), map %s", cache.dir,
             options.method, vmap.counts())  # fmt: skip
    return CrossTokenizer(tokenizer, teacher_tok, vmap, options, None, cache, policy,
                          cfg.data.max_length)  # fmt: skip


def vocab_map_report(
    teacher: str,
    student: str,
    *,
    data: list[str] = (),
    rows: int = 64,
    max_length: int = 256,
    trust_code: bool = False,
) -> list[str]:
    """``kdkit lm vocab-map TEACHER STUDENT``: the map's coverage over a sample of ``data``
    (the first ``rows`` rows of ``max_length`` tokens), weighted by the teacher model's
    next-token probabilities when ``teacher`` has weights (``hf:DIR`` with a config.json),
    else by the teacher tokenizer's token counts. Without ``data``: token counts only."""
    import numpy as np

    from kdkit.lm.data import load_lm_dataset
    from kdkit.lm.models import load_lm, load_tokenizer_folder
    from kdkit.lm.xtok.coverage import coverage, format_coverage

    t_tok = load_tokenizer_folder(_folder(teacher), required=True, trust_code=trust_code)
    s_tok = load_tokenizer_folder(_folder(student), required=True, trust_code=trust_code)
    vmap = vocab_map(t_tok, s_tok, cache_dir=map_cache_dir())
    t_bytes = token_bytes(t_tok)
    note = _prefix_note(t_bytes, token_bytes(s_tok))
    if not data:
        c = coverage(vmap, np.ones(vmap.teacher_vocab), t_bytes, source="one per token",
                     positions=0)  # fmt: skip
        return [f"map: {vmap.counts()}"] + format_coverage(c)[1:5] + note
    ds = load_lm_dataset(list(data), t_tok, max_length=max_length, overflow="split")
    sample = [ds[i] for i in range(min(rows, len(ds)))]
    mass = np.zeros(vmap.teacher_vocab)
    positions = sum(len(r) for r in sample)
    folder = _folder(teacher)
    if (folder / "config.json").is_file() and not teacher.startswith("hf-config:"):
        model, _ = load_lm(f"hf:{folder}", trust_code=trust_code)
        model.eval()
        source = "teacher model"
        with torch.no_grad():
            for r in sample:
                logits = model(input_ids=r.input_ids[None]).logits[0]  # the model's own
                p = torch.softmax(logits.float(), -1)[:, : vmap.teacher_vocab]
                mass[: p.shape[1]] += p.sum(0).double().numpy()
    else:
        source = "token counts"
        for r in sample:
            mass += np.bincount(r.input_ids.numpy(), minlength=vmap.teacher_vocab)[
                : vmap.teacher_vocab
            ]
    c = coverage(vmap, mass, t_bytes, source=source, positions=positions)
    return [f"map: {vmap.counts()}"] + format_coverage(c) + note


def _prefix_note(teacher: Any, student: Any) -> list[str]:
    """A line when one side writes a space before every text (a dummy prefix) and the other
    does not: the map holds inside a text; the first token of a text is not distilled."""
    if teacher.prepends_space == student.prepends_space:
        return []
    who = "teacher" if teacher.prepends_space else "student"
    return [
        f"the {who} writes a space before every text (a dummy prefix), the other does not: "
        "the map holds inside a text; the position that predicts a text's first token is "
        "not paired (it trains on the text)"
    ]


def _folder(spec: str) -> Path:
    """The folder of ``hf:DIR``, ``hf-config:DIR`` or a plain ``DIR``."""
    for prefix in ("hf:", "hf-config:"):
        spec = spec.removeprefix(prefix)
    return Path(spec).expanduser()
