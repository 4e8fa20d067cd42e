"""What the ``task: lm`` rows start from: a tokenizer trained here, a tiny teacher with weights,
a student config, a corpus and a config (:class:`LMFiles`, ``fx.lm``), and on first use a
finished run and a top-k cache of that config (copy them to change them)."""

from __future__ import annotations

import copy
import functools
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .make import write_yaml

VOCAB = 300
TEXT = (
    "Knowledge distillation trains a small student to match a large teacher. The student sees "
    "the teacher's distribution over the next token, not only the one token that came next.\n"
)


def tiny_llama(seed: int = 0, vocab: int = VOCAB, **overrides: Any):
    """A random Llama: hidden 16, 1 layer, 2 heads, 64 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64)  # fmt: skip
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def corpus_text(seed: int = 0) -> str:
    """About 3 KB of real text (the stdlib's textwrap.py) and a paragraph."""
    source = Path(textwrap.__file__).read_text(encoding="utf-8")
    return source[seed * 500 : seed * 500 + 2500] + TEXT * 4


@dataclass
class LMFiles:
    root: Path
    tokenizer: Path  # a save_pretrained tokenizer folder (eos, pad, ChatML)
    teacher: Path  # hf: weights + tokenizer
    student: Path  # hf-config: config.json + tokenizer
    corpus: Path  # a plain text file

    def config(self, **sections: Any) -> dict:
        """A config that trains in about two seconds; ``sections`` update its sections (a
        dict updates the section's keys, anything else replaces it)."""
        cfg = {
            "task": "lm",
            "name": "tiny-lm",
            "student": {"model": f"hf-config:{self.student}"},
            "teacher": {"model": f"hf:{self.teacher}"},
            "data": {
                "text_files": [str(self.corpus)],
                "val": {"split": 0.25},
                "max_length": 32,
                "batch_size": 8,
            },  # fmt: skip
            "distill": {"divergence": "fkl", "ce_weight": 0.1},
            "train": {
                "epochs": 1,
                "device": "cpu",
                "progress": False,
                "optimizer": {"name": "AdamW", "lr": 0.003},
            },  # fmt: skip
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **copy.deepcopy(value)}
            else:
                cfg[key] = copy.deepcopy(value)
        return cfg

    def write(self, name: str, cfg: dict | None = None, **sections: Any) -> Path:
        """``cfg`` (or :meth:`config` of ``sections``) as ``root/work/NAME.yaml``."""
        return write_yaml(self.root / "work" / f"{name}.yaml", cfg or self.config(**sections))

    def folder(self, name: str) -> Path:
        """A fresh empty ``root/work/NAME``."""
        path = self.root / "work" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def copy(self, src: Path, name: str) -> Path:
        dst = self.folder(name)
        shutil.rmtree(dst)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        return dst

    def model_folder(self, name: str, **config: Any) -> Path:
        """A teacher folder (weights and tokenizer) whose config.json is edited by ``config``
        (after saving: the weights stay those of the tiny Llama)."""
        import json

        out = self.copy(self.teacher, name)
        data = json.loads((out / "config.json").read_text())
        data.update(config)
        (out / "config.json").write_text(json.dumps(data))
        return out

    @functools.cached_property
    def run(self) -> Path:
        """A finished one-epoch ``kdkit train`` run of :meth:`config` (read only)."""
        from kdkit.cli import main

        run = self.root / "run"
        assert main(["train", str(self.write("run")), "--run-dir", str(run)]) == 0
        return run

    @functools.cached_property
    def cache(self) -> Path:
        """A finished top-k cache of :meth:`config` (``--topk 4``, 8 rows a shard; read only)."""
        from kdkit.cli import main

        out = self.root / "cache"
        argv = ["precompute", str(self.write("capture")), "--out", str(out), "--topk", "4"]
        assert main([*argv, "--shard-rows", "8", "--no-progress"]) == 0
        return out


def build_lm_files(root: Path) -> LMFiles:
    from kdkit.lm.tokenizer import train_bpe_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok_dir = train_bpe_tokenizer([corpus_text(), TEXT * 20], VOCAB, root / "tok")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    teacher, student = root / "teacher", root / "student"
    tiny_llama(seed=1).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    tiny_llama(seed=2, hidden_size=8, intermediate_size=16).config.save_pretrained(student)
    tok.save_pretrained(student)
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text())
    return LMFiles(root, tok_dir, teacher, student, corpus)
