"""A run's served teacher (``teacher: {model: "http://HOST:PORT"}``), from the client's side.

The :class:`~kdkit.lm.serve.ServedTeacher` a ``task: lm`` config names (its ``teacher.served``
section, the run's KD temperature and tail policy) and ``kdkit lm capture`` from it: the rows
are sent, the top k and each shard's mass come back. The server's side (loading a teacher to
serve) is :mod:`kdkit.run.lm_serve`; the job that trains from either is :mod:`kdkit.run.lm_job`,
which re-exports :func:`served_teacher`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kdkit.config import LMRunConfig, LMServedConfig
from kdkit.errors import KDError
from kdkit.lm.align import Aligner
from kdkit.lm.tokenizer import pad_id

__all__ = ["served_teacher", "capture_served"]


def served_teacher(cfg: LMRunConfig, *, topk: int | None = None, temperature: float | None = None,
                   prefetch: int | None = None) -> Any:  # fmt: skip
    """The :class:`~kdkit.lm.serve.ServedTeacher` at ``teacher.model`` (``http://HOST:PORT``),
    asked as ``teacher.served`` says, at the run's KD temperature and tail policy (``topk`` /
    ``temperature`` / ``prefetch``: a capture's own). The token is read from the environment."""
    from kdkit.lm.serve.client import ServedTeacher

    s = cfg.teacher.served or LMServedConfig()
    return ServedTeacher(
        cfg.teacher.model,
        protocol=s.protocol,
        topk=s.topk if topk is None else topk,
        temperature=cfg.distill.temperature if temperature is None else temperature,
        tail=cfg.distill.tail,
        token=os.environ.get(s.token_env) or None,
        token_env=s.token_env,
        timeout_s=s.timeout_s,
        retry_s=s.retry_s,
        prefetch=s.prefetch if prefetch is None else prefetch,
    )


def capture_served(
    cfg: LMRunConfig,
    out: Any,
    tokenizer: Any,
    datasets: Callable[[int | None], tuple[Any, Any]],
    *,
    topk: int,
    encoding: str,
    temperature: float,
    shard_rows: int,
    progress: bool,
) -> dict[str, Any]:
    """``kdkit lm capture`` from the served teacher of ``cfg`` (``kdkit lm serve``): the
    provenance is the one the server reports. ``tokenizer``: the run's (the served one stays
    where it runs); ``datasets(positions)``: the run's ``(train, val)`` token rows, cut to the
    teacher's positions."""
    from kdkit.lm.cache.capture import Provenance, capture
    from kdkit.lm.cache.format import data_settings

    served = served_teacher(cfg, topk=topk, temperature=temperature, prefetch=0)
    try:
        if served.info.temperature is not None:  # vLLM: no whole distribution, T = 1 only
            raise KDError("kdkit lm capture asks kdkit lm serve (teacher.served.protocol: "
                          "kdkit): vLLM's prompt_logprobs hold the top k only")  # fmt: skip
        served.check_run(cfg.data, tokenizer, served.vocab)
        train, val = datasets(served.info.max_positions)
        rows = list(train.rows) + (list(val.rows) if val is not None else [])
        t = served.info.teacher
        provenance = Provenance(
            model=cfg.teacher.model, weights_sha256=str(t["weights_sha256"]),
            dtype=str(t.get("dtype", "")), vocab_rows=int(t["vocab_rows"]),
            engine=f"served {t.get('engine', '')}".strip(), data=data_settings(cfg.data),
        )  # fmt: skip
        aligner = Aligner(pad_id=pad_id(tokenizer), max_length=cfg.data.max_length)
        return capture(served, rows, aligner, out, tokenizer=tokenizer, provenance=provenance,
                       topk=topk, encoding=encoding, temperature=temperature,
                       shard_rows=shard_rows, batch_size=cfg.data.batch_size,
                       progress=progress)  # fmt: skip
    finally:
        served.close()
