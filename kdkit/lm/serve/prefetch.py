"""The next batches' targets fetched while the student steps: a bounded prefetch.

:class:`ServedLoader` wraps the training (or val) ``DataLoader``: it collates ``depth`` batches
ahead of the one the loop trains on and sends each to the served teacher as soon as it is
collated (:meth:`~kdkit.lm.serve.client.ServedTeacher.submit`, a thread per request in
flight), so by the time the loop asks for a batch its targets have usually arrived: the
teacher's latency hides behind the student's step. The batch the loop gets is a plain
:class:`~kdkit.lm.align.TokenBatch` with ``teacher`` set to a
:class:`~kdkit.lm.cache.TopKTarget`, exactly as a cache's collate gives it.

The order of batches is the loader's (a function of seed and epoch), so prefetching changes
nothing a resumed run depends on; :meth:`ServedLoader.iter_from` skips a resumed epoch's first
batches without sending them. At most ``depth + 1`` requests are in flight; one left when the
loop stops (an error, the end of a run) is cancelled.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import Any

from kdkit.errors import KDError

__all__ = ["ServedLoader", "wait_for"]

log = logging.getLogger(__name__)

#: how often a loop waiting on the teacher says so
_SAY_EVERY_S = 10.0


def wait_for(future: Future, deadline_s: float, url: str) -> Any:
    """``future``'s result, saying every 10 s that the run waits; a one-line KDError after
    ``deadline_s`` (the request's own retries end sooner: this is the backstop)."""
    waited = 0.0
    while True:
        try:
            return future.result(timeout=_SAY_EVERY_S)
        except FutureTimeout:
            waited += _SAY_EVERY_S
            if waited >= deadline_s:
                future.cancel()
                raise KDError(
                    f"the served teacher at {url} gave no targets for {waited:.0f} s; the run "
                    "stopped (its last checkpoint is intact)"
                ) from None
            log.warning("waiting for the served teacher at %s (%.0f s so far)", url, waited)


class ServedLoader:
    """``loader``'s batches with their served targets attached, ``depth`` batches ahead.

    ``len()``, ``dataset``, ``sampler``, ``batch_size`` and ``collate_fn`` are the loader's, so
    the Trainer treats it as the loader itself (it calls the sampler's ``set_epoch``).
    """

    def __init__(self, loader: Iterable, teacher: Any, depth: int = 2) -> None:
        if depth < 0:
            raise KDError(f"prefetch depth must be >= 0, got {depth}")
        self.loader, self.teacher, self.depth = loader, teacher, depth

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # dataset, sampler, collate_fn, batch_size ...
        if name in ("loader", "teacher", "depth"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        return self._run(iter(self.loader))

    def iter_from(self, start: int) -> Iterator[Any]:
        """Skip the first ``start`` batches (collated, never sent): a resumed epoch."""
        return self._run(itertools.islice(iter(self.loader), start, None))

    def _run(self, batches: Iterator[Any]) -> Iterator[Any]:
        pending: deque[tuple[Any, Future]] = deque()
        try:
            for batch in batches:
                pending.append((batch, self.teacher.submit(batch)))
                if len(pending) > self.depth:
                    yield self._attach(*pending.popleft())
            while pending:
                yield self._attach(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()

    def _attach(self, batch: Any, future: Future) -> Any:
        target = wait_for(future, self.teacher.deadline_s, self.teacher.url)
        if target.shape[0] != batch.n_tokens:
            raise KDError(
                f"the served teacher gave {target.shape[0]} positions for a batch that trains "
                f"{batch.n_tokens}: refused"
            )
        return replace(batch, teacher=target)
