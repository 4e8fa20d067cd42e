"""The one aligner: causal shift, padding, packing and loss masks for token-level KD.

The anchors' bug history is in this layer (shared/LM-ANCHORS.md C.9-C.12): DistillKit takes its
mask from *unshifted* labels (one-position offset at every prompt/completion/padding boundary),
Liger ignored ``ignore_index``, ModelOpt ignored loss masks. So every loss in kdkit reads the
same :class:`TokenBatch`, built here and pinned by property tests (``tests/test_lm_align.py``).

Convention: position ``j`` predicts token ``x[j+1]``. ``mask[j]`` is True iff ``x[j+1]`` is
trainable, ``x[j+1]`` is in the same document as ``x[j]`` and neither is padding; then
``labels[j] == input_ids[j+1]``, else ``labels[j] == -100``. A student's and a teacher's hidden
state at ``j`` are compared wherever ``mask[j]``; ``n_tokens = mask.sum()`` is the local count
(the trainer sums it over micro-batches and ranks for global normalization).

Packed rows (several documents in one row) get per-document ``position_ids`` and
:meth:`TokenBatch.model_inputs` gives them to the model *without* an attention mask: the model
then attends within each document as it would to the document alone, with its own sliding
window or chunked layers (:mod:`kdkit.lm.packing`; every family of
``tests/test_lm_families.py``, eager and sdpa on CPU): a packed batch's ``attention_mask`` is
None. No ``[B, 1, L, L]`` mask is built here
(:meth:`TokenBatch.block_mask` makes one on demand for modules that take only that). Batches
with one document per row keep the plain ``[B, L]`` padding mask, which lets sdpa use its fast
path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from kdkit.errors import KDError
from kdkit.lm.data import TokenRow

__all__ = ["IGNORE_INDEX", "Aligner", "TokenBatch"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenBatch:
    """A collated batch; ``B`` rows of ``L`` tokens (right padded).

    Attributes:
        input_ids: ``[B, L]`` int64, padding = ``pad_id``.
        position_ids: ``[B, L]`` int64, restarting at 0 at each document (0 on padding).
        attention_mask: ``[B, L]`` int64 (1 = token, 0 = padding) when no row is packed;
            **None** when one is: the documents are in ``position_ids`` (and ``doc_ids``), so
            ``hidden_and_head(model, ids, position_ids, attention_mask)`` lets the model attend
            within each document (:mod:`kdkit.lm.packing`). :attr:`padding_mask` is always there.
        labels: ``[B, L]`` int64, ``input_ids[:, j+1]`` where ``mask[:, j]``, else -100.
        mask: ``[B, L]`` bool, position ``j`` is trained (see the module docstring).
        doc_ids: ``[B, L]`` int64, document index within its row, -1 on padding.
        n_tokens: ``int(mask.sum())``.
        teacher: the cached teacher targets of the trained positions (a
            :class:`~kdkit.lm.cache.TopKTarget`, attached by the cache's collate), else None.
        packed: some row holds several documents.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    mask: torch.Tensor
    doc_ids: torch.Tensor
    n_tokens: int
    teacher: Any = None
    packed: bool = False

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """``input_ids``, ``position_ids``, ``attention_mask``: the keywords of
        :func:`kdkit.lm.models.hidden_and_head` (``hidden_and_head(model, **b.model_inputs())``)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
        }

    @property
    def padding_mask(self) -> torch.Tensor:
        """``[B, L]`` int64, 1 = token, 0 = padding (packed or not)."""
        return (self.doc_ids >= 0).long()

    def block_mask(self) -> torch.Tensor:
        """``[B, 1, L, L]`` bool, True = may attend: causal within each document (padding
        attends to padding). Built on demand, for modules that take only a dense mask."""
        n = self.input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.doc_ids.device).tril()
        return ((self.doc_ids[:, :, None] == self.doc_ids[:, None, :]) & causal)[:, None]

    def rows(self) -> list[TokenRow]:
        """The rows (on the CPU) that the :class:`Aligner` collates back into this batch's ids,
        documents and ``mask``: a token is trainable where the position before it is trained.
        What a served teacher is sent, for data batches and on-policy samples alike."""
        ids, doc, mask = self.input_ids.cpu(), self.doc_ids.cpu(), self.mask.cpu()
        out = []
        for i in range(ids.shape[0]):
            n = int((doc[i] >= 0).sum())
            trainable = torch.zeros(n, dtype=torch.bool)
            trainable[1:] = mask[i, : n - 1]
            out.append(TokenRow(ids[i, :n].clone(), trainable, doc[i, :n].clone()))
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
            or (f.name == "teacher" and getattr(self, f.name) is not None)
        }
        return replace(self, **moved)


def _positions(doc: torch.Tensor) -> torch.Tensor:
    """Per-document positions for one row's doc ids (contiguous runs)."""
    n = doc.numel()
    idx = torch.arange(n)
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = doc[1:] != doc[:-1]
    start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    return idx - start_idx


@dataclass(frozen=True)
class Aligner:
    """Collate :class:`~kdkit.lm.data.TokenRow` s into a :class:`TokenBatch` (a ``collate_fn``).

    Args:
        pad_id: token id written on padding (never trained, never attended to by tokens).
        max_length: longest row accepted; a longer row is an error (the dataset truncates).
        pad_to_multiple_of: round ``L`` up (e.g. 8 for tensor cores); ``None`` = longest row.
        pad_to_max_length: always ``L = max_length`` (fixed shapes, e.g. for compiled steps).
    """

    pad_id: int
    max_length: int
    pad_to_multiple_of: int | None = None
    pad_to_max_length: bool = False

    def _width(self, longest: int) -> int:
        if self.pad_to_max_length:
            return self.max_length
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            return min(-(-longest // m) * m, max(self.max_length, longest))
        return longest

    def __call__(self, rows: Sequence[TokenRow]) -> TokenBatch:
        if not rows:
            raise KDError("cannot collate an empty list of rows")
        longest = max(len(r) for r in rows)
        if longest > self.max_length:
            raise KDError(
                f"a row has {longest} tokens > the aligner's max_length {self.max_length}; "
                "build the dataset with the same max_length"
            )
        b, width = len(rows), self._width(longest)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        trainable = torch.zeros((b, width), dtype=torch.bool)
        doc = torch.full((b, width), -1, dtype=torch.long)
        pos = torch.zeros((b, width), dtype=torch.long)
        packed = False
        for i, r in enumerate(rows):
            n = len(r)
            ids[i, :n] = r.input_ids
            trainable[i, :n] = r.trainable
            doc[i, :n] = r.doc_ids
            pos[i, :n] = _positions(r.doc_ids)
            packed = packed or bool((r.doc_ids[1:] != r.doc_ids[:-1]).any())
        mask = torch.zeros((b, width), dtype=torch.bool)
        mask[:, :-1] = trainable[:, 1:] & (doc[:, 1:] == doc[:, :-1]) & (doc[:, :-1] >= 0)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        labels[:, :-1] = torch.where(mask[:, :-1], ids[:, 1:], IGNORE_INDEX)
        attention = None if packed else (doc >= 0).long()
        return TokenBatch(ids, pos, attention, labels, mask, doc, int(mask.sum()), packed=packed)
