"""Prompts for ``kdkit lm generate``: a JSONL file read line by line, and the two data formats.

A prompts file holds one JSON object a line: ``{"prompt": "..."}`` (written out as
``prompt_completion`` data) or ``{"messages": [{role, content}, ...]}`` ending before the
assistant turn (written out as ``chat`` data, with the assistant turn appended). It is read as a
stream (a million prompts never sit in memory) and each prompt knows its byte range, so a resumed
run seeks straight to the next one. Other keys of a prompt record are copied to what is written.

The prompt's ids are made as ``kdkit train`` makes them (:mod:`kdkit.lm.data`): ``prompt``
tokenized alone with the tokenizer's special tokens; a conversation rendered by the chat template
with ``add_generation_prompt`` and tokenized without them. A completion stops at EOS
(``prompt_completion``: the data appends EOS to every completion) or, for chat, at the token the
template closes an assistant turn with (ChatML's ``<|im_end|>``), found by rendering a probe
conversation. Whatever these rules miss is caught later: every written row is rebuilt by the
training path and compared with what was sampled (:mod:`kdkit.lm.cache.generated`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.errors import KDError

__all__ = ["PromptFile", "PromptFormat", "Prompt"]

_KEYS = {"prompt_completion": "prompt", "chat": "messages"}
_WRITTEN = ("prompt", "completion", "messages", "gen")
_PROBE = "kdkit-probe-reply"
_ROUND_TRIP = "The student learns the teacher's distribution, 42 times: ok."


@dataclass(frozen=True)
class Prompt:
    """Prompt ``index`` (0-based, blank lines not counted), its line's byte range, its record."""

    index: int
    start: int
    end: int
    record: dict[str, Any]


class PromptFile:
    """A prompts JSONL file: its fingerprint and count (one streaming pass), then its records.

    Args:
        path: the file.
        fmt: the config's ``data.format`` (``prompt_completion`` or ``chat``).
    """

    def __init__(self, path: str | Path, fmt: str) -> None:
        self.path = Path(path)
        if fmt not in _KEYS:
            raise KDError(
                f"kdkit lm generate writes data.format prompt_completion or chat, not {fmt!r}; "
                "set data.format in the config"
            )
        self.format, self.key = fmt, _KEYS[fmt]
        if not self.path.is_file():
            raise KDError(f"--prompts: no such file {str(self.path)!r}")
        h, count, size = hashlib.sha256(), 0, 0
        with open(self.path, "rb") as f:
            for line in f:
                h.update(line)
                size += len(line)
                count += bool(line.strip())
        if not count:
            raise KDError(f"--prompts {self.path}: the file holds no prompt")
        self.sha256, self.bytes, self.count = h.hexdigest(), size, count

    def fingerprint(self) -> dict[str, Any]:
        """What the prompts are (content, not place: a moved file resumes)."""
        return {"sha256": self.sha256, "bytes": self.bytes, "count": self.count, "key": self.key}

    def read(self, index: int = 0, offset: int = 0) -> Iterator[Prompt]:
        """Prompts from ``index``, whose line starts at byte ``offset``."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            start = offset
            for raw in f:
                end = start + len(raw)
                if raw.strip():
                    yield Prompt(index, start, end, self._check(raw, index))
                    index += 1
                start = end

    def _check(self, raw: bytes, index: int) -> dict[str, Any]:
        where = f"{self.path} (prompt {index})"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise KDError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise KDError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise KDError(f"{where}: JSON nested too deeply to be a prompt") from None
        other = "messages" if self.key == "prompt" else "prompt"
        if not isinstance(obj, dict) or self.key not in obj:
            has = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            hint = (
                f"; a {other!r} prompt needs data.format "
                f"{'chat' if other == 'messages' else 'prompt_completion'}"
                if isinstance(obj, dict) and other in obj
                else ""
            )
            raise KDError(
                f"{where}: data.format {self.format} reads {{{self.key!r}: ...}}, got {has}{hint}"
            )
        value = obj[self.key]
        if self.key == "prompt" and not isinstance(value, str):
            raise KDError(f"{where}: 'prompt' must be a string")
        if self.key == "messages":
            ok = isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in value
            )  # fmt: skip
            if not ok:
                raise KDError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
            if value[-1]["role"] == "assistant":
                raise KDError(
                    f"{where}: the conversation ends with an assistant turn; a prompt ends "
                    "before it (to score existing replies use --score FILE)"
                )
        return obj


class PromptFormat:
    """Prompt ids, stop ids and written records of one data format, with one tokenizer."""

    def __init__(self, tokenizer: Any, fmt: str) -> None:
        self.tokenizer, self.format = tokenizer, fmt
        eos = getattr(tokenizer, "eos_token_id", None)
        stops = [] if eos is None else [int(eos)]
        #: tokens a written row holds after the stop token (the template's, after a turn)
        self.after_stop = 0
        if fmt == "chat":
            turn_end, self.after_stop = self._turn_end()
            if turn_end is not None:
                stops.append(turn_end)
        if not stops:
            raise KDError(
                "the tokenizer has no EOS token and the template no end-of-turn token: "
                "completions would never stop; add an eos_token to the tokenizer"
            )
        self.stop_ids = tuple(dict.fromkeys(stops))

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
        except Exception as err:  # noqa: BLE001 - jinja2 and the template raise their own types
            text = str(err).strip().splitlines()
            raise KDError(
                f"the tokenizer's chat template failed on a prompt ({type(err).__name__}: "
                f"{text[0] if text else 'no message'})"
            ) from None

    def _turn_end(self) -> tuple[int | None, int]:
        """The template's end-of-turn token (an added token right after a reply), and how many
        tokens follow the reply's text in a rendered conversation beyond it."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise KDError("data.format chat needs a tokenizer with a chat template")
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        text = self._render(probe, False)
        cut = text.rfind(_PROBE)
        if cut < 0:
            return None, 0
        suffix = self.tokenizer(text[cut + len(_PROBE) :], add_special_tokens=False)["input_ids"]
        added = set(self.tokenizer.get_added_vocab().values())
        if suffix and suffix[0] in added:
            return int(suffix[0]), len(suffix) - 1
        return None, len(suffix)

    def canonical(self, completions: list[list[int]]) -> list[bool]:
        """Whether each completion's text (decoded) tokenizes back to its ids, as the data path
        will tokenize it (alone, without special tokens added)."""
        texts = self.tokenizer.batch_decode(
            completions, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        again = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(a) == list(c) for a, c in zip(again, completions, strict=True)]

    def round_trips(self) -> bool:
        """Whether plain text comes back from its ids at all (a tokenizer that adds a prefix
        space, say, never does: checking completions would ban every token)."""
        ids = self.tokenizer(_ROUND_TRIP, add_special_tokens=False)["input_ids"]
        return all(self.canonical([ids[:n] for n in range(1, len(ids) + 1)]))

    def prompt_ids(self, record: dict[str, Any]) -> list[int]:
        if self.format == "prompt_completion":
            return list(self.tokenizer(record["prompt"], add_special_tokens=True)["input_ids"])
        text = self._render(record["messages"], True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, tokens: list[int], finished: bool) -> str:
        """The completion's text: its tokens without the stop token."""
        ids = tokens[:-1] if finished else tokens
        return self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def record(self, prompt: dict[str, Any], text: str, gen: dict[str, Any]) -> dict[str, Any]:
        """The written record: the prompt's, with the completion (or assistant turn) and
        ``gen`` (prompt index, sample, whether it ended); the prompt's other keys kept."""
        extra = {k: v for k, v in prompt.items() if k not in _WRITTEN}
        if self.format == "prompt_completion":
            return {"prompt": prompt["prompt"], "completion": text, **extra, "gen": gen}
        turn = {"role": "assistant", "content": text}
        return {"messages": [*prompt["messages"], turn], **extra, "gen": gen}
