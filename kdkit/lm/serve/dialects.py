"""What a served teacher says about itself, and kdkit's own protocol.

Two protocols reach a teacher: kdkit's (``kdkit lm serve``: ``/kdkit/v1/info`` and the binary
``/kdkit/v1/topk``, :mod:`kdkit.lm.serve.wire`) and vLLM's OpenAI-compatible
``/v1/completions`` with ``prompt_logprobs`` (:mod:`kdkit.lm.serve.vllm`). Each is a *dialect*:
``connect`` reads the server's identity into a :class:`ServedInfo`, ``topk`` scores rows into
a :class:`~kdkit.lm.topk.TopK`; the client (:mod:`kdkit.lm.serve.client`) adds retries, checks
and prefetch around either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kdkit.errors import KDError
from kdkit.lm.data import TokenRow
from kdkit.lm.serve.http import Http, Refused
from kdkit.lm.serve.wire import INFO_PATH, MEDIA_TYPE, TOPK_PATH, VERSION, decode_topk, encode_rows
from kdkit.lm.topk import TopK

__all__ = ["Dialect", "KdkitDialect", "ServedInfo", "entries_of"]


@dataclass(frozen=True)
class ServedInfo:
    """A served teacher's identity.

    Attributes:
        fingerprint: what a run records and compares (changes: refused).
        model: what the server calls its model.
        teacher: weights' sha256, engine, dtype, head rows, vocabulary, transform (kdkit's
            server; ``{}`` for vLLM, which does not say).
        tokenizer: the tokenizer's fingerprint (kdkit's server), or None.
        vocab: the real vocabulary its top-k ids come from, or None (vLLM: the run's tokenizer).
        max_positions: the longest row it takes, when it says.
        temperature: None when it applies the temperature asked for; 1.0 for vLLM, whose
            prompt log-probs are always the raw distribution.
        packing: it scores packed rows (several documents) within each document.
    """

    fingerprint: str
    model: str
    teacher: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    vocab: int | None = None
    max_positions: int | None = None
    temperature: float | None = None
    packing: bool = True


class Dialect(Protocol):
    name: str

    def connect(self, http: Http) -> ServedInfo: ...

    def topk(
        self,
        http: Http,
        rows: Sequence[TokenRow],
        *,
        info: ServedInfo,
        vocab: int,
        k: int,
        temperature: float,
        mass: bool,
    ) -> TopK: ...


def entries_of(rows: Sequence[TokenRow]) -> int:
    """The trained positions of ``rows`` as the :class:`~kdkit.lm.align.Aligner` marks them:
    position ``j`` when token ``j+1`` is trainable and in ``j``'s document."""
    return sum(
        int((r.trainable[1:] & (r.doc_ids[1:] == r.doc_ids[:-1])).sum()) for r in rows if len(r)
    )


def positive_int(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if ok else None


class KdkitDialect:
    """``kdkit lm serve``'s own protocol: its fingerprint, and float32 top-k as safetensors."""

    name = "kdkit"

    def connect(self, http: Http) -> ServedInfo:
        try:
            body = http.json("GET", INFO_PATH)
        except Refused as err:
            if err.status in (401, 403):
                raise
            body = None
        ok = isinstance(body, dict) and body.get("format") == "kdkit-served-teacher"
        if not ok:
            raise KDError(
                f"{http.url} is not kdkit lm serve (no teacher at {INFO_PATH}); for a vLLM "
                "server set teacher.served.protocol: vllm"
            )
        if body.get("version") != VERSION:
            raise KDError(
                f"the served teacher at {http.url} speaks version {body.get('version')!r}; this "
                f"kdkit speaks {VERSION} (run the same kdkit on both machines)"
            )
        teacher, tokenizer = body.get("teacher"), body.get("tokenizer")
        vocab = positive_int(teacher.get("vocab")) if isinstance(teacher, dict) else None
        if not (isinstance(tokenizer, dict) and vocab and isinstance(body.get("fingerprint"), str)):
            raise KDError(
                f"{http.url}{INFO_PATH}: its teacher, tokenizer or fingerprint is missing"
            )
        return ServedInfo(
            fingerprint=body["fingerprint"],
            model=str(body.get("model", "")),
            teacher=teacher,
            tokenizer=tokenizer,
            vocab=vocab,
            max_positions=positive_int(body.get("max_positions")),
            packing=bool(body.get("packing", True)),
        )

    def topk(
        self,
        http: Http,
        rows: Sequence[TokenRow],
        *,
        info: ServedInfo,
        vocab: int,
        k: int,
        temperature: float,
        mass: bool,
    ) -> TopK:
        body = encode_rows(list(rows), topk=k, temperature=temperature, mass=mass)
        response = http.request(
            "POST", TOPK_PATH, content=body, headers={"Content-Type": MEDIA_TYPE}
        )
        return decode_topk(
            response.content,
            entries=entries_of(rows),
            topk=k,
            vocab=vocab,
            temperature=temperature,
            fingerprint=info.fingerprint,
            mass=mass,
        )


def empty_topk(k: int) -> TopK:
    return TopK(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))
