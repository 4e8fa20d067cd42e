"""Sample generations: a few held-out prompts, the teacher's and the student's greedy
continuations side by side (``report.md``, ``kdkit eval``), where perplexity alone does not
show what a student says.

The prompt of a prompt/completion or chat row is everything before its first trained token
(as on-policy sampling takes it, :func:`kdkit.lm.onpolicy.prompts_of`); of a plain-text row,
its first half (at most 32 tokens). Decoding is greedy through the same KV-cache loop as
on-policy sampling, with no ``generation_config`` merged in and no RNG drawn, so writing a
report leaves a run's random stream as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.lm.data import TokenRow
from kdkit.lm.onpolicy import sample_completions
from kdkit.lm.xtok.data import XTokRow

__all__ = ["Generation", "sample_generations"]


@dataclass(frozen=True)
class Generation:
    """One held-out prompt and its continuations (``teacher`` None: no model to run)."""

    prompt: str
    reference: str
    student: str
    teacher: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"prompt": self.prompt, "reference": self.reference, "student": self.student,
                "teacher": self.teacher}  # fmt: skip


def _split(row: TokenRow) -> tuple[list[int], list[int]]:
    """``(prompt ids, reference ids)`` of a row's first document."""
    ids = row.input_ids[row.doc_ids == row.doc_ids[0]].tolist()
    tr = row.trainable[: len(ids)].tolist()
    first = next((j for j, t in enumerate(tr) if t and j > 0), len(ids))
    if first <= 1:  # plain text: every token trained
        first = max(1, min(32, len(ids) // 2))
    return ids[:first], ids[first:]


def _can_generate(model: Any) -> bool:
    import inspect

    forward = getattr(getattr(model, "_orig_mod", model), "forward", None)
    return forward is not None and "past_key_values" in inspect.signature(forward).parameters


def sample_generations(
    student: nn.Module,
    teacher: Any,
    rows: Sequence[TokenRow],
    tokenizer: Any,
    *,
    n: int = 3,
    max_new_tokens: int = 32,
    eos: Sequence[int] = (),
) -> list[Generation]:
    """Greedy continuations of the first ``n`` rows' prompts by ``student`` and (a Hugging
    Face causal LM) ``teacher``; decoded with ``tokenizer``."""
    picked = [_split(r) for r in list(rows)[:n]]
    if not picked:
        return []
    prompts = [torch.tensor(p, dtype=torch.long) for p, _ in picked]
    pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
    eos = tuple(eos) or tuple(
        x for x in (getattr(tokenizer, "eos_token_id", None),) if x is not None
    )

    def run(model: nn.Module) -> list[str]:
        device = next(model.parameters()).device
        out = sample_completions(model, prompts, max_new_tokens, 1.0, eos, pad, device, greedy=True)
        return [tokenizer.decode(c, skip_special_tokens=True) for c in out]

    said = run(student)
    if any(isinstance(r, XTokRow) for r in rows):  # a teacher of another tokenizer: not its ids
        teacher = None
    heard = run(teacher) if isinstance(teacher, nn.Module) and _can_generate(teacher) else None
    return [
        Generation(
            tokenizer.decode(p, skip_special_tokens=False),
            tokenizer.decode(ref, skip_special_tokens=True),
            said[i],
            None if heard is None else heard[i],
        )
        for i, (p, ref) in enumerate(picked)
    ]
