"""Cross-tokenizer alignment with a SentencePiece-style dummy prefix, on either side.

A tokenizer that writes a space before every text (Metaspace ``prepend_scheme`` ``first`` /
``always``, or Llama-2's normalizer ``Prepend("▁")``) gives the first token of a text a byte
the text does not have. These tests read each position's text from the token tables *here*
(``TokenBytes.piece`` per id and the rule in :func:`_read`, no library helper) and check that
paired positions have read the same text, that both sides read the whole text, and that the map
is right where the prefix is."""

from __future__ import annotations

import random

import _xtok_fixtures as fx
import numpy as np
import pytest

from kdkit.lm.xtok.align import align_many, align_rows
from kdkit.lm.xtok.retokenize import teacher_ids
from kdkit.lm.xtok.tokenbytes import align_tables, token_bytes

tok_a, tok_a_dir, sp_tok = fx.tok_a, fx.tok_a_dir, fx.sp_tok  # fixtures


def _read(table, ids, docs) -> list[bytes]:
    """Per position, the row's text read through it (its document's bytes so far), a token at
    a time: at the start of a run (the row, a document, or after a special) a token's leading
    space is the tokenizer's dummy prefix when it has one, not text."""
    out, doc_text, prev = [], b"", None
    for k, (i, d) in enumerate(zip(ids.tolist(), docs.tolist(), strict=True)):
        piece = table.piece(i)
        start = k == 0 or d != docs[k - 1] or prev in table.special_class
        if k > 0 and d != docs[k - 1]:
            doc_text = b""
        if start and table.prepends_space and piece.startswith(b" "):
            piece = piece[1:]
        doc_text += piece
        out.append(doc_text)
        prev = i
    return out


def _texts(n: int = 30) -> list[str]:
    rng = random.Random(3)
    corpus = "\n".join(fx.xtok_corpus())
    out = [fx.random_text(rng, rng.randrange(1, 40)) for _ in range(n)]
    for _ in range(n):
        a = rng.randrange(len(corpus) - 300)
        out.append(corpus[a : a + rng.randrange(1, 300)])
    return out + ["hello world", " leading space", "  two", "\nnewline first", "🙂 first"]


def _encode(tok, text: str) -> np.ndarray:
    return np.asarray(tok(text)["input_ids"] + [tok.eos_token_id], dtype=np.int64)


def _check(tok_s, tok_t, ids_s, docs_s):
    """Align one student row with the teacher's tokens of it; check every pair compares the
    same text and both sides read all of it. Returns what the tests look at."""
    s, t = token_bytes(tok_s), token_bytes(tok_t)
    ids_t, docs_t = teacher_ids(ids_s, docs_s, s, t, tok_t)
    al = align_rows(ids_s, docs_s, ids_t, docs_t, *align_tables(s, t))
    read_s, read_t = _read(s, ids_s, docs_s), _read(t, ids_t, docs_t)
    for i, j in zip(al.student.tolist(), al.teacher.tolist(), strict=True):
        assert docs_s[i] == docs_t[j] and read_s[i] == read_t[j], (i, j)
    for d in np.unique(docs_s).tolist():  # each document's whole text, on both sides
        last_s, last_t = np.flatnonzero(docs_s == d)[-1], np.flatnonzero(docs_t == d)
        assert read_t[last_t[-1]] == read_s[last_s] if len(last_t) else read_s[last_s] == b""
    assert (np.diff(al.student) > 0).all() and (np.diff(al.teacher) > 0).all()
    return s, t, ids_t, docs_t, al, read_s, read_t


@pytest.mark.parametrize("direction", ["sp->bpe", "bpe->sp"])
def test_pairs_read_the_same_text_with_a_dummy_prefix_on_either_side(direction, sp_tok, tok_a):
    tok_s, tok_t = (sp_tok, tok_a) if direction == "sp->bpe" else (tok_a, sp_tok)
    for text in _texts():
        ids = _encode(tok_s, text)
        s, t, ids_t, _, al, read_s, _ = _check(tok_s, tok_t, ids, np.zeros_like(ids))
        # the text both sides read is the document's (SentencePiece's own round trip: a text
        # that starts with a space keeps it only where the tokenizer writes the prefix anyway)
        whole = text.encode()
        if (
            s.prepends_space
            and text.startswith(" ")
            and s.probe == b" a b"
            and (
                tok_s(" a", add_special_tokens=False)["input_ids"]
                == tok_s("a", add_special_tokens=False)["input_ids"]
            )
        ):
            whole = whole[1:]
        assert read_s[-1] == whole
        assert len(al) > 0


@pytest.mark.parametrize("direction", ["sp->bpe", "bpe->sp"])
def test_every_boundary_both_sides_share_is_paired_but_a_run_start(direction, sp_tok, tok_a):
    """Pairs are exactly the shared text boundaries, except the position before a run's first
    token where only one side writes the prefix (there its ``▁foo`` is the other's ``foo``)."""
    tok_s, tok_t = (sp_tok, tok_a) if direction == "sp->bpe" else (tok_a, sp_tok)
    for text in _texts(10):
        ids = _encode(tok_s, text)
        docs = np.zeros_like(ids)
        s, t, ids_t, docs_t, al, read_s, read_t = _check(tok_s, tok_t, ids, docs)
        sp, sp_ids = (s, ids) if direction == "sp->bpe" else (t, ids_t)
        starts = {k for k in range(len(sp_ids)) if k == 0 or sp_ids[k - 1] in sp.special_class}
        before_start = {k - 1 for k in starts if sp.lead[sp_ids[k]]}
        texty_s = [k for k in range(len(ids) - 1) if s.piece(ids[k + 1])]
        texty_t = [k for k in range(len(ids_t) - 1) if t.piece(ids_t[k + 1])]
        shared = {read_s[k] for k in texty_s} & {read_t[k] for k in texty_t}
        paired = {read_s[k] for k in al.student.tolist()}
        sp_side = al.student if direction == "sp->bpe" else al.teacher
        assert not set(sp_side.tolist()) & before_start
        missing = shared - paired
        sp_read = read_s if direction == "sp->bpe" else read_t
        assert missing <= {sp_read[k] for k in before_start if k >= 0}


def test_identical_sentencepiece_tokenizers_align_as_the_identity(sp_tok):
    for text in _texts(15):
        ids = _encode(sp_tok, text)
        _, _, ids_t, _, al, _, _ = _check(sp_tok, sp_tok, ids, np.zeros_like(ids))
        assert ids_t.tolist() == ids.tolist()
        assert al.student.tolist() == al.teacher.tolist() == list(range(len(ids)))


@pytest.mark.parametrize("direction", ["sp->bpe", "bpe->sp"])
def test_rows_cut_mid_document_and_packed_rows(direction, sp_tok, tok_a):
    tok_s, tok_t = (sp_tok, tok_a) if direction == "sp->bpe" else (tok_a, sp_tok)
    long = "\n".join(fx.xtok_corpus())[2000:4000]
    ids = _encode(tok_s, long)
    rows_s, rows_t = [], []
    s, t = token_bytes(tok_s), token_bytes(tok_t)
    for a in range(0, len(ids), 97):  # overflow: split (no BOS, no prefix mid-text)
        row = ids[a : a + 97]
        _check(tok_s, tok_t, row, np.zeros_like(row))
        rows_s.append((row, np.zeros_like(row)))
    one, two = _encode(tok_s, "first doc 12"), _encode(tok_s, " second, after a space")
    packed = np.concatenate([one, ids[40:90], two])  # a split piece packed between documents
    docs = np.repeat([0, 1, 2], [len(one), 50, len(two)])
    *_, docs_t, al, read_s, _ = _check(tok_s, tok_t, packed, docs)
    assert set(docs[al.student].tolist()) == {0, 1, 2}
    rows_s.append((packed, docs))
    rows_t = [teacher_ids(r, d, s, t, tok_t) for r, d in rows_s]
    many = align_many(rows_s, rows_t, *align_tables(s, t))
    for (r, d), (rt, dt), al in zip(rows_s, rows_t, many, strict=True):
        one_row = align_rows(r, d, rt, dt, *align_tables(s, t))
        assert al.student.tolist() == one_row.student.tolist()
        assert al.teacher.tolist() == one_row.teacher.tolist()


def test_bos_asymmetry_with_a_dummy_prefix(tok_a):
    sp = fx._sp_cached("prepend")  # <s> before every text, a space after it
    ids = _encode(sp, "Hello world 123")
    s, t, ids_t, _, al, _, _ = _check(sp, tok_a, ids, np.zeros_like(ids))
    assert ids[0] == sp.bos_token_id and 0 not in al.student.tolist()
    assert al.teacher[0] == 0  # the teacher's first text position pairs
    k = al.student[0]
    assert _read(s, ids, np.zeros_like(ids))[k] == _read(t, ids_t, np.zeros_like(ids_t))[0]
    # the other way: the teacher gets <s> only where the student row has a BOS
    a = _encode(tok_a, "Hello world 123")
    _, _, ids_t, _, al, _, _ = _check(tok_a, sp, a, np.zeros_like(a))
    assert sp.bos_token_id not in ids_t.tolist()
    assert sp.convert_ids_to_tokens(int(ids_t[0])).startswith("▁")


def test_chat_specials_the_teacher_lacks_join_the_text_around_them(sp_tok, tok_a):
    text = "<|im_start|>user\nAdd 12 and 30<|im_end|>\n<|im_start|>assistant\n 42<|im_end|>\n"
    ids = _encode(tok_a, text)
    _, _, ids_t, _, al, read_s, read_t = _check(tok_a, sp_tok, ids, np.zeros_like(ids))
    assert read_t[-1] == b"user\nAdd 12 and 30\nassistant\n 42\n" == read_s[-1]


def test_a_tokenizer_whose_tokens_do_not_spell_the_text_is_refused(tok_a):
    from test_lm_bpb import _wordpiece

    from kdkit.errors import KDError
    from kdkit.lm.xtok.tokenbytes import check_alignable

    check_alignable(token_bytes(tok_a), "student")
    check_alignable(token_bytes(fx._sp_cached("metaspace")), "teacher")
    with pytest.raises(KDError, match="not the text"):
        check_alignable(token_bytes(_wordpiece()), "teacher")  # drops the space between words


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_kdkit_train_with_a_sentencepiece_tokenizer_on_either_side(side, tok_a, tmp_path, capsys):
    """The refusal is gone: a Llama-2-like tokenizer (``<s>``, normalizer ``Prepend``) on
    either side trains end to end, and most student positions have a partner."""
    import json
    import textwrap
    from pathlib import Path

    import torch
    import yaml
    from _lm_fixtures import PARAGRAPH, tiny_llama

    from kdkit.cli import main
    from kdkit.config import load_config
    from kdkit.run.lm_job import build_lm_trainer

    sp = fx._sp_cached("prepend")
    tok_t, tok_s = (sp, tok_a) if side == "teacher" else (tok_a, sp)
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    tiny_llama(vocab=len(tok_t), seed=1).save_pretrained(teacher_dir)
    tok_t.save_pretrained(teacher_dir)
    student = tiny_llama(vocab=len(tok_s), seed=2, hidden_size=16, intermediate_size=32)
    student.config.save_pretrained(student_dir)
    tok_s.save_pretrained(student_dir)
    text = tmp_path / "corpus.txt"
    text.write_text(Path(textwrap.__file__).read_text(encoding="utf-8")[:3000] + PARAGRAPH)
    config = {
        "task": "lm",
        "student": {"model": f"hf-config:{student_dir}"},
        "teacher": {"model": f"hf:{teacher_dir}"},
        "data": {
            "text_files": [str(text)],
            "val": {"split": 0.25},
            "max_length": 32,
            "overflow": "split",
            "batch_size": 4,
        },  # fmt: skip
        "distill": {"divergence": "fkl", "ce_weight": 0.1},
        "train": {"epochs": 1, "progress": False},
        "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "xtok.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer, data = build_lm_trainer(load_config(path), torch.device("cpu"))
    batch = next(iter(data.train_loader))
    assert (batch.teacher.index[batch.mask] >= 0).float().mean().item() > 0.5
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert "bpb" in scores["student"] and "kl" in scores["student"]
