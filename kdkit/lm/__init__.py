"""Token-level distillation of language models (``task: lm``).

Local Hugging Face models and tokenizers only (nothing downloads): tokenizers trained offline
(:mod:`kdkit.lm.tokenizer`), model strings ``hf:PATH`` / ``hf-config:PATH``
(:mod:`kdkit.lm.models`), text / prompt-completion / chat data (:mod:`kdkit.lm.data`), the one
aligner that owns the causal shift, padding, packing and masks (:mod:`kdkit.lm.align`), the
vocabulary check (:mod:`kdkit.lm.vocab`), the divergences (:mod:`kdkit.lm.divergence`), the
fused loss that never holds ``[tokens, vocab]`` logits (:mod:`kdkit.lm.fused`), what each model
family does after its head (:mod:`kdkit.lm.logits`), packed rows through each model's own
attention (:mod:`kdkit.lm.packing`), the logits probe (:mod:`kdkit.lm.probe`), a MoE student's
router loss (:mod:`kdkit.lm.moe`), the task the Trainer runs (:mod:`kdkit.lm.task`), a teacher run by ONNX Runtime
(:mod:`kdkit.lm.onnx_teacher`) and on-policy sampling (GKD, :mod:`kdkit.lm.onpolicy`).

Names are loaded lazily (PEP 562) so ``import kdkit.lm`` does not import ``transformers``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LMTask": "kdkit.lm.task",
    "TokenInputs": "kdkit.lm.task",
    "DIVERGENCES": "kdkit.lm.divergence",
    "divergence_value": "kdkit.lm.divergence",
    "value_and_grad": "kdkit.lm.divergence",
    "token_divergence": "kdkit.lm.fused",
    "LossOutput": "kdkit.lm.fused",
    "DenseTeacher": "kdkit.lm.fused",
    "DenseLogits": "kdkit.lm.fused",
    "TeacherTarget": "kdkit.lm.fused",
    "train_bpe_tokenizer": "kdkit.lm.tokenizer",
    "tokenizer_fingerprint": "kdkit.lm.tokenizer",
    "token_byte_lengths": "kdkit.lm.tokenizer",
    "CHATML_TEMPLATE": "kdkit.lm.tokenizer",
    "load_lm": "kdkit.lm.models",
    "load_tokenizer": "kdkit.lm.models",
    "hidden_and_head": "kdkit.lm.models",
    "freeze_teacher": "kdkit.lm.models",
    "max_positions": "kdkit.lm.models",
    "HiddenAndHead": "kdkit.lm.models",
    "decoder_outputs": "kdkit.lm.models",
    "OutputTransform": "kdkit.lm.logits",
    "output_transform": "kdkit.lm.logits",
    "ProbeResult": "kdkit.lm.probe",
    "probe_model": "kdkit.lm.probe",
    "TokenRow": "kdkit.lm.data",
    "LMDataset": "kdkit.lm.data",
    "load_lm_dataset": "kdkit.lm.data",
    "Aligner": "kdkit.lm.align",
    "TokenBatch": "kdkit.lm.align",
    "check_vocab": "kdkit.lm.vocab",
    "OnnxLMTeacher": "kdkit.lm.onnx_teacher",
    "export_lm_onnx": "kdkit.lm.onnx_export",
    "OnPolicy": "kdkit.lm.onpolicy",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kdkit.lm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
