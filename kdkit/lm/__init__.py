"""Token-level distillation of language models (``task: lm``).

Local Hugging Face models and tokenizers only (nothing downloads): tokenizers trained offline
(:mod:`kdkit.lm.tokenizer`), model strings ``hf:PATH`` / ``hf-config:PATH``
(:mod:`kdkit.lm.models`), text / prompt-completion / chat data (:mod:`kdkit.lm.data`), the one
aligner that owns the causal shift, padding, packing and masks (:mod:`kdkit.lm.align`) and the
vocabulary check between student and teacher (:mod:`kdkit.lm.vocab`).

Names are loaded lazily (PEP 562) so ``import kdkit.lm`` does not import ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "train_bpe_tokenizer": "kdkit.lm.tokenizer",
    "tokenizer_fingerprint": "kdkit.lm.tokenizer",
    "CHATML_TEMPLATE": "kdkit.lm.tokenizer",
    "load_lm": "kdkit.lm.models",
    "hidden_and_head": "kdkit.lm.models",
    "freeze_teacher": "kdkit.lm.models",
    "max_positions": "kdkit.lm.models",
    "HiddenAndHead": "kdkit.lm.models",
    "TokenRow": "kdkit.lm.data",
    "LMDataset": "kdkit.lm.data",
    "load_lm_dataset": "kdkit.lm.data",
    "Aligner": "kdkit.lm.align",
    "TokenBatch": "kdkit.lm.align",
    "check_vocab": "kdkit.lm.vocab",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdkit.lm' has no attribute {name!r}")
