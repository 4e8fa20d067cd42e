"""Packed rows (several documents in one row) given to each model the way it attends.

A packed row must give every document exactly the attention it would get alone: causal, and
within the document, with the family's own sliding window (Mistral, Qwen2, Gemma 2/3, Cohere 2,
Starcoder2, Phi-3) or chunked/local layers (Llama 4). kdkit does not re-implement any of these. A Hugging Face model gets the row's ``position_ids`` (restarting at 0
at each document) and **no** attention mask: transformers then finds the documents itself
(``masking_utils.find_packed_sequence_indices``) and builds, for every layer type, the mask of
its own attention (a bool mask for sdpa, a ``BlockMask`` for flex attention, ``cu_seqlens`` for
flash-attention). kdkit never builds a ``[B, 1, L, L]`` mask for these models; before, it built
a bool one in the collate and an additive float one of the model's dtype for every forward
(L=4096, 8 rows: 128 MiB + 512 MiB), which also bypassed every sliding window (a 4D mask is used
as given), so a Mistral document longer than its window attended outside it.

Some families do not take this path in the installed transformers: their decoder builds its
mask without ``position_ids`` (or computes positions from the mask), so a packed row attends
across documents (measured in ``tests/test_lm_families.py``). ``data.pack: true`` is refused for
them (:func:`check_packing`), and the logits probe checks every other family on a packed row
built from real tokens (:mod:`kdkit.lm.probe`).

A module that is not a Hugging Face model either says it packs by ``position_ids`` (a class
attribute ``packs_with_position_ids = True``, as :class:`~kdkit.lm.onnx_teacher.OnnxLMTeacher`
does) or gets a ``[B, 1, L, L]`` bool block-causal mask (its forward must take
``attention_mask``); that mask is the protocol's, built only for such modules.
"""

from __future__ import annotations

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm.logits import family_of

__all__ = [
    "CANNOT_PACK",
    "block_mask",
    "check_packing",
    "document_ids",
    "packing_path",
    "positions_from_mask",
]

#: families whose decoder attends across documents of a packed row (transformers 5.23; tested)
CANNOT_PACK: dict[str, str] = {
    "opt": "OPT builds its mask and learned positions from attention_mask alone",
    "falcon": "Falcon's decoder ignores the documents in position_ids",
    "bloom": "BLOOM's ALiBi mask ignores the documents in position_ids",
    "gpt_oss": "GPT-OSS builds its full and sliding masks without position_ids",
}


def packing_path(model: nn.Module) -> str:
    """How packed rows reach ``model`` (the families matrix and the run's report)."""
    family = family_of(model)
    if family in CANNOT_PACK:
        return f"refused ({CANNOT_PACK[family]})"
    if getattr(model, "packs_with_position_ids", False):
        return "position_ids (the exported graph's own masks)"
    if hasattr(model, "config"):
        attn = str(getattr(model.config, "_attn_implementation", None) or "eager")
        if "flash" in attn:
            return f"position_ids -> cu_seqlens ({attn}, varlen)"
        return f"position_ids (transformers' packed-sequence masks, {attn})"
    return "[B, 1, L, L] bool block mask (kdkit protocol module)"


def check_packing(model: nn.Module, role: str) -> None:
    """A one-line KDError if ``model``'s family cannot take packed rows (``data.pack: true``)."""
    family = family_of(model)
    if family in CANNOT_PACK:
        raise KDError(
            f"data.pack: true cannot be used with the {role} ({family}): {CANNOT_PACK[family]}, "
            "so packed documents would attend to each other; set data.pack: false"
        )


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every token, ``[B, L]``: a new document wherever the position does not
    follow the one before (transformers' rule, ``find_packed_sequence_indices``)."""
    step = torch.ones_like(position_ids[:, :1])
    diff = torch.diff(position_ids, prepend=position_ids[:, :1] - step, dim=-1)
    return (diff != 1).long().cumsum(-1)


def block_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` bool, True = may attend: causal within each document of
    :func:`document_ids` (for protocol modules that take only a dense mask)."""
    doc = document_ids(position_ids)
    n = position_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Per-document positions ``[B, L]`` from a ``[B, 1, L, L]`` block-causal bool mask (a
    token's position is how many tokens it may attend to, minus one)."""
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # an additive float mask
    return (mask[:, 0].sum(-1) - 1).clamp(min=0)
