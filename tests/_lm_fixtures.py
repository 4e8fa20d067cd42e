"""Shared fixtures for the kdkit.lm tests: a BPE tokenizer trained here, tiny random Llamas.

Import the fixtures into a test module (``from _lm_fixtures import lm_tokenizer  # noqa``).
The corpus is real text that every machine has (the stdlib's ``textwrap.py``, ~20 KB) plus a
generated paragraph, so nothing is downloaded; tests never hard-code token ids, because the
stdlib file changes with the Python version.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

VOCAB = 320

PARAGRAPH = (
    "Knowledge distillation trains a small student to match a large teacher. The student sees "
    "the teacher's distribution over the next token, not only the one token that came next. "
    "Überraschung: naïve café text with accents and emoji 🙂 must round-trip too.\n"
)


def corpus() -> list[str]:
    return [Path(textwrap.__file__).read_text(encoding="utf-8"), PARAGRAPH * 20]


@pytest.fixture(scope="session")
def lm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdkit.lm.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus(), VOCAB, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def lm_tokenizer(lm_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(lm_tokenizer_dir), local_files_only=True)


def tiny_llama(vocab: int = VOCAB, attn: str = "eager", seed: int = 0, **overrides):
    """A random-init Llama: hidden 32, 2 layers, 2 heads, 64 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, lm_tokenizer) -> Path:
    """``save_pretrained`` folder of a tiny Llama and the test tokenizer (for ``hf:PATH``)."""
    out = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(out)
    lm_tokenizer.save_pretrained(out)
    return out
