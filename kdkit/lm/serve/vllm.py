"""vLLM's protocol: ``POST /v1/completions`` with ``prompt_logprobs``, both sides.

Field names as vLLM defines them (vllm-project/vllm, read at these commits):

- request ``CompletionRequest`` (``vllm/entrypoints/openai/completion/protocol.py``, 002032ee):
  ``model``, ``prompt`` (a list of token-id lists is taken as is, no BOS added),
  ``max_tokens`` (at least 1 is generated), ``prompt_logprobs`` (``k``, or -1 for the whole
  vocabulary; above the server's ``--max-logprobs``, default 20, the request is refused with
  "Requested prompt logprobs of K, which is greater than max allowed: 20");
- response ``CompletionResponseChoice.prompt_logprobs``: ``list[dict[int, Logprob] | None]``,
  one per prompt token, the first ``None``; ``Logprob`` is ``{"logprob", "rank",
  "decoded_token"}`` (``vllm/logprobs.py``, 578b601c): the prompt token's own entry first (its
  rank may be above k), then ranks 1..k, so a position holds k or k+1 entries; ``-inf`` is sent
  as ``-9999.0`` (``clamp_prompt_logprobs``);
- ``GET /v1/models`` (``id``, ``root``, ``max_model_len``), ``POST /tokenize`` (``prompt``,
  ``add_special_tokens`` -> ``tokens``, ``count``, ``max_model_len``).

vLLM computes prompt log-probs as ``log_softmax(compute_logits(hidden))`` in float32 before any
sampling processor (``vllm/v1/worker/gpu_model_runner.py``: "prompt tokens skip sampling
processors"): the temperature of the request does not apply, so they are the teacher's
distribution at T = 1, and the tail ``log(1 - sum exp(top k))`` is exact for the ``bucket``
tail (the only mass it needs is the rest's). At another KD temperature only ``renorm`` is exact.

SGLang's ``/v1/completions`` has no ``prompt_logprobs`` field; its prompt log-probs (``echo`` +
``logprobs``) are keyed by token *text* (``to_openai_style_logprobs``), not ids, and its
serving code says to use the native ``/generate`` for them: not a protocol this client speaks.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdkit.errors import KDError
from kdkit.lm.data import TokenRow
from kdkit.lm.divergence import log1mexp
from kdkit.lm.serve.dialects import ServedInfo, empty_topk, positive_int
from kdkit.lm.serve.http import Http
from kdkit.lm.serve.wire import check_topk_arrays
from kdkit.lm.topk import TopK

__all__ = ["VLLMDialect", "OpenAIError", "parse_completion", "completion_body", "models_body"]

COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
TOKENIZE = "/tokenize"
#: vLLM's stand-in for a -inf prompt log-probability (JSON has no infinity)
CLAMPED = -9999.0


def _segments(rows: Sequence[TokenRow]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """One prompt per document of each row, and ``(prompt, position)`` of every trained entry
    in the rows' mask order (entry at position ``j`` is ``prompt_logprobs[j + 1]``)."""
    prompts: list[list[int]] = []
    where: list[tuple[int, int]] = []
    for row in rows:
        ids, doc, trainable = row.input_ids.tolist(), row.doc_ids.tolist(), row.trainable.tolist()
        start = 0
        for end in range(1, len(ids) + 1):
            if end < len(ids) and doc[end] == doc[start]:
                continue
            trained = [j for j in range(start, end - 1) if trainable[j + 1]]
            if trained:
                where.extend((len(prompts), j - start) for j in trained)
                prompts.append(ids[start:end])
            start = end
    return prompts, where


def _position(entry: Any, k: int, what: str) -> tuple[list[int], list[float]]:
    """The k most likely ``(ids, logprobs)`` of one position's ``{id: Logprob}``."""
    if not isinstance(entry, dict) or len(entry) < k:
        raise KDError(f"{what}: a position holds {len(entry) if isinstance(entry, dict) else 0} "
                      f"log-probs, asked for {k}: refused")  # fmt: skip
    pairs = []
    for key, value in entry.items():
        lp = value.get("logprob") if isinstance(value, dict) else None
        if not (isinstance(lp, (int, float)) and not isinstance(lp, bool)):
            raise KDError(f"{what}: a log-prob is not a number: refused")
        try:
            pairs.append((-float(lp), int(key)))
        except ValueError:
            raise KDError(f"{what}: {key!r} is not a token id: refused") from None
    pairs.sort()
    return [i for _, i in pairs[:k]], [-lp for lp, _ in pairs[:k]]


class VLLMDialect:
    """vLLM's ``/v1/completions`` + ``prompt_logprobs`` (see the module docstring)."""

    name = "vllm"

    def connect(self, http: Http) -> ServedInfo:
        body = http.json("GET", MODELS)
        data = body.get("data") if isinstance(body, dict) else None
        if not (isinstance(data, list) and data and isinstance(data[0], dict)):
            raise KDError(f"{http.url}{MODELS} lists no model: not an OpenAI-compatible server")
        card = data[0]
        model = str(card.get("id", ""))
        own = card.get("kdkit")  # kdkit lm serve says who it is; vLLM does not
        if isinstance(own, dict) and isinstance(own.get("fingerprint"), str):
            teacher = own.get("teacher") if isinstance(own.get("teacher"), dict) else {}
            return ServedInfo(
                fingerprint=own["fingerprint"], model=model, teacher=teacher,
                tokenizer=own.get("tokenizer"), vocab=positive_int(teacher.get("vocab")),
                max_positions=positive_int(own.get("max_positions")), temperature=1.0,
                packing=True,
            )  # fmt: skip
        identity = {k: card.get(k) for k in ("id", "root", "max_model_len")}
        digest = hashlib.sha256(json.dumps({"vllm": identity}, sort_keys=True).encode())
        return ServedInfo(
            fingerprint=digest.hexdigest(),
            model=model,
            max_positions=positive_int(card.get("max_model_len")),
            temperature=1.0,
            packing=True,
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
        if mass:
            raise KDError(
                "a cache captured from a vLLM server would lack the teacher's whole distribution "
                "(the prior tail's shape): prompt_logprobs give the top k only; capture from "
                "kdkit lm serve (teacher.served.protocol: kdkit)"
            )
        if temperature != 1.0:
            raise KDError(f"vLLM's prompt log-probs are at temperature 1, asked {temperature:g}")
        prompts, where = _segments(rows)
        if not where:
            return empty_topk(k)
        body = http.json(
            "POST",
            COMPLETIONS,
            json={"model": info.model, "prompt": prompts, "max_tokens": 1, "prompt_logprobs": k},
        )
        what = f"the served teacher's answer ({http.url}{COMPLETIONS})"
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise KDError(f"{what} holds no choice per prompt: refused")
        by_index = {c.get("index"): c for c in choices if isinstance(c, dict)}
        lists = []
        for p, prompt in enumerate(prompts):
            plp = by_index.get(p, {}).get("prompt_logprobs")
            if not isinstance(plp, list) or len(plp) != len(prompt):
                raise KDError(f"{what}: prompt {p} has no prompt_logprobs for its {len(prompt)} "
                              "tokens: refused")  # fmt: skip
            lists.append(plp)
        ids = np.empty((len(where), k), dtype=np.int64)
        logp = np.empty((len(where), k), dtype=np.float64)
        for e, (p, j) in enumerate(where):
            ids[e], logp[e] = _position(lists[p][j + 1], k, what)
        lse = torch.logsumexp(torch.from_numpy(logp), dim=1)
        tail = log1mexp(lse).float().numpy()
        logp32 = logp.astype(np.float32)
        check_topk_arrays(ids, logp32, tail, vocab, what)
        return TopK(torch.from_numpy(ids), torch.from_numpy(logp32), torch.from_numpy(tail))


def tokenize_probe(http: Http, model: str, text: str) -> list[int] | None:
    """vLLM's ``/tokenize`` of ``text`` without special tokens, or None if it has none."""
    try:
        body = http.json(
            "POST", TOKENIZE, json={"model": model, "prompt": text, "add_special_tokens": False}
        )
    except KDError:
        return None
    tokens = body.get("tokens") if isinstance(body, dict) else None
    ok = isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
    return tokens if ok else None


# -- the server's side (kdkit lm serve answers vLLM's protocol too) ---------------------------
class OpenAIError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param=None):
        super().__init__(message)
        self.status, self.body = (
            status,
            {"error": {"message": message, "type": kind, "param": param, "code": status}},
        )


def _token_prompts(prompt: Any) -> list[list[int]] | None:
    def ids(x: Any) -> bool:
        return (
            isinstance(x, list)
            and bool(x)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        )

    if ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(ids(p) for p in prompt):
        return prompt
    return None


def parse_completion(
    data: Any, *, name: str, max_logprobs: int, vocab_rows: int, vocab: int
) -> tuple[list[list[int]], int | None]:
    """``(prompts, k)`` of a ``/v1/completions`` body kdkit's server can answer (``k`` None:
    no ``prompt_logprobs`` asked), or :class:`OpenAIError` as vLLM words it."""
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    if data.get("model") not in (None, name):
        raise OpenAIError(404, f"The model `{data.get('model')}` does not exist.",
                          "NotFoundError", "model")  # fmt: skip
    prompts = _token_prompts(data.get("prompt"))
    if prompts is None:
        raise OpenAIError(400, "kdkit lm serve scores token-id prompts only (a list of ids or "
                          "a list of lists): tokenize on the client", param="prompt")  # fmt: skip
    if data.get("stream") or data.get("n", 1) != 1 or data.get("logprobs") is not None:
        raise OpenAIError(400, "kdkit lm serve scores prompts: no stream, n 1, no sampled "
                          "logprobs (it generates no token)")  # fmt: skip
    if any(t < 0 or t >= vocab_rows for p in prompts for t in p):
        raise OpenAIError(400, f"token ids must be in [0, {vocab_rows})", param="prompt")
    k = data.get("prompt_logprobs")
    if k is None:
        return prompts, None
    if not isinstance(k, int) or isinstance(k, bool) or (k < 0 and k != -1):
        raise OpenAIError(400, "`prompt_logprobs` must be a positive value or -1.",
                          param="prompt_logprobs")  # fmt: skip
    k = vocab if k == -1 else k
    if k > max_logprobs:
        raise OpenAIError(400, f"Requested prompt logprobs of {k}, which is greater than max "
                          f"allowed: {max_logprobs}", param="prompt_logprobs")  # fmt: skip
    return prompts, min(k, vocab)


def _json_lp(x: float) -> float:
    return CLAMPED if not math.isfinite(x) else x


def completion_body(
    name: str, prompts: list[list[int]], parts: list[TopK] | None, k: int | None, fingerprint: str
) -> dict[str, Any]:
    """vLLM's ``CompletionResponse`` for scored prompts (no generated text)."""
    choices = []
    for p, prompt in enumerate(prompts):
        plp: list[Any] | None = None
        if k is not None and parts is not None:
            top = parts[p]
            plp = [None]
            ids, lps = top.ids.tolist(), top.logp.tolist()
            for j in range(len(prompt) - 1):
                entry = {str(prompt[j + 1]): {"logprob": _json_lp(float(top.label_logp[j])),
                                              "rank": int(top.label_rank[j]),
                                              "decoded_token": None}}  # fmt: skip
                for r in range(k):
                    entry[str(ids[j][r])] = {"logprob": _json_lp(lps[j][r]), "rank": r + 1,
                                             "decoded_token": None}  # fmt: skip
                plp.append(entry)
        choices.append({"index": p, "text": "", "logprobs": None, "finish_reason": "length",
                        "stop_reason": None, "prompt_logprobs": plp})  # fmt: skip
    tokens = sum(len(p) for p in prompts)
    return {
        "id": f"cmpl-{hashlib.sha256(repr(time.time_ns()).encode()).hexdigest()[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": choices,
        "system_fingerprint": fingerprint,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }


def models_body(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """``/v1/models`` with one card; ``kdkit`` carries kdkit's own identity (fingerprint,
    tokenizer), which a kdkit client checks as it checks the native protocol's."""
    card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "kdkit",
            "root": name, "parent": None, "max_model_len": info.get("max_positions"),
            "kdkit": info}  # fmt: skip
    return {"object": "list", "data": [card]}
