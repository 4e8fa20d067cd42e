"""A teacher on another machine (or process) as a target source of the LM task.

``teacher: {model: "http://HOST:PORT"}`` in a ``task: lm`` config trains against a teacher
served by ``kdkit lm serve`` (or, ``served: {protocol: vllm}``, by vLLM): the training process
never loads its weights. :class:`ServedTeacher` is what the task and the builders hold, with
the same four duties as a top-k cache (:class:`~kdkit.lm.cache.TopKCache`):

- ``check_run``: refuse a teacher whose tokenizer differs from the run's, or whose
  vocabulary the student's head does not cover, before anything trains;
- ``collate`` / ``loader``: the loader's batches get their targets ahead of the step
  (:class:`~kdkit.lm.serve.prefetch.ServedLoader`);
- ``target_of``: targets for a batch made in the step (on-policy samples, GKD);
- ``run_fingerprints``: what a checkpoint records, so ``--resume`` refuses another teacher.

Faults. A server that is down, restarting or slower than ``timeout_s`` pauses the run with one
warning and is retried with exponential backoff (0.5 s doubling to 10 s) for up to
``retry_s``; then the run stops with one line and its last checkpoint intact. After the server
answers again its identity is read again: a teacher whose fingerprint changed is refused, as
is any answer carrying another fingerprint. Every answer is checked before it is used
(:mod:`kdkit.lm.serve.wire`): shapes, ids, finite values, one distribution per position.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

from kdkit.errors import KDError
from kdkit.lm.cache.format import differences, tokenizer_fingerprint
from kdkit.lm.cache.target import TopKTarget
from kdkit.lm.serve.dialects import Dialect, KdkitDialect, ServedInfo
from kdkit.lm.serve.http import Http, Transient
from kdkit.lm.serve.prefetch import ServedLoader
from kdkit.lm.serve.vllm import VLLMDialect, tokenize_probe
from kdkit.lm.topk import TopK
from kdkit.lm.vocab import tokenization_fingerprint

__all__ = ["PROTOCOLS", "ServedTeacher"]

log = logging.getLogger(__name__)

PROTOCOLS = ("kdkit", "vllm")
T = TypeVar("T")
_PROBE_TEXT = "Knowledge distillation: the teacher's tokens, naïve café 🙂 x = [1, 2]\n"


class ServedTeacher:
    """A served teacher (``kdkit lm serve`` or vLLM) as a source of top-k targets.

    Args:
        url: ``http://HOST:PORT`` of the server.
        protocol: ``kdkit`` (its binary top-k, any temperature) or ``vllm``
            (``/v1/completions`` with ``prompt_logprobs``, temperature 1).
        topk: entries per position asked for.
        temperature: the KD temperature the targets are computed at.
        tail: the tail policy of the targets (:data:`kdkit.lm.cache.TAIL_POLICIES`).
        token: the server's shared token (sent as ``Authorization: Bearer``), or None.
        token_env: the environment variable the token came from (named in messages).
        timeout_s: the longest one request may take before it is retried.
        retry_s: how long a run waits for a server that does not answer.
        prefetch: batches whose targets are fetched ahead of the step (0: at the step).
    """

    #: a served teacher scores any rows (a cache only those it captured)
    fixed_rows = False

    def __init__(
        self,
        url: str,
        *,
        protocol: str = "kdkit",
        topk: int = 32,
        temperature: float = 1.0,
        tail: str = "bucket",
        token: str | None = None,
        token_env: str = "KDKIT_TEACHER_TOKEN",
        timeout_s: float = 60.0,
        retry_s: float = 300.0,
        prefetch: int = 2,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise KDError(
                f"served teacher protocol must be one of {list(PROTOCOLS)}, got {protocol!r}"
            )
        if not (isinstance(topk, int) and topk >= 1):
            raise KDError(f"served teacher topk must be an integer >= 1, got {topk!r}")
        if not (math.isfinite(timeout_s) and timeout_s > 0 and retry_s >= 0 and prefetch >= 0):
            raise KDError("served teacher: timeout_s > 0, retry_s >= 0 and prefetch >= 0")
        self.url, self.k, self.temperature, self.tail = url.rstrip("/"), topk, temperature, tail
        self.retry_s, self.prefetch = float(retry_s), int(prefetch)
        #: the longest a batch may wait for its targets (the request's own retries end sooner)
        self.deadline_s = self.retry_s + 3 * timeout_s + 30.0
        self._http = Http(self.url, token=token, token_env=token_env, timeout_s=timeout_s)
        self._dialect: Dialect = KdkitDialect() if protocol == "kdkit" else VLLMDialect()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self.fingerprint: str = ""  # set from the first answer; compared after every outage
        self.info: ServedInfo = self._call(lambda: self._dialect.connect(self._http))
        if self.info.temperature is not None and self.info.temperature != temperature:
            if tail != "renorm":
                raise KDError(
                    f"{protocol}'s prompt log-probs are at temperature {self.info.temperature:g}; "
                    f"distill.temperature {temperature:g} is exact only with distill.tail: renorm"
                )
        self.fingerprint = self.info.fingerprint
        #: the real vocabulary of the targets (vLLM does not say: the run's tokenizer, at check)
        self.vocab: int | None = self.info.vocab
        log.info("served teacher %s (%s): %s, fingerprint %s", self.url, protocol,
                 self.info.model, self.fingerprint[:12])  # fmt: skip

    # -- checks against a run -------------------------------------------------------------
    def check_run(self, data_cfg: Any, tokenizer: Any, student_rows: int) -> None:
        """Refuse a run this teacher cannot serve: another tokenizer (vocabulary, special ids,
        chat template, tokenization rules), a vocabulary the student's head does not cover,
        rows longer than its positions, packed rows a family cannot attend within."""
        theirs = self.info.tokenizer
        if theirs is not None:
            mine = {**tokenizer_fingerprint(tokenizer),
                    "tokenization_sha256": tokenization_fingerprint(tokenizer)}  # fmt: skip
            diff = [c.partition(":")[0] for c in differences(theirs, mine)]
            if diff:
                raise KDError(
                    f"the served teacher at {self.url} has another tokenizer (differs in "
                    f"{', '.join(diff)}); train with the teacher's tokenizer"
                )
        else:  # vLLM says nothing of its tokenizer: compare what it makes of a probe text
            served = tokenize_probe(self._http, self.info.model, _PROBE_TEXT)
            local = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
            if served is None:
                log.warning("the served teacher at %s has no /tokenize: its tokenizer is not "
                            "checked against the run's", self.url)  # fmt: skip
            elif list(served) != list(local):
                raise KDError(
                    f"the served teacher at {self.url} tokenizes a probe text into other ids "
                    "than the run's tokenizer: another tokenizer; train with the teacher's"
                )
            self.vocab = len(tokenizer)
        if student_rows < self.vocab:
            raise KDError(
                f"the student's head has {student_rows} rows < the served teacher's vocabulary "
                f"{self.vocab}: its top-k ids would fall outside the student's head"
            )
        longest, positions = getattr(data_cfg, "max_length", 0), self.info.max_positions
        if positions is not None and longest > positions:
            raise KDError(
                f"data.max_length {longest} is longer than the served teacher's "
                f"{positions} positions; lower data.max_length"
            )
        if getattr(data_cfg, "pack", False) and not self.info.packing:
            raise KDError(
                f"the served teacher at {self.url} ({self.info.teacher.get('family', '')}) "
                "cannot attend within each document of a packed row; set data.pack: false"
            )

    def run_fingerprints(self) -> dict[str, str]:
        """What a run's checkpoints record of this teacher (``--resume`` compares them)."""
        weights = self.info.teacher.get("weights_sha256") or self.info.model
        return {"teacher": str(weights), "served": self.fingerprint}

    # -- targets ----------------------------------------------------------------------------
    def collate(self, aligner: Any, policy: str = "bucket") -> Any:
        """The data's collate: the aligner itself (targets come with :meth:`loader`)."""
        if policy != self.tail:
            raise KDError(f"this served teacher makes {self.tail!r} targets, asked {policy!r}")
        return aligner

    def loader(self, loader: Iterable) -> Iterable:
        """``loader`` with each batch's targets fetched ``prefetch`` batches ahead; with
        ``prefetch`` 0 the loader itself (each batch is scored in the step, when it is trained:
        with on-policy ``lambda: 1`` no corpus batch is scored for nothing)."""
        return ServedLoader(loader, self, self.prefetch) if self.prefetch else loader

    def submit(self, batch: Any) -> Future:
        """The :class:`~kdkit.lm.cache.TopKTarget` of ``batch``, fetched in a thread (CPU).
        A daemon thread per request (the prefetch bounds how many): a run stopped by Ctrl-C
        while the server is down exits at once instead of waiting out the retries."""
        rows, future = batch.rows(), Future()

        def fetch() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._target(rows))
            except BaseException as err:  # noqa: BLE001 - the loop re-raises it
                future.set_exception(err)

        threading.Thread(target=fetch, name="kdkit-teacher", daemon=True).start()
        return future

    def target_of(self, batch: Any) -> TopKTarget:
        """The targets of a batch made in the step (on-policy samples), on its device."""
        return self._target(batch.rows()).to(batch.input_ids.device)

    def topk(self, batch: Any, *, vocab: int, k: int, temperature: float, mass: bool) -> TopK:
        """A :class:`~kdkit.lm.topk.TopKScorer` for ``kdkit lm capture``."""
        rows = batch.rows()
        return self._call(lambda: self._dialect.topk(
            self._http, rows, info=self.info, vocab=vocab, k=k, temperature=temperature,
            mass=mass))  # fmt: skip

    def _target(self, rows: list) -> TopKTarget:
        if self.vocab is None:
            raise KDError("ServedTeacher.check_run(...) first: the vocabulary is not known yet")
        top = self._call(lambda: self._dialect.topk(
            self._http, rows, info=self.info, vocab=self.vocab, k=self.k,
            temperature=self.temperature, mass=False))  # fmt: skip
        served_at = self.info.temperature or self.temperature
        return TopKTarget(top.ids, top.logp, top.tail, self.vocab, policy=self.tail,
                          capture_temperature=served_at)  # fmt: skip

    # -- faults -----------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried with backoff while the server is down, restarting or slow; after
        an outage the server's identity is read again before anything else is asked."""
        delay, first = 0.5, None
        while True:
            if self._stop.is_set():
                raise KDError(f"the served teacher at {self.url} was closed or given up on")
            try:
                if first is not None and self.fingerprint:
                    self._check_identity()
                result = fn()
            except Transient as err:
                now = time.monotonic()
                first = first if first is not None else now
                self._note_down(str(err), now)
                if now - first + delay > self.retry_s:
                    self._stop.set()  # the other requests in flight give up too
                    raise KDError(
                        f"the served teacher at {self.url} did not answer for {self.retry_s:g} s "
                        f"({err}); the run stopped, its last checkpoint is intact: serve the "
                        "teacher again and resume (kdkit train --resume)"
                    ) from None
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            if first is not None:
                self._note_up()
            return result

    def _note_down(self, reason: str, now: float) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = now
                log.warning(
                    "the served teacher at %s does not answer (%s): the run is paused, retrying "
                    "for up to %g s", self.url, reason, self.retry_s)  # fmt: skip

    def _check_identity(self) -> None:
        """A server that answers again may be another teacher (restarted with other weights)."""
        info = self._dialect.connect(self._http)
        if info.fingerprint != self.fingerprint:
            self._stop.set()
            raise KDError(
                f"the served teacher at {self.url} came back as another teacher (fingerprint "
                f"{info.fingerprint[:12]}, {self.fingerprint[:12]} when the run started): "
                "refused; serve the run's teacher again and resume"
            )

    def _note_up(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("the served teacher at %s answers again after %.1f s; the run goes on",
                        self.url, time.monotonic() - since)  # fmt: skip

    def close(self) -> None:
        """Stop retrying and close the connections."""
        self._stop.set()
        self._http.close()

    def __repr__(self) -> str:
        return f"ServedTeacher({self.url!r}, {self._dialect.name}, {self.info.model!r})"
