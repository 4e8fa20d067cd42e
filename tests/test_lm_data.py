"""kdkit.lm.tokenizer and kdkit.lm.data: training a tokenizer, reading, tokenizing, packing."""

from __future__ import annotations

import json
from pathlib import Path

import _lm_fixtures as fx
import pytest

from kdkit.errors import KDError
from kdkit.lm.data import load_lm_dataset
from kdkit.lm.tokenizer import CHATML_TEMPLATE, train_bpe_tokenizer

PARAGRAPH, VOCAB, corpus = fx.PARAGRAPH, fx.VOCAB, fx.corpus
lm_tokenizer, lm_tokenizer_dir = fx.lm_tokenizer, fx.lm_tokenizer_dir  # fixtures

CHATS = [
    {
        "messages": [
            {"role": "user", "content": "What is a teacher?"},
            {"role": "assistant", "content": "A large model."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a loss."},
            {"role": "assistant", "content": "KL divergence."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Cross-entropy, with T."},
        ]
    },
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tokenizer_loads_with_specials_and_is_deterministic(
    lm_tokenizer, lm_tokenizer_dir, tmp_path
):
    tok = lm_tokenizer
    assert len(tok) == VOCAB
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.decode(tok(PARAGRAPH)["input_ids"]) == PARAGRAPH  # byte level: accents, emoji
    again = train_bpe_tokenizer(corpus(), VOCAB, tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (
        lm_tokenizer_dir / "tokenizer.json"
    ).read_bytes()
    with pytest.raises(KDError, match="vocab_size 100"):
        train_bpe_tokenizer(["x"], 100, tmp_path / "small")


def test_text_files_glob_eos_truncate_and_split(lm_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text(PARAGRAPH, encoding="utf-8")
    (tmp_path / "b.txt").write_text("short text", encoding="utf-8")
    ids_a = lm_tokenizer(PARAGRAPH)["input_ids"]
    eos = lm_tokenizer.eos_token_id
    ds = load_lm_dataset(str(tmp_path / "*.txt"), lm_tokenizer, max_length=1000)
    assert len(ds) == 2 and ds[0].input_ids.tolist() == ids_a + [eos]
    assert ds[0].trainable.all() and ds[1].input_ids[-1] == eos
    cut = load_lm_dataset(str(tmp_path / "a.txt"), lm_tokenizer, max_length=16)
    assert cut[0].input_ids.tolist() == ids_a[:16] and cut.description["truncated_tokens"] > 0
    split = load_lm_dataset(str(tmp_path / "a.txt"), lm_tokenizer, max_length=16, overflow="split")
    joined = sum((r.input_ids.tolist() for r in split), [])
    assert joined == ids_a + [eos] and max(len(r) for r in split) == 16


def test_prompt_completion_masks_exactly_the_completion(lm_tokenizer, tmp_path):
    rows = [
        {"prompt": "Question: what is KD?\nAnswer:", "completion": " matching a teacher."},
        {"prompt": "2 + 2 =", "completion": " 4"},
    ]
    f = _jsonl(tmp_path / "pc.jsonl", rows)
    ds = load_lm_dataset(f, lm_tokenizer, format="prompt_completion", loss_on="completion")
    for row, r in zip(ds, rows, strict=True):
        p = lm_tokenizer(r["prompt"])["input_ids"]
        c = lm_tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        assert row.input_ids.tolist() == p + c + [lm_tokenizer.eos_token_id]
        assert row.trainable.tolist() == [False] * len(p) + [True] * (len(c) + 1)
    every = load_lm_dataset(f, lm_tokenizer, format="prompt_completion", loss_on="all")
    assert every[0].trainable.all()


def test_chat_assistant_spans_template_and_incremental_agree(lm_tokenizer, tmp_path):
    rendered = lm_tokenizer.apply_chat_template(CHATS[0]["messages"], tokenize=False)
    assert rendered == (
        "<|im_start|>user\nWhat is a teacher?<|im_end|>\n"
        "<|im_start|>assistant\nA large model.<|im_end|>\n"
    )
    f = _jsonl(tmp_path / "chat.jsonl", CHATS)
    ds = load_lm_dataset(f, lm_tokenizer, format="chat", loss_on="assistant", max_length=200)
    assert ds.description["assistant_mask"] == "template"
    texts = [lm_tokenizer.decode(r.input_ids[r.trainable]) for r in ds]
    assert texts == [
        "A large model.<|im_end|>",
        "KL divergence.<|im_end|>Cross-entropy, with T.<|im_end|>",
    ]
    plain = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    lm_tokenizer.chat_template = plain
    try:
        inc = load_lm_dataset(
            f, lm_tokenizer, format="chat", loss_on="assistant_spans", max_length=200
        )
    finally:
        lm_tokenizer.chat_template = CHATML_TEMPLATE
    assert inc.description["assistant_mask"] == "incremental"
    for a, b in zip(ds, inc, strict=True):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.trainable.tolist() == b.trainable.tolist()


def test_pack_keeps_documents_whole_and_in_order(lm_tokenizer, tmp_path):
    words = PARAGRAPH.split()
    rows = [{"text": " ".join(words[i : i + 1 + i % 7])} for i in range(30)]
    f = _jsonl(tmp_path / "t.jsonl", rows)
    plain = load_lm_dataset(f, lm_tokenizer, max_length=32)
    packed = load_lm_dataset(f, lm_tokenizer, max_length=32, pack=True)
    assert len(packed) < len(plain) and all(len(r) <= 32 for r in packed)
    docs = []
    for r in packed:
        for d in r.doc_ids.unique().tolist():
            docs.append(r.input_ids[r.doc_ids == d].tolist())
        assert (r.doc_ids.diff() >= 0).all() and r.doc_ids[0] == 0
    assert docs == [r.input_ids.tolist() for r in plain]
    assert packed.description["fill"] > 0.7
    assert packed.fingerprint != plain.fingerprint
    assert (
        load_lm_dataset(f, lm_tokenizer, max_length=32, pack=True).fingerprint == packed.fingerprint
    )


def test_errors_name_the_file_line_and_fix(lm_tokenizer, tmp_path):
    def err(paths, **kw):
        with pytest.raises(KDError) as e:
            load_lm_dataset(paths, lm_tokenizer, **kw)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "no file matches" in err(str(tmp_path / "*.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    assert "empty.txt: the file is empty" in err(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf" + "é ok".encode("latin-1"))
    assert "not UTF-8 at byte offset 3" in err(tmp_path / "latin.txt")
    f = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "only"}])
    msg = err(f, format="prompt_completion", loss_on="completion")
    assert "pc.jsonl:2" in msg and "'completion'" in msg and "['prompt']" in msg
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    assert "bad.jsonl:2: not valid JSON" in err(tmp_path / "bad.jsonl")
    assert "max_position_embeddings 64" in err(f, max_length=128, max_positions=64)
    assert "needs format 'prompt_completion'" in err(f, loss_on="completion")
    assert "did you mean ['chat']" in err(f, format="chats")
    # prompts longer than max_length leave no completion token: every token masked
    long = _jsonl(tmp_path / "long.jsonl", [{"prompt": PARAGRAPH, "completion": " x"}])
    assert "every token is masked" in err(
        long, format="prompt_completion", loss_on="completion", max_length=8, truncation="right"
    )
