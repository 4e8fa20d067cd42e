"""Student rows built from a teacher cache's rows (``XTokDataset(..., from_teacher=...)``) carry
the student's BOS exactly where the student's own tokenization of the same files puts one."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import _xtok_fixtures as fx
import numpy as np
import pytest

from kdkit.lm.data import TokenRow, load_lm_dataset
from kdkit.lm.xtok.data import XTokDataset, text_starts, with_student_bos
from kdkit.lm.xtok.tokenbytes import token_bytes

tok_a, tok_a_dir, tok_b, tok_b_dir = fx.tok_a, fx.tok_a_dir, fx.tok_b, fx.tok_b_dir  # fixtures

#: ASCII documents (a row's text read back from a byte table is whole characters at any cut)
DOCS = [
    "In 2024 the total was 12345 + 678 = 13023 units.",
    "def f(x):\n    return x * 42\n",
    "A short one.",
    "Numbers 1 22 333 4444 and words, then more words to make it longer than the rest.",
]


def _files(tmp_path, docs: list[str]):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return [str(path)]


def _rows(ds) -> list[tuple[list[int], list[int]]]:
    return [(r.input_ids.tolist(), r.doc_ids.tolist()) for r in ds]


def _own(tok, texts: list[str], first_starts: bool = True) -> tuple[list[int], list[int]]:
    """The student's own tokens of ``texts`` packed in one row (the first a continuation when
    not ``first_starts``: no special tokens added to it)."""
    ids: list[int] = []
    docs: list[int] = []
    for d, text in enumerate(texts):
        x = tok(text, add_special_tokens=d > 0 or first_starts)["input_ids"]
        ids += x
        docs += [d] * len(x)
    return ids, docs


def _want(t_row: TokenRow, t_table, tok, t_eos: int, first: bool):
    """The student's own tokens of each document of a teacher row (its text read from the
    teacher's byte table), with the loader's EOS after a document's text where the teacher
    row has it; the first document a continuation (no BOS) when not ``first``."""
    ids, doc = t_row.input_ids.numpy(), t_row.doc_ids.numpy()
    texts = [t_table.text_bytes(ids[doc == d]).decode() for d in range(int(doc[-1]) + 1)]
    want_ids, want_docs = _own(tok, texts, first)
    for k in np.flatnonzero(ids == t_eos):
        j = max(i for i, d in enumerate(want_docs) if d == doc[k]) + 1
        want_ids.insert(j, tok.eos_token_id)
        want_docs.insert(j, int(doc[k]))
    return want_ids, want_docs


@pytest.mark.parametrize("pack", [False, True])
def test_cached_student_rows_are_the_students_own_rows(tmp_path, tok_a, tok_b, pack):
    """(a) one document per row, (b) several documents packed in one row: the rows from the
    teacher's (no BOS) equal the student's (BOS) own, BOS included."""
    files = _files(tmp_path, DOCS)
    teacher = load_lm_dataset(files, tok_a, max_length=512, pack=pack)
    student = load_lm_dataset(files, tok_b, max_length=512, pack=pack)
    assert len(teacher) == len(student) == (1 if pack else len(DOCS))
    assert not token_bytes(tok_a).adds_bos and token_bytes(tok_b).adds_bos
    cached = XTokDataset(teacher, tok_b, tok_a, from_teacher=512)
    assert _rows(r.teacher_row() for r in cached) == _rows(teacher)
    assert _rows(cached) == _rows(student)
    bos = tok_b.bos_token_id
    assert sum(r.input_ids.tolist().count(bos) for r in cached) == len(DOCS)
    for r in cached:  # the student's BOS pairs with nothing (the teacher has none)
        assert not np.isin(r.input_ids[r.pair_student].numpy(), [bos]).any()


def test_the_reverse_pair_adds_nothing(tmp_path, tok_a, tok_b):
    """A teacher with BOS and a student without: the teacher's BOS is not carried over (also
    over split rows: nothing added at a continuation)."""
    files = _files(tmp_path, DOCS)
    for pack in (False, True):
        teacher = load_lm_dataset(files, tok_b, max_length=512, pack=pack)
        student = load_lm_dataset(files, tok_a, max_length=512, pack=pack)
        cached = XTokDataset(teacher, tok_a, tok_b, from_teacher=512)
        assert _rows(cached) == _rows(student)
    teacher = load_lm_dataset(files, tok_b, max_length=16, pack=True, overflow="split")
    cached = XTokDataset(teacher, tok_a, tok_b, from_teacher=512)
    assert len(cached) > len(DOCS)
    starts = text_starts(list(teacher), teacher.description, tok_b.eos_token_id)
    for row, t_row, first in zip(cached, teacher, starts, strict=True):
        want = _want(t_row, token_bytes(tok_b), tok_a, tok_b.eos_token_id, first)
        assert (row.input_ids.tolist(), row.doc_ids.tolist()) == want


def test_split_rows_get_a_bos_at_text_starts_only(tmp_path, tok_a, tok_b):
    """(c) ``overflow: split``, packed: a long text cut into rows; its continuation rows have no
    BOS, and a text that starts inside a row after a continuation piece has one."""
    rng = random.Random(3)
    long = " ".join(f"word{rng.randrange(1000)} {rng.randrange(10**6)}" for _ in range(80))
    docs = [long, DOCS[0], DOCS[2], long[:300]]
    files = _files(tmp_path, docs)
    size = 48
    teacher = load_lm_dataset(files, tok_a, max_length=size, pack=True, overflow="split")
    cached = XTokDataset(teacher, tok_b, tok_a, from_teacher=4096)
    n_starts = 0
    starts = text_starts(list(teacher), teacher.description, tok_a.eos_token_id)
    for row, t_row, first in zip(cached, teacher, starts, strict=True):
        want = _want(t_row, token_bytes(tok_a), tok_b, tok_a.eos_token_id, first)
        assert (row.input_ids.tolist(), row.doc_ids.tolist()) == want
        n_starts += int(first) + int(t_row.doc_ids[-1])
    assert n_starts == len(docs)  # each text starts once, and not at a continuation row
    assert starts.count(False) >= 3  # the long text spans several rows
    bos = tok_b.bos_token_id
    assert sum(r.input_ids.tolist().count(bos) for r in cached) == len(docs)


def test_text_starts_reads_the_loaders_cuts():
    full = TokenRow.of([5] * 4)
    ends = TokenRow.of([5, 5, 5, 9])  # a text of exactly max_length tokens (EOS 9 last)
    packed = TokenRow.of([5] * 4, doc_ids=[0, 0, 1, 1])
    short = TokenRow.of([5, 9])
    split = {"format": "text", "overflow": "split", "max_length": 4}
    assert text_starts([full, full, short], split, 9) == [True, False, False]
    assert text_starts([ends, short, packed, short], split, 9) == [True, True, True, True]
    assert text_starts([full, short], {**split, "overflow": "truncate"}, 9) == [True, True]
    assert text_starts([full, short], {**split, "format": "chat"}, 9) is None
    assert text_starts([], split, 9) == []
    with_bos = [TokenRow.of([1, 5, 5, 5]), TokenRow.of([5, 9]), TokenRow.of([1, 9])]
    assert text_starts(with_bos, split, 9, bos=1) == [True, False, True]


def test_with_student_bos_adds_and_takes_off_by_what_the_student_writes(tok_b):
    s = token_bytes(tok_b)
    bos = s.bos_id
    ids, docs = np.array([7, 8, 9, 7, 8]), np.array([0, 0, 0, 1, 1])
    out = with_student_bos(ids, docs, s, True)
    assert out[0].tolist() == [bos, 7, 8, 9, bos, 7, 8] and out[1].tolist() == [0] * 4 + [1] * 3
    out = with_student_bos(ids, docs, s, False)  # the row's first document continues a text
    assert out[0].tolist() == [7, 8, 9, bos, 7, 8]
    again = with_student_bos(*out, s, False)  # a BOS already there is kept, not doubled
    assert again[0].tolist() == out[0].tolist()
    silent = replace(s, adds_bos=False)  # a BOS token the tokenizer does not write
    out = with_student_bos(np.array([bos, 7, 8, bos, 9]), np.array([0, 0, 0, 1, 1]), silent, True)
    assert out[0].tolist() == [7, 8, 9] and out[1].tolist() == [0, 0, 1]
    assert with_student_bos(np.zeros(0), np.zeros(0), s, True)[0].tolist() == []


def test_a_sentencepiece_student_with_bos_gets_its_own_rows(tmp_path, tok_a):
    """A Llama-2-like student (a space before every text, ``<s>`` written): its rows from the
    teacher's are its own rows, and its BOS positions pair with nothing."""
    sp = fx._sp_cached("prepend")
    files = _files(tmp_path, DOCS)
    teacher = load_lm_dataset(files, tok_a, max_length=512, pack=True)
    student = load_lm_dataset(files, sp, max_length=512, pack=True)
    cached = XTokDataset(teacher, sp, tok_a, from_teacher=512)
    assert _rows(cached) == _rows(student)
    (row,) = list(cached)
    assert row.input_ids.tolist().count(sp.bos_token_id) == len(DOCS)
    assert sp.bos_token_id not in row.input_ids[row.pair_student].tolist()
    assert cached.paired > 0.5
