"""The one error type users see.

Every problem a user can fix (a wrong layer name, logits of different class counts, a cache
from another teacher, a missing dataset) is raised as :class:`KDError` at the boundary where
it is detected, with a message that says what to do. The CLI prints it without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["KDError", "KDDeprecationWarning", "closest_names"]


class KDError(ValueError):
    """A problem with the user's input or environment that the message explains.

    A KDError raised in a DataLoader worker is re-raised in the main process as
    ``KDError("Caught KDError in DataLoader worker process 0.\nOriginal Traceback ...")``;
    that message is cut back to the original one line, so a bad image in a worker reads the
    same as without workers.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_original_message(args[0]),)
        super().__init__(*args)


class KDDeprecationWarning(DeprecationWarning):
    """An older kdkit name or keyword, still working for one release.

    A class of its own so the test suite can make kdkit's deprecations errors wherever they
    are raised (``filterwarnings = ["error::kdkit.errors.KDDeprecationWarning"]``) while other
    packages' DeprecationWarnings stay warnings.
    """


def _original_message(message: str) -> str:
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    lines = message.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        head, sep, rest = lines[i].partition("KDError: ")
        if sep and head.strip() in ("", "kdkit.errors."):
            return "\n".join([rest, *lines[i + 1 :]]).strip()
    return message


def closest_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The valid names that look most like ``name`` (for "did you mean" messages)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not close:  # fall back to names sharing the last component, then to the first few
        tail = name.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.endswith(tail)][:n] or candidates[:n]
    return close
