"""Pairs of tokenizers that differ the way real ones do, trained here in well under a second.

``tok_a``: 2,000 tokens, numbers merged (``Ġ123``), no BOS (GPT-2 / Qwen-2-like).
``tok_b``: 3,000 tokens, every digit its own token and a ``<|begin_of_text|>`` BOS prepended to
every text (Llama-3-like in its BOS, Qwen3 / Llama-2-like in its digits), so the merges differ
too. Both are kdkit's byte-level BPE (:func:`kdkit.lm.tokenizer.train_bpe_tokenizer`), trained on
stdlib sources plus generated text with numbers, accents, emoji and CJK, once per session.
Import the fixtures into a test module (``from _xtok_fixtures import tok_a, tok_b  # noqa``).
"""

from __future__ import annotations

import argparse
import difflib
import json.decoder
import random
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

VOCAB_A, VOCAB_B = 2000, 3000


def xtok_corpus() -> list[str]:
    """Real text (four stdlib modules) and generated lines with numbers and non-Latin text."""
    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, argparse, difflib)]
    texts.append(Path(json.decoder.__file__).read_text(encoding="utf-8"))
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        a, b = rng.randrange(10, 99999), rng.randrange(1, 999)
        lines.append(f"In {rng.randrange(1900, 2030)} the total was {a} + {b} = {a + b} units.")
    lines.append("Überraschung: naïve café, 日本語のテキスト, emoji 🙂🚀 and Ω≈ç√.\n" * 20)
    texts.append("\n".join(lines))
    return texts


def random_text(rng: random.Random, n: int = 40) -> str:
    """A random text mixing the hard cases: digits, spaces, newlines, accents, CJK, emoji."""
    atoms = [
        "the",
        " cat",
        " 1234",
        "5",
        " 42.0",
        "\n",
        "  ",
        "\t",
        "é",
        "naïve",
        "日本",
        "🙂",
        "🚀x",
        " def",
        "(",
        ")",
        "==",
        " ∑",
        "x",
        " ",
        "ß",
        "0",
        "999999",
    ]
    return "".join(rng.choice(atoms) for _ in range(n))


@pytest.fixture(scope="session")
def tok_a_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdkit.lm.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(xtok_corpus(), VOCAB_A, tmp_path_factory.mktemp("tok_a"))


@pytest.fixture(scope="session")
def tok_b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdkit.lm.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(
        xtok_corpus(),
        VOCAB_B,
        tmp_path_factory.mktemp("tok_b"),
        split_digits=True,
        bos_token="<|begin_of_text|>",
    )


def _load(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="session")
def tok_a(tok_a_dir: Path):
    return _load(tok_a_dir)


@pytest.fixture(scope="session")
def tok_b(tok_b_dir: Path):
    return _load(tok_b_dir)


#: SentencePiece-style tokenizers with a dummy prefix (:func:`sentencepiece_like`)
SP_VARIANTS = ("metaspace", "always", "prepend")


def sentencepiece_like(variant: str = "metaspace", vocab: int = 1000):
    """A SentencePiece-style BPE that writes a space before every text, Llama-2-like: an ASCII
    alphabet with ``<0x00>``..``<0xFF>`` byte fallback, ``▁`` for a space, trained on
    :func:`xtok_corpus`. ``metaspace``: a Metaspace pre-tokenizer, ``prepend_scheme: first``
    (the space only at a text's start, and not before a text that starts with one);
    ``always``: the same with ``prepend_scheme: always`` (also after a special token);
    ``prepend``: the normalizer ``Prepend("▁")`` + ``Replace(" ", "▁")`` of Llama-2's
    tokenizer.json (always, even before a space) and ``<s>`` prepended to every text."""
    import json

    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(prepend_scheme="first")
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "▁"]
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(xtok_corpus(), trainer)
    data = json.loads(tok.to_str())
    vocab_ids = data["model"]["vocab"]
    for b in range(256):
        vocab_ids.setdefault(f"<0x{b:02X}>", len(vocab_ids))
    data["model"]["byte_fallback"] = True
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    if variant == "always":
        data["pre_tokenizer"]["prepend_scheme"] = "always"
    elif variant == "prepend":
        data["pre_tokenizer"] = None
        data["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }
        bos = vocab_ids["<s>"]
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}},
        }
    elif variant != "metaspace":
        raise ValueError(variant)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk.Tokenizer.from_str(json.dumps(data)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="session", params=SP_VARIANTS)
def sp_tok(request: pytest.FixtureRequest):
    """Each :func:`sentencepiece_like` variant (built once per session)."""
    return _sp_cached(request.param)


def _sp_cached(variant: str, _memo: dict = {}):  # noqa: B006 - a per-session memo
    if variant not in _memo:
        _memo[variant] = sentencepiece_like(variant)
    return _memo[variant]
