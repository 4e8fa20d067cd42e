"""Chat rendering with the assistant spans known (``loss_on: assistant``).

Two ways, chosen per tokenizer:

- ``template``: the chat template marks assistant turns with ``{% generation %}`` (kdkit's
  ChatML does), so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives the
  mask directly.
- ``incremental``: any other template. The conversation is rendered to text once; each
  assistant turn ``k`` spans the characters between ``render(messages[:k],
  add_generation_prompt=True)`` and ``render(messages[:k+1])`` (trailing whitespace dropped);
  the full text is tokenized once with offsets and a token is trained iff it starts inside a
  span. Diffing characters, not token lists, keeps BPE merges across a turn boundary from
  shifting the span. Both ways give the same ids.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from kdkit.errors import KDError
from kdkit.lm.tokenizer import CHATML_TEMPLATE

__all__ = ["CHAT_TEMPLATES", "assistant_mode", "render_chat", "template_note", "use_chat_template"]

#: ``data.chat_template`` names (kdkit.config.lm_schema.CHAT_TEMPLATE_NAMES lists the same)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_mode(tokenizer: Any) -> str:
    """``template`` or ``incremental`` (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise KDError(
            f"{type(tokenizer).__name__} has no chat template; format 'chat' needs one "
            "(kdkit.lm.tokenizer.train_bpe_tokenizer writes ChatML)"
        )
    return (
        "template" if isinstance(template, str) and _GENERATION.search(template) else "incremental"
    )


def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool = False) -> str:
    if not messages and not gen:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], mode: str, where: str
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is assistant output.
    A template that fails (a syntax error, an undefined name, its own ``raise_exception``) is
    one line naming the record, whatever jinja2 raised."""
    try:
        return _render_chat(tokenizer, messages, mode, where)
    except KDError:
        raise
    except Exception as err:  # noqa: BLE001 - jinja2 and the template raise their own types
        text = str(err).strip().splitlines()
        raise KDError(
            f"{where}: the tokenizer's chat template failed on this conversation "
            f"({type(err).__name__}: {text[0] if text else 'no message'}); fix the template "
            "(chat_template.jinja / tokenizer_config.json) or the record"
        ) from None


def _render_chat(
    tokenizer: Any, messages: list[dict[str, str]], mode: str, where: str
) -> tuple[list[int], list[bool]]:
    if mode == "template":
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
    full = _render(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = (
            _render(tokenizer, messages[:k], gen=True),
            _render(tokenizer, messages[: k + 1]),
        )
        if not (full.startswith(upto) and upto.startswith(before)):
            raise KDError(
                f"{where}: the chat template does not render turn by turn (a prefix of the "
                "conversation is not a prefix of its text); add {% generation %} tags to it"
            )
        spans.append((len(before), len(before) + len(upto[len(before) :].rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def use_chat_template(tokenizer: Any, template: str | None) -> None:
    """Give ``tokenizer`` the chat template ``data.chat_template`` names: a name of
    :data:`CHAT_TEMPLATES` or a Jinja file; None keeps the tokenizer's own. The tokenizer is
    changed in place, so the rows, the cache fingerprint and an exported tokenizer agree."""
    if template is None:
        return
    if template in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[template]
        return
    path = Path(template)
    if not path.is_file():
        raise KDError(
            f"data.chat_template {template!r} is neither a template kdkit ships "
            f"({', '.join(CHAT_TEMPLATES)}) nor a file"
        )
    tokenizer.chat_template = path.read_text(encoding="utf-8")


def template_note(tokenizer: Any, template: str | None) -> str:
    """One line for the report: which chat template rendered the data, and how the assistant
    tokens were found."""
    text = getattr(tokenizer, "chat_template", None) or ""
    which = (
        f"`{template}` (kdkit's)" if template in CHAT_TEMPLATES
        else f"file `{template}`" if template else "the tokenizer's own"
    )  # fmt: skip
    how = (
        "its {% generation %} tags" if assistant_mode(tokenizer) == "template"
        else "rendering turn by turn"
    )  # fmt: skip
    sha = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"Chat template: {which}, sha256 {sha}; assistant tokens from {how}."
