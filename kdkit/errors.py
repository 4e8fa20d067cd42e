"""The one error type users see.

Every problem a user can fix (a wrong layer name, logits of different class counts, a cache
from another teacher, a missing dataset) is raised as :class:`KDError` at the boundary where
it is detected, with a message that says what to do. The CLI prints it without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["KDError", "closest_names"]


class KDError(ValueError):
    """A problem with the user's input or environment that the message explains."""


def closest_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The valid names that look most like ``name`` (for "did you mean" messages)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not close:  # fall back to names sharing the last component, then to the first few
        tail = name.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.endswith(tail)][:n] or candidates[:n]
    return close
