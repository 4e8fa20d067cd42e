"""The teacher behind ``kdkit lm serve``: token rows in, the cache's top k out, and its identity.

:class:`TeacherScorer` holds a loaded, frozen teacher (a torch model on the CPU or a GPU, or the
ONNX / int8 engine, :class:`~kdkit.lm.onnx_teacher.OnnxLMTeacher`) and its tokenizer. It
collates the rows of every request the server merged into one batch with the same
:class:`~kdkit.lm.align.Aligner` training uses, and computes :func:`~kdkit.lm.topk.teacher_topk`
(the family's output transform applied, at the temperature asked) for all of them at once.

Its fingerprint (:attr:`TeacherScorer.fingerprint`) is a sha256 over what decides the
distribution a client trains on: the weights' sha256, the engine and dtype, the head's rows,
the real vocabulary, the output transform, and the tokenizer's fingerprint (vocabulary content,
special ids, chat template, tokenization rules). Where the model folder lies and which device
runs it are not in it, so a restarted server with the same teacher is the same teacher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm.align import Aligner
from kdkit.lm.cache.format import tokenizer_fingerprint
from kdkit.lm.data import TokenRow
from kdkit.lm.logits import output_transform
from kdkit.lm.models import max_positions, output_head
from kdkit.lm.packing import check_packing
from kdkit.lm.serve.wire import VERSION, Limits
from kdkit.lm.tokenizer import pad_id
from kdkit.lm.topk import TopK, teacher_topk
from kdkit.lm.vocab import tokenization_fingerprint

__all__ = ["TeacherScorer", "split_topk"]


def _packs(teacher: nn.Module) -> str | None:
    """None when the family attends within each document of a packed row, else why not."""
    try:
        check_packing(teacher, "teacher")
    except KDError as err:
        return str(err)
    return None


class TeacherScorer:
    """A frozen teacher that scores token rows (the compute half of ``kdkit lm serve``).

    Args:
        teacher: a causal LM with the :func:`~kdkit.lm.models.hidden_and_head` protocol,
            already frozen and on ``device``.
        tokenizer: its tokenizer (the client's must be the same).
        model: how the teacher was named (``hf:DIR``), for people reading ``/kdkit/v1/info``.
        weights_sha256: the fingerprint of its weights, whatever engine runs them.
        engine: ``"torch fp32"``, ``"onnx int8"``...
        device: where batches go.
        max_topk, max_tokens: the largest ``k`` and the most tokens one request may ask for.
    """

    def __init__(
        self,
        teacher: nn.Module,
        tokenizer: Any,
        *,
        model: str,
        weights_sha256: str,
        engine: str,
        device: torch.device | str = "cpu",
        max_topk: int | None = None,
        max_tokens: int = 1 << 16,
    ) -> None:
        self.teacher, self.tokenizer = teacher, tokenizer
        self.device = torch.device(device)
        self.pad_id = pad_id(tokenizer)
        head_rows = output_head(teacher).out_features
        embeddings = getattr(teacher, "get_input_embeddings", lambda: None)()
        input_rows = getattr(embeddings, "num_embeddings", head_rows)
        self.vocab = min(head_rows, len(tokenizer))  # padded head rows are never a target
        self.positions = max_positions(teacher)
        self.no_packing = _packs(teacher)
        transform = output_transform(teacher)
        self.limits = Limits(
            vocab_rows=input_rows,
            vocab=self.vocab,
            max_topk=min(max_topk or self.vocab, self.vocab),
            max_tokens=max_tokens,
            max_positions=self.positions,
        )
        param = next(iter(teacher.parameters()), None)
        teacher_info = {
            "weights_sha256": weights_sha256,
            "engine": engine,
            "dtype": str(param.dtype).removeprefix("torch.") if param is not None else "",
            "vocab_rows": head_rows,
            "vocab": self.vocab,
            "transform": transform.describe(),
            "family": transform.family,
        }
        tokenizer_info = {
            **tokenizer_fingerprint(tokenizer),
            "tokenization_sha256": tokenization_fingerprint(tokenizer),
        }
        body = json.dumps({"teacher": teacher_info, "tokenizer": tokenizer_info}, sort_keys=True)
        #: what a client compares: the same teacher, tokenizer and transform, or refused
        self.fingerprint = hashlib.sha256(body.encode()).hexdigest()
        self.info = {
            "format": "kdkit-served-teacher",
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "model": model,
            "device": str(self.device),
            "max_positions": self.positions,
            "packing": self.no_packing is None,
            "teacher": teacher_info,
            "tokenizer": tokenizer_info,
            "limits": {"max_topk": self.limits.max_topk, "max_tokens": max_tokens},
        }

    def check_rows(self, rows: Sequence[TokenRow]) -> None:
        """Refuse packed rows for a family that would attend across their documents."""
        if self.no_packing is not None and any(
            bool((r.doc_ids[1:] != r.doc_ids[:-1]).any()) for r in rows
        ):
            raise KDError(self.no_packing)

    def score(
        self,
        rows: Sequence[TokenRow],
        *,
        topk: int,
        temperature: float,
        mass: bool = False,
        labels: bool = False,
    ) -> tuple[TopK, list[int]]:
        """The :class:`TopK` of ``rows`` (one batch) and each row's number of entries."""
        longest = max(len(r) for r in rows)
        batch = Aligner(pad_id=self.pad_id, max_length=longest)(list(rows))
        top = teacher_topk(
            self.teacher,
            batch.to(self.device),
            self.vocab,
            topk,
            temperature,
            mass=mass,
            labels=labels,
        )
        return top, batch.mask.sum(1).tolist()


def split_topk(top: TopK, counts: Sequence[int]) -> list[TopK]:
    """``top`` cut into consecutive parts of ``counts`` entries (one per merged request), on the
    CPU; the ``mass`` goes with the first part (a request that asks for it is scored alone)."""
    out, start = [], 0
    cpu = {k: getattr(top, k) for k in ("ids", "logp", "tail", "label_logp", "label_rank")}
    cpu = {k: None if v is None else v.cpu() for k, v in cpu.items()}
    for i, n in enumerate(counts):
        part = {k: None if v is None else v[start : start + n] for k, v in cpu.items()}
        out.append(TopK(mass=top.mass if i == 0 else None, **part))
        start += n
    return out
