"""Lazy imports of the Hugging Face packages, and local folder loads that run no folder code
(private).

``import kdkit.lm.<module>`` must stay cheap and must work without ``transformers``: only the
functions that load or build a model or tokenizer call these.

A model or tokenizer folder can name Python code of its own (``auto_map`` in ``config.json`` or
``tokenizer_config.json``, a module file beside them). transformers imports that code when
``trust_remote_code`` is true, and *asks on standard input* when it is not given, so ``yes |
kdkit ...`` or any piped stdin would run it. Every load here passes ``trust_remote_code``
explicitly, and :func:`refuse_custom_code` refuses such a folder first unless the caller passed
``trust_code=True`` (CLI: ``--trust-code``), as ``python:`` model specs are refused
(:mod:`kdkit.registry`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from kdkit.errors import KDError

__all__ = [
    "CODE_FILES",
    "from_folder",
    "load_error",
    "quiet_progress",
    "refuse_custom_code",
    "require",
]

log = logging.getLogger(__name__)

_HINT = "pip install 'kdkit[lm]'"
#: the files of a folder whose ``auto_map`` makes transformers import the folder's code
CODE_FILES = ("config.json", "tokenizer_config.json")


def require(name: str) -> ModuleType:
    """Import ``transformers`` or ``tokenizers`` or raise a one-line KDError with the fix."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise KDError(f"kdkit.lm needs the {name!r} package ({e}); {_HINT}") from None


def _code_key(data: Any) -> str | None:
    """The dotted key of the first non-empty ``auto_map`` in parsed JSON (at any depth: a
    nested config names code the same way), or None. Iterative: no recursion on deep files."""
    queue: deque[tuple[str, Any]] = deque([("", data)])  # breadth first: the top level first
    while queue:
        where, value = queue.popleft()
        if isinstance(value, dict):
            if value.get("auto_map"):
                return f"{where}auto_map"
            queue.extend((f"{where}{k}.", v) for k, v in value.items())
        elif isinstance(value, list):
            queue.extend((f"{where}{i}.", v) for i, v in enumerate(value))
    return None


def refuse_custom_code(folder: str | os.PathLike[str], trust_code: bool) -> None:
    """Raise a one-line KDError if ``folder`` names code of its own and ``trust_code`` is False.

    Reads ``config.json`` and ``tokenizer_config.json`` (when present) as JSON only, before
    transformers opens the folder; a file that is not JSON is refused too (nothing could say
    what it would make transformers do)."""
    for name in CODE_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise KDError(f"{path} is not a readable JSON file: {e}".splitlines()[0]) from None
        key = _code_key(data)
        if key is None:
            continue
        if trust_code:
            log.warning(
                "%s: %r names Python code in %s; running it (trust_code)", path, key, folder
            )
            continue
        raise KDError(
            f"{path} has {key!r}: loading {folder} would run the Python code it names; pass "
            "--trust-code (CLI) / trust_code=True (Python) only if you trust that folder's code"
        )


def from_folder(auto: Any, folder: str | os.PathLike[str], *, trust_code: bool, **kw: Any) -> Any:
    """``auto`` (``AutoConfig``, ``AutoTokenizer``, ``AutoModelForCausalLM``, ...) loaded from
    a local folder: :func:`refuse_custom_code` first, then the transformers load, offline and
    with ``trust_remote_code`` always given (never the stdin prompt), without transformers'
    progress bar (kdkit logs what it loaded; a bar on stderr would bury a one-line error)."""
    refuse_custom_code(folder, trust_code)
    name = os.fspath(folder)
    with quiet_progress():
        return auto.from_pretrained(name, trust_remote_code=trust_code, local_files_only=True, **kw)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off for the
    block, restored after."""
    hf_logging = importlib.import_module("transformers.utils.logging")
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_error(spec: str, folder: str | os.PathLike[str], err: BaseException) -> KDError:
    """One line for what a load of ``folder`` raised: weights that are a pickle (refused by
    ``weights_only``: never torch's advice to unpickle), damaged safetensors, a config
    transformers rejects."""
    text = str(err).strip()
    if "Weights only load failed" in text or type(err).__name__ == "UnpicklingError":
        return KDError(
            f"{spec}: the weights in {os.fspath(folder)} (pytorch_model.bin) hold pickled Python "
            "objects, which kdkit never unpickles; save the model with safetensors "
            "(save_pretrained(safe_serialization=True)) where you trust it"
        )
    if type(err).__name__ == "SafetensorError":
        return KDError(
            f"{spec}: model.safetensors in {os.fspath(folder)} is damaged or truncated "
            f"({text.splitlines()[0] if text else 'unreadable'}); save the model again"
        )
    first = text.splitlines()[0] if text else ""
    rest = " ".join(line.strip() for line in text.splitlines()[1:3])
    detail = f"{first} {rest}".strip() or type(err).__name__
    return KDError(f"{spec}: cannot load the model ({type(err).__name__}): {detail}")
