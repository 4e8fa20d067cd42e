"""Bits per byte: the per-token byte table of real tokenizer kinds and the score it gives.

Every tokenizer is trained here, offline (``tokenizers``): byte-level BPE (Llama-3-like digit
splitting, a non-special added token), a SentencePiece-like BPE (Metaspace, ``<0xNN>`` byte
fallback), WordPiece, and the demo's own tokenizer on the demo's corpus. The table's sum over a
text's tokens is the text's UTF-8 byte count, up to what each kind documents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _lm_fixtures import PARAGRAPH, corpus, tiny_llama
from _xtok_fixtures import sentencepiece_like

pytest.importorskip("tokenizers")

from kdkit.errors import KDError  # noqa: E402
from kdkit.lm.tokenizer import token_byte_lengths  # noqa: E402

TEXTS = (
    "Hello world",
    "naïve café 🙂 中文 Überraschung\n\tx = 12345",
    "    indented  code\n\n\n  with   runs of spaces\t\t",
    PARAGRAPH,
    "x",
)


def _fast(tok, **specials):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _bytes(tokenizer, text: str) -> int:
    return int(token_byte_lengths(tokenizer)[tokenizer(text)["input_ids"]].sum())


def _byte_level_bpe():
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.BPE())
    digits = tk.pre_tokenizers.Split(tk.Regex(r"\d{1,3}"), behavior="isolated")
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [digits, tk.pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([tk.AddedToken("<think>", special=False)])  # text, as Qwen3's is
    return _fast(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def _sentencepiece_like():
    """A Llama-2-like BPE (Metaspace, ``prepend_scheme: first``, byte fallback): the fixtures'
    own, at this file's vocabulary size."""
    return sentencepiece_like("metaspace", vocab=400)


def _wordpiece():
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tk.decoders.WordPiece()
    trainer = tk.trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False
    )
    tok.train_from_iterator([*corpus(), *TEXTS], trainer)  # every character known: no [UNK]
    return _fast(tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_counts_every_byte(text):
    tok = _byte_level_bpe()
    assert _bytes(tok, text) == len(text.encode())
    # special tokens are no text; a non-special added token is its content
    marked = f"<|begin_of_text|>{text}<think>{text}<|eot_id|>"
    assert _bytes(tok, marked) == 2 * len(text.encode()) + len(b"<think>")


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_byte_fallback_counts_every_byte(text):
    tok = _sentencepiece_like()
    ids = tok(text)["input_ids"]
    if any(ord(c) > 127 for c in text):  # the fallback is exercised, and decodes back
        assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))
    # the ▁ prepended to a first word counts as the space it spells (documented); the
    # decoder strips it, and a text that starts with a space gets none
    prepended = 0 if text.startswith(" ") else 1
    if prepended:
        assert tok.decode(ids) == text
    assert _bytes(tok, text) == len(text.encode()) + prepended
    assert _bytes(tok, " " + text) == len((" " + text).encode())


@pytest.mark.parametrize("text", TEXTS)
def test_wordpiece_counts_every_byte_but_the_whitespace_it_drops(text):
    tok = _wordpiece()
    assert "[UNK]" not in tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert _bytes(tok, text) == len("".join(text.split()).encode())


def test_the_demo_tokenizer_on_the_demo_corpus(tmp_path):
    from transformers import AutoTokenizer

    from kdkit.lm.tokenizer import train_bpe_tokenizer
    from kdkit.run.lm_demo import LMDemoConfig, write_splits

    train, _, test, _ = write_splits(LMDemoConfig(chars=200_000), tmp_path)
    folder = train_bpe_tokenizer([train], LMDemoConfig.vocab, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = test.read_text(encoding="utf-8")
    assert _bytes(tok, text) == len(text.encode())
    chat = tok.apply_chat_template([{"role": "user", "content": "é 🙂"}], tokenize=False)
    assert _bytes(tok, chat) == len("user\né 🙂\n".encode())  # ChatML markers: 0 bytes


def test_bits_per_byte_and_the_alignment_read_one_table():
    """``token_byte_lengths`` (bits per byte) and ``TokenBytes.lengths`` (cross-tokenizer
    alignment) are the same numbers for every kind here: one set of rules
    (:func:`kdkit.lm.tokenizer.token_pieces`)."""
    import _xtok_fixtures as fx

    from kdkit.lm.xtok.tokenbytes import token_bytes
    from kdkit.run.lm_vocab import eval_byte_lengths

    kinds = [
        _byte_level_bpe(),
        _sentencepiece_like(),
        _wordpiece(),
        fx.sentencepiece_like("prepend"),
    ]
    for tok in kinds:
        table = token_byte_lengths(tok)
        assert table.tolist() == token_bytes(tok).lengths.tolist()
        assert eval_byte_lengths(tok).reshape(-1, len(table))[0].tolist() == table.tolist()


def test_table_size_covers_the_tokenizer_and_padded_ids_are_zero():
    tok = _byte_level_bpe()
    table = token_byte_lengths(tok)
    assert table.dtype == torch.int64 and table.numel() == len(tok)
    assert int(table[tok.convert_tokens_to_ids("<|eot_id|>")]) == 0


def test_a_slow_tokenizer_is_a_clear_error():
    class Slow:
        def __len__(self) -> int:
            return 3

    with pytest.raises(KDError, match="not a fast tokenizer"):
        token_byte_lengths(Slow())


# -- the score ------------------------------------------------------------------------------------
def _uniform_lm(vocab: int = 8):
    """A Llama whose head is zero: every next token has probability 1/vocab (3 bits for 8)."""
    model = tiny_llama(vocab=vocab)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_bpb_is_the_summed_cross_entropy_in_bits_over_the_bytes_by_hand():
    from kdkit.lm import Aligner, LMTask, TokenRow

    # labels 2, 3, 4, 5 (row 1) and 7, 1 (row 2, padded): 6 tokens, 2+3+4+5+7+1 = 22 bytes
    batch = Aligner(pad_id=0, max_length=8)([TokenRow.of([1, 2, 3, 4, 5]), TokenRow.of([6, 7, 1])])
    table = torch.arange(8)
    task = LMTask(_uniform_lm(), _uniform_lm(), probe=False, byte_lengths=table)
    scores = task.evaluate([batch])
    assert scores["tokens"] == 6 and scores["bytes"] == 22
    assert scores["ppl"] == pytest.approx(8.0, rel=1e-6)
    assert scores["bpb"] == pytest.approx(3 * 6 / 22, rel=1e-6)  # 3 bits a token, 18 bits
    assert scores["bpb"] == pytest.approx(math.log2(scores["ppl"]) * 6 / 22, rel=1e-12)
    assert task.score_teacher([batch])["bpb"] == pytest.approx(3 * 6 / 22, rel=1e-6)
    assert "bpb" not in LMTask(_uniform_lm(), None, probe=False).evaluate([batch])
    with pytest.raises(KDError, match="byte-length table"):
        LMTask(_uniform_lm(), None, probe=False, byte_lengths=table[:5]).evaluate([batch])


@pytest.mark.parametrize("variant", ["metaspace", "prepend"])
def test_bpb_does_not_count_the_dummy_prefix(variant):
    """A tokenizer that writes a space before every text (SentencePiece's dummy prefix): the
    per-id table counts that ``▁`` as the space it spells, so evaluation's table
    (``eval_byte_lengths``) has a second row for the first token after BOS, without it: the
    scored bytes are the text's. Both Llama-2 forms (Metaspace, normalizer ``Prepend``)."""
    import _xtok_fixtures as fx

    from kdkit.lm import Aligner, LMTask, TokenRow
    from kdkit.run.lm_vocab import eval_byte_lengths

    tok = fx.sentencepiece_like(variant)
    table = eval_byte_lengths(tok)
    assert table.shape == (2, len(tok))
    texts = ["Hello world", "naïve café 🙂\n\tx = 12345", "x", PARAGRAPH[:200]]
    rows = []
    for text in texts:  # BOS, the text's tokens (the first with the prefix), EOS
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids[0]).startswith("▁")
        rows.append(TokenRow.of([tok.bos_token_id, *ids, tok.eos_token_id]))
    batch = Aligner(pad_id=0, max_length=128)(rows)
    scores = LMTask(_uniform_lm(len(tok)), None, probe=False, byte_lengths=table).evaluate([batch])
    assert scores["bytes"] == sum(len(t.encode()) for t in texts)
    assert eval_byte_lengths(_byte_level_bpe()).dim() == 1  # no prefix: the per-id table


def test_eval_and_report_show_bpb_beside_ppl(tmp_path, capsys):
    """kdkit train -> report.md, metrics.csv; kdkit eval -> its lines and --json."""
    import textwrap

    import yaml

    from kdkit.cli import main
    from kdkit.lm.tokenizer import train_bpe_tokenizer

    text = tmp_path / "corpus.txt"
    text.write_text(Path(textwrap.__file__).read_text(encoding="utf-8")[:4000] + PARAGRAPH * 2)
    tok_dir = train_bpe_tokenizer([text], 300, tmp_path / "tok")
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    tiny_llama(vocab=300, seed=1).save_pretrained(teacher)
    tiny_llama(vocab=300, seed=2, hidden_size=16, intermediate_size=32).config.save_pretrained(
        student
    )
    for folder in (teacher, student):
        for f in tok_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    config = {
        "task": "lm",
        "student": {"model": f"hf-config:{student}"},
        "teacher": {"model": f"hf:{teacher}"},
        "data": {"text_files": [str(text)], "val": {"split": 0.25}, "max_length": 32},
        "train": {"epochs": 1, "progress": False},
        "run_dir": str(tmp_path / "run"),
    }
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "lm.yaml")]) == 0
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    assert "val bits/byte" in report
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_bpb", "val_bytes", "val_ppl"} <= set(header)
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    for who in ("student", "teacher"):
        s = scores[who]
        assert s["bpb"] == pytest.approx(s["ce"] * s["tokens"] / math.log(2) / s["bytes"])
    # the teacher's row of report.md is its val bits per byte, the number kdkit eval gives
    assert f"{scores['teacher']['bpb']:.4f}" in report
    assert main(["eval", str(run)]) == 0
    lines = capsys.readouterr().out
    assert "bits/byte" in lines and "bytes)" in lines


def test_the_older_ppl_names_still_answer_a_float(monkeypatch, tmp_path):
    """``lm_teacher_ppl`` and ``teacher_test_ppl`` were public before bits per byte joined the
    scores; they keep answering the perplexity alone."""
    from kdkit.run import lm_demo, lm_report

    scores = {"ppl": 12.5, "bpb": 3.0}
    monkeypatch.setattr(lm_report, "lm_teacher_scores", lambda trainer, data: scores)
    assert lm_report.lm_teacher_ppl(object(), object()) == 12.5
    monkeypatch.setattr(lm_report, "lm_teacher_scores", lambda trainer, data: None)
    assert lm_report.lm_teacher_ppl(object(), object()) is None
    monkeypatch.setattr(lm_demo, "teacher_test_scores", lambda d, t, c: scores)
    assert lm_demo.teacher_test_ppl(tmp_path, tmp_path, None) == 12.5
