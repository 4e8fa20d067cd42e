"""The teacher-to-student vocabulary map (kdkit.lm.xtok.vocabmap)."""

from __future__ import annotations

import _xtok_fixtures as fx
import numpy as np

from kdkit.lm.xtok import vocabmap
from kdkit.lm.xtok.tokenbytes import token_bytes
from kdkit.lm.xtok.vocabmap import DECOMPOSED, EXACT, SPECIAL, UNMAPPED, vocab_map

tok_a, tok_a_dir, tok_b, tok_b_dir = fx.tok_a, fx.tok_a_dir, fx.tok_b, fx.tok_b_dir  # fixtures
sp_tok = fx.sp_tok


def test_numbers_decompose_into_a_digit_splitting_students_first_digit(tok_a, tok_b):
    m = vocab_map(tok_a, tok_b)
    t, s = token_bytes(tok_a), token_bytes(tok_b)
    multi = [i for i in range(t.size) if sum(c in b"0123456789" for c in t.piece(i)) > 1]
    assert multi
    for tid in multi:
        assert m.kind[tid] == DECOMPOSED
        text = t.piece(tid)
        first = s.piece(int(m.first[tid]))
        assert text.startswith(first) and m.pieces[tid] >= 2


def test_exact_matches_have_the_same_bytes_and_specials_map_by_class(tok_a, tok_b):
    m = vocab_map(tok_b, tok_a)
    t, s = token_bytes(tok_b), token_bytes(tok_a)
    for tid in np.flatnonzero(m.kind == EXACT)[:500].tolist():
        assert t.piece(tid) == s.piece(int(m.first[tid]))
    assert (
        m.first[tok_b.eos_token_id] == tok_a.eos_token_id and m.kind[tok_b.eos_token_id] == SPECIAL
    )
    # the teacher's BOS: the student has none, so it predicts nothing there
    assert m.kind[tok_b.bos_token_id] == UNMAPPED
    im = tok_b.convert_tokens_to_ids("<|im_start|>")
    assert m.first[im] == tok_a.convert_tokens_to_ids("<|im_start|>")


def test_identical_tokenizers_map_every_token_to_itself(tok_a):
    m = vocab_map(tok_a, tok_a)
    ids = np.arange(len(tok_a))
    assert (m.first == ids).all()


def test_the_map_is_cached_by_fingerprints_on_disk(tok_a, tok_b, tmp_path):
    vocabmap._MEMO.clear()
    m = vocab_map(tok_a, tok_b, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].stem == m.key
    vocabmap._MEMO.clear()
    again = vocab_map(tok_a, tok_b, cache_dir=tmp_path)
    assert (again.first == m.first).all() and (again.kind == m.kind).all()
    assert vocab_map(tok_b, tok_a).key != m.key


def test_kdkit_lm_vocab_map_reports_where_the_mass_goes(tok_a_dir, tok_b_dir, tmp_path, capsys):
    from _lm_fixtures import tiny_llama

    from kdkit.cli import main

    text = tmp_path / "c.txt"
    text.write_text("In 2024 the total was 12345 + 678 = 13023 units.\n" * 20 + "plain words\n")
    assert main(["lm", "vocab-map", str(tok_a_dir), str(tok_b_dir), "--data", str(text)]) == 0
    out = capsys.readouterr().out
    assert "token counts" in out and "decomposed" in out and "tokens losing the most" in out
    # numbers lose mass to a digit-splitting student
    worst = out.split("tokens losing the most")[1]
    assert any(ch.isdigit() for ch in worst)
    model = tmp_path / "teacher"
    import transformers

    tiny_llama(vocab=2000).save_pretrained(model)
    transformers.AutoTokenizer.from_pretrained(str(tok_a_dir)).save_pretrained(model)
    assert main(["lm", "vocab-map", f"hf:{model}", str(tok_b_dir), "--data", str(text)]) == 0
    assert "teacher model" in capsys.readouterr().out


def test_a_dummy_prefix_student_gets_a_token_inside_a_text_not_one_after_a_space(tok_a, sp_tok):
    """The map says what the student writes *inside* a text. A student that writes a space
    before every text encodes a teacher token ``foo`` as ``▁foo`` / ``▁ foo``: its first token
    there would be a space the text does not have; the map takes the prefix off."""
    sp = sp_tok
    m = vocab_map(tok_a, sp)
    t, s = token_bytes(tok_a), token_bytes(sp)
    mapped = np.flatnonzero((m.kind == EXACT) | (m.kind == DECOMPOSED)).tolist()
    assert len(mapped) > 1000
    for tid in mapped:  # the student's token is a prefix of the teacher token's text
        assert t.piece(tid).startswith(s.piece(int(m.first[tid]))), t.piece(tid)
    assert (m.kind[[i for i in range(t.size) if t.piece(i)[:1].isalnum()]] == DECOMPOSED).any()


def test_a_dummy_prefix_teacher_maps_inside_a_text_and_the_first_word_is_not_paired(tok_b):
    """A teacher ``▁foo`` is the student's ``Ġfoo`` inside a text; as the first word of a text
    it is ``foo``, which the map cannot say: the position that predicts it (after BOS) pairs
    with nothing (it trains on the text) when only one side writes the prefix, and with itself
    when both do."""
    from kdkit.lm.xtok.align import align_rows
    from kdkit.lm.xtok.retokenize import teacher_ids
    from kdkit.lm.xtok.tokenbytes import align_tables

    sp = fx._sp_cached("prepend")  # <s> and a space before every text
    m = vocab_map(sp, tok_b)
    t, s = token_bytes(sp), token_bytes(tok_b)
    for tid in np.flatnonzero(m.kind == EXACT).tolist():
        assert t.piece(tid) == s.piece(int(m.first[tid]))
    w = sp.convert_tokens_to_ids("▁w")
    assert s.piece(int(m.first[w])) == b" w"  # right inside a text only
    ids = np.asarray(tok_b("world peace")["input_ids"], dtype=np.int64)  # BOS first
    docs = np.zeros_like(ids)
    ids_t, docs_t = teacher_ids(ids, docs, s, t, sp)
    assert ids_t[0] == sp.bos_token_id and t.piece(int(ids_t[1])).startswith(b" ")
    al = align_rows(ids, docs, ids_t, docs_t, *align_tables(s, t))
    assert 0 not in al.teacher.tolist() and 0 not in al.student.tolist()
    same = align_rows(ids_t, docs_t, ids_t, docs_t, *align_tables(t, t))
    assert same.student.tolist()[:2] == [0, 1]


def test_kdkit_lm_vocab_map_says_when_one_side_writes_a_dummy_prefix(tok_a_dir, tmp_path, capsys):
    from kdkit.cli import main

    sp = tmp_path / "sp"
    fx._sp_cached("metaspace").save_pretrained(sp)
    assert main(["lm", "vocab-map", str(sp), str(tok_a_dir)]) == 0
    assert "the teacher writes a space before every text" in capsys.readouterr().out
    assert main(["lm", "vocab-map", str(tok_a_dir), str(tok_a_dir)]) == 0
    assert "dummy prefix" not in capsys.readouterr().out
