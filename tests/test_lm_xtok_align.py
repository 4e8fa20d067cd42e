"""Byte-offset alignment across tokenizers (kdkit.lm.xtok.align, tokenbytes, retokenize)."""

from __future__ import annotations

import random

import _xtok_fixtures as fx
import numpy as np
import pytest

from kdkit.lm.xtok.align import align_rows, spans
from kdkit.lm.xtok.retokenize import teacher_ids
from kdkit.lm.xtok.tokenbytes import kind_tables, token_bytes

tok_a, tok_a_dir, tok_b, tok_b_dir = fx.tok_a, fx.tok_a_dir, fx.tok_b, fx.tok_b_dir  # fixtures


def _encode(tok, text: str, eos: bool = True) -> np.ndarray:
    ids = tok(text, add_special_tokens=True)["input_ids"]
    return np.asarray(ids + ([tok.eos_token_id] if eos else []), dtype=np.int64)


def _pair(tok_s, tok_t):
    s, t = token_bytes(tok_s), token_bytes(tok_t)
    ks, kt = kind_tables(s, t)
    return s, t, (s.lengths, ks), (t.lengths, kt)


def _texts(n: int = 60) -> list[str]:
    rng = random.Random(1)
    corpus = "\n".join(fx.xtok_corpus())
    out = [fx.random_text(rng, rng.randrange(1, 60)) for _ in range(n)]
    for _ in range(n):
        a = rng.randrange(len(corpus) - 400)
        out.append(corpus[a : a + rng.randrange(1, 400)])
    return out


def test_the_pair_differs_as_real_tokenizers_do(tok_a, tok_b):
    a, b = token_bytes(tok_a), token_bytes(tok_b)
    assert len(tok_a) == 2000 and len(tok_b) == 3000
    assert not a.adds_bos and b.adds_bos
    digits_a = [tok_a.convert_ids_to_tokens(i) for i in tok_a("x 12345")["input_ids"]]
    digits_b = [tok_b.convert_ids_to_tokens(i) for i in tok_b("x 12345")["input_ids"]]
    assert any(sum(c.isdigit() for c in p) > 1 for p in digits_a)
    assert all(sum(c.isdigit() for c in p) <= 1 for p in digits_b)


@pytest.mark.parametrize("which", ["a", "b"])
def test_token_bytes_give_back_the_text_without_decode(which, tok_a, tok_b):
    tok = tok_a if which == "a" else tok_b
    table = token_bytes(tok)
    for text in _texts(40):
        ids = _encode(tok, text)
        assert table.text_bytes(ids) == text.encode("utf-8")
        assert int(table.lengths[ids].sum()) == len(text.encode("utf-8"))


def test_multibyte_characters_split_across_tokens_have_their_own_byte_lengths(tok_a):
    table = token_bytes(tok_a)
    ids = _encode(tok_a, "🙂🚀日本", eos=False)
    lens = table.lengths[ids]
    assert lens.sum() == len("🙂🚀日本".encode())
    assert (lens < 4).any()  # a 4-byte emoji split into pieces of fewer bytes


@pytest.mark.parametrize("direction", ["a->b", "b->a"])
def test_spans_cover_every_byte_exactly_once(direction, tok_a, tok_b):
    tok_s, tok_t = (tok_a, tok_b) if direction == "a->b" else (tok_b, tok_a)
    s, t, _, _ = _pair(tok_s, tok_t)
    for text in _texts():
        ls, lt = s.lengths[_encode(tok_s, text)], t.lengths[_encode(tok_t, text)]
        b = spans(ls, lt)
        total = len(text.encode("utf-8"))
        assert b[-1] == total == ls.sum() == lt.sum()
        widths = np.diff(np.concatenate([[0], b]))
        assert (widths > 0).all() and widths.sum() == total  # a partition: each byte once
        # every boundary of either side inside a span is not the other's boundary
        ends_s, ends_t = set(np.cumsum(ls).tolist()), set(np.cumsum(lt).tolist())
        assert set(b.tolist()) == (ends_s & ends_t) - {0}


def _check_pairs(tok_s, tok_t, text):
    s, t, ts, tt = _pair(tok_s, tok_t)
    ids_s = _encode(tok_s, text)
    docs_s = np.zeros_like(ids_s)
    ids_t, docs_t = teacher_ids(ids_s, docs_s, s, t, tok_t)
    al = align_rows(ids_s, docs_s, ids_t, docs_t, ts, tt)
    ends_s, ends_t = np.cumsum(s.lengths[ids_s]), np.cumsum(t.lengths[ids_t])
    # paired positions have read the same bytes...
    assert (ends_s[al.student] == ends_t[al.teacher]).all()
    # ...and the same text: the prefixes' bytes are equal
    for i, j in zip(al.student[:5].tolist(), al.teacher[:5].tolist(), strict=True):
        assert s.text_bytes(ids_s[: i + 1]) == t.text_bytes(ids_t[: j + 1])
    # every boundary both sides have (before a text token) is paired
    nxt_text_s = np.append(s.lengths[ids_s[1:]] > 0, False)
    nxt_text_t = np.append(t.lengths[ids_t[1:]] > 0, False)
    both = set(ends_s[nxt_text_s].tolist()) & set(ends_t[nxt_text_t].tolist())
    assert both == set(ends_s[al.student][nxt_text_s[al.student]].tolist())
    return s, t, ids_s, ids_t, al


@pytest.mark.parametrize("direction", ["a->b", "b->a"])
def test_pairs_predict_from_the_same_prefix(direction, tok_a, tok_b):
    tok_s, tok_t = (tok_a, tok_b) if direction == "a->b" else (tok_b, tok_a)
    for text in _texts(30):
        _check_pairs(tok_s, tok_t, text)


def test_bos_asymmetry_pairs_nothing_at_byte_zero(tok_a, tok_b):
    # student b has a BOS, teacher a has none: b's BOS position has no partner
    s, t, ids_s, ids_t, al = _check_pairs(tok_b, tok_a, "Hello world 123")
    assert ids_s[0] == tok_b.bos_token_id and 0 not in al.student.tolist()
    assert tok_b.bos_token_id not in ids_t.tolist()
    assert al.student[0] == 1 and al.teacher[0] == 0  # the first text positions pair
    # a row that starts with a BOS gives a teacher with one its BOS; pairs start after it
    b = token_bytes(tok_b)
    ids = _encode(tok_b, "Hello world 123")
    ids_t, docs_t = teacher_ids(ids, np.zeros_like(ids), b, b, tok_b)
    assert ids_t[0] == tok_b.bos_token_id
    # student a, teacher b: no BOS where the row has none (a row cut mid-text has none)
    s, t, ids_s, ids_t, al = _check_pairs(tok_a, tok_b, "Hello world 123")
    assert tok_b.bos_token_id not in ids_t.tolist()
    assert al.student[0] == 0 and al.teacher[0] == 0


def test_eos_pairs_with_eos(tok_a, tok_b):
    s, t, ids_s, ids_t, al = _check_pairs(tok_a, tok_b, "the end.")
    last_s = len(ids_s) - 2  # predicts EOS
    k = al.student.tolist().index(last_s)
    assert ids_t[al.teacher[k] + 1] == tok_b.eos_token_id


def test_chat_special_tokens_pair_by_class(tok_a, tok_b):
    text = "<|im_start|>user\nAdd 12 and 30<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
    s, t, ids_s, ids_t, al = _check_pairs(tok_a, tok_b, text)
    im_end_s, im_end_t = (
        tok_a.convert_tokens_to_ids("<|im_end|>"),
        tok_b.convert_tokens_to_ids("<|im_end|>"),
    )
    before_s = np.flatnonzero(ids_s[1:] == im_end_s)
    before_t = np.flatnonzero(ids_t[1:] == im_end_t)
    assert len(before_s) == 2
    pairs = dict(zip(al.student.tolist(), al.teacher.tolist(), strict=True))
    assert [pairs[i] for i in before_s.tolist()] == before_t.tolist()


def test_identical_tokenizers_align_as_the_identity(tok_a):
    for text in _texts(20):
        s, t, ids_s, ids_t, al = _check_pairs(tok_a, tok_a, text)
        assert (ids_s == ids_t).all()
        assert al.student.tolist() == al.teacher.tolist() == list(range(len(ids_s)))


def test_packed_rows_align_document_by_document(tok_a, tok_b):
    s, t, ts, tt = _pair(tok_a, tok_b)
    one, two = _encode(tok_a, "first 1234 doc"), _encode(tok_a, "second doc 99")
    ids = np.concatenate([one, two])
    docs = np.concatenate([np.zeros(len(one), np.int64), np.ones(len(two), np.int64)])
    ids_t, docs_t = teacher_ids(ids, docs, s, t, tok_b)
    assert (ids_t == tok_b.bos_token_id).sum() == 0  # none where the student has none
    assert (ids_t == tok_b.eos_token_id).sum() == 2  # each document's EOS
    al = align_rows(ids, docs, ids_t, docs_t, ts, tt)
    assert (docs[al.student] == docs_t[al.teacher]).all()
    assert len(np.unique(docs[al.student])) == 2


def test_a_row_truncated_inside_a_character_pairs_only_whole_bytes(tok_a, tok_b):
    s, t, ts, tt = _pair(tok_a, tok_b)
    ids = _encode(tok_a, "abc 🙂🙂", eos=False)
    ids = ids[:-1]  # cut inside the last emoji
    ids_t, docs_t = teacher_ids(ids, np.zeros_like(ids), s, t, tok_b)
    al = align_rows(ids, np.zeros_like(ids), ids_t, docs_t, ts, tt)
    assert len(al) > 0
    assert t.text_bytes(ids_t) == s.text_bytes(ids)[: len(t.text_bytes(ids_t))]


def test_aligning_many_rows_at_once_equals_one_row_at_a_time(tok_a, tok_b):
    from kdkit.lm.xtok.align import align_many

    s, t, ts, tt = _pair(tok_b, tok_a)
    rows_s, rows_t = [], []
    for k, text in enumerate(_texts(25)):
        ids = _encode(tok_b, text)
        docs = np.zeros_like(ids)
        if k % 3 == 0:  # a packed row
            more = _encode(tok_b, text[::-1])
            ids, docs = np.concatenate([ids, more]), np.concatenate([docs, np.ones_like(more)])
        rows_s.append((ids, docs))
        rows_t.append(teacher_ids(ids, docs, s, t, tok_a))
    rows_s.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))  # an empty row
    rows_t.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
    many = align_many(rows_s, rows_t, ts, tt)
    for (a, b), (c, d), al in zip(rows_s, rows_t, many, strict=True):
        one = align_rows(a, b, c, d, ts, tt)
        assert al.student.tolist() == one.student.tolist()
        assert al.teacher.tolist() == one.teacher.tolist()


def _reference_pairs(ids_s, docs_s, ids_t, docs_t, tables_s, tables_t):
    """The pairs one token at a time (the per-token loop of ``bench_lm_xtok.py align``, with
    a dummy prefix read as ``dummy_prefix`` says: the first token of a row, of a document or
    after a special reads ``lead`` bytes less, and predicting one is a kind of its own)."""

    def keys(ids, docs, lens, kinds, lead=None):
        def drop(i):
            first = i == 0 or docs[i] != docs[i - 1] or kinds[ids[i - 1]] != 0
            return int(lead[ids[i]]) if lead is not None and first else 0

        out, end = {}, 0
        for i in range(len(ids)):
            end += int(lens[ids[i]]) - drop(i)
            nxt = -1 if i + 1 == len(ids) else "run" if drop(i + 1) else int(kinds[ids[i + 1]])
            out[(int(docs[i]), end, nxt)] = i  # a repeated key keeps its last position
        return out

    ks, kt = keys(ids_s, docs_s, *tables_s), keys(ids_t, docs_t, *tables_t)
    return sorted((i, kt[k]) for k, i in ks.items() if k in kt)


def _random_rows(rng: np.random.Generator, n_rows: int, tables, max_len: int = 40):
    """Rows of random ids: zero-length specials (runs of them, of one class or several, so
    keys repeat and fall out of order), packed documents, empty rows."""
    vocab = len(tables[0])
    rows = []
    for _ in range(n_rows):
        n = int(rng.integers(0, max_len)) if rng.random() > 0.1 else 0
        ids = rng.integers(0, vocab, n)
        docs = np.sort(rng.integers(0, 3, n)) if rng.random() < 0.5 else np.zeros(n, np.int64)
        rows.append((ids.astype(np.int64), docs.astype(np.int64)))
    return rows


def _random_tables(rng: np.random.Generator, vocab: int, specials: int, lead: bool = False):
    """``(lengths, kinds)``, and ``lead`` (a SentencePiece-like dummy prefix on some text ids)."""
    lens = rng.integers(1, 5, vocab).astype(np.int64)
    kinds = np.zeros(vocab, np.int64)
    lens[:specials] = 0  # the first ids are specials of a few classes
    kinds[:specials] = rng.integers(1, 4, specials)
    if not lead:
        return lens, kinds
    return lens, kinds, (rng.random(vocab) < 0.5) & (lens > 0)


@pytest.mark.parametrize("block", [1 << 14, 40, 1])
def test_align_many_equals_the_per_token_loop_on_random_rows(block, monkeypatch):
    """Independent of the tokenizers: random tables with specials, rows of the same text or
    not (pairs are whatever keys both have), blocks of one row up to all rows at once."""
    from kdkit.lm.xtok import align as al

    monkeypatch.setattr(al, "_BLOCK_POSITIONS", block)
    rng = np.random.default_rng(0)
    for trial in range(20):
        ts, tt = (
            _random_tables(rng, 30, 6, trial % 4 == 1),
            _random_tables(rng, 25, 4, trial % 3 == 1),
        )
        rows_s = _random_rows(rng, 15, ts)
        # the teacher's rows: random ones, or the student's text re-cut (many pairs)
        rows_t = _random_rows(rng, 15, tt) if trial % 2 else [
            (a % 25, b) for a, b in rows_s
        ]  # fmt: skip
        many = al.align_many(rows_s, rows_t, ts, tt)
        flat = al.align_flat(al.FlatRows.of(rows_s), al.FlatRows.of(rows_t), ts, tt)
        assert (
            [len(r) for r in flat.rows()] == [len(r) for r in many] == np.diff(flat.cuts).tolist()
        )
        for (a, b), (c, d), got, got_flat in zip(rows_s, rows_t, many, flat.rows(), strict=True):
            want = _reference_pairs(a, b, c, d, ts, tt)
            assert list(zip(got.student.tolist(), got.teacher.tolist(), strict=True)) == want
            assert got_flat.student.tolist() == got.student.tolist()
            assert got_flat.teacher.tolist() == got.teacher.tolist()
            assert got.student.dtype == got.teacher.dtype == np.int64


def test_position_keys_take_the_rows_from_their_starts():
    """The rows of a concatenation follow from ``starts``; a ``row`` array is still accepted."""
    from kdkit.lm.xtok.align import position_keys

    rng = np.random.default_rng(1)
    lens, kinds = _random_tables(rng, 20, 3)
    rows = _random_rows(rng, 8, (lens, kinds))
    rows[2] = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # an empty row inside
    ids = np.concatenate([r[0] for r in rows])
    docs = np.concatenate([r[1] for r in rows])
    sizes = np.array([len(r[0]) for r in rows])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    row = np.repeat(np.arange(len(rows)), sizes)
    keys = position_keys(ids, docs, lens, kinds, None, starts)
    assert (keys == position_keys(ids, docs, lens, kinds, row, starts)).all()
    for r, (a, b) in enumerate(rows):  # each row's keys: its own, with its number on top
        one = position_keys(a, b, lens, kinds)
        assert (keys[starts[r] : starts[r] + len(a)] == one + (r << 48)).all()


def test_flat_rows_are_checked_and_made_from_rows():
    from kdkit.lm.xtok.align import FlatRows, align_flat

    rows = [(np.arange(3), np.zeros(3, np.int64)), ([], []), (np.arange(2), np.ones(2))]
    flat = FlatRows.of(rows)
    assert len(flat) == 3 and flat.starts.tolist() == [0, 3, 3, 5]
    assert flat.ids.dtype == flat.docs.dtype == np.int64
    assert flat.ids.tolist() == [0, 1, 2, 0, 1] and flat.docs.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="differ in length"):
        FlatRows(np.arange(3), np.zeros(2, np.int64), np.array([0, 3]))
    tables = np.ones(3, np.int64), np.zeros(3, np.int64)
    one = FlatRows.of([(np.arange(3), np.zeros(3))])
    assert align_flat(one, one, tables, tables).rows()[0].student.tolist() == [0, 1, 2]
    bad = FlatRows(np.arange(3), np.array([0, -1, -1]), np.array([0, 3]))
    with pytest.raises(ValueError, match="negative"):  # keys must stay below 2**63
        align_flat(bad, one, tables, tables)
