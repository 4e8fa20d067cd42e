"""The teacher writes completions and, in the same forwards, its top-k targets for every token.

``kdkit lm generate`` samples completions from a teacher and keeps what a separate capture pass
would compute again: the teacher's distribution at each position of the text it wrote. Both come
out of one KV-cached loop here. At each step the final hidden state is projected once (with the
family's output transform, :func:`kdkit.lm.logits.output_transform`: the model's real
distribution); then

- the **sample** is drawn from ``softmax(f / T_sample)`` restricted to the top-p nucleus, by
  inverse CDF with a uniform number from the row's own generator, seeded by (seed, prompt,
  sample): a completion is a function of its prompt and its seed, never of its batch-mates or of
  where a resumed run restarted;
- the **target** is the top-k of ``log_softmax(f / T_kd)``, at the distillation temperature
  (``distill.temperature``, never the sampling one), with the log of the mass outside the top k
  (:func:`kdkit.lm.topk.topk_entries`, the capture's own rule), and the summed whole
  distributions (the cache's ``teacher_mass``).

Positions: a sequence ``S`` = prompt ``P`` + sampled tokens ``c`` (the stop token included when
one was sampled). The prefill gives the distributions at the prompt's positions (``0 .. |P|-1``;
all of them only with ``prompt_targets``, for ``data.loss_on: all``); each later step feeds one
sampled token and gives the next position's. The loop feeds every sampled token, the last one
too, so it holds the distribution at every position ``0 .. |S|-1``: the one after the last token
is what predicts a template's trailing tokens, or the EOS that ``prompt_completion`` data appends
to a completion that hit its token limit. The whole distributions are summed (the cache's
``teacher_mass``) over the positions the written row will train: the prompt's with
``prompt_targets``, the completion's, and the last one where the row trains a token after the
sampled ones (a completion that hit its limit, or ``last_trained``).

A module that is not a Hugging Face causal LM with a KV cache is a one-line error
(:func:`kdkit.lm.models.decoder_step`). Another teacher source (a served one) plugs in at the
level above: :mod:`kdkit.lm.cache.generated` asks a :class:`TeacherSampler`-shaped object for
:class:`Sampled` records and for rescoring rows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm.logits import output_transform, project_logits
from kdkit.lm.models import decoder_step, output_head
from kdkit.lm.topk import teacher_topk, topk_entries

__all__ = [
    "REDRAWS",
    "Sampled",
    "SampleSettings",
    "TeacherSampler",
    "check_sample_settings",
    "sample_seed",
]


#: draws of one step after its first, for a token that breaks the text's tokenization
REDRAWS = 3


@dataclass(frozen=True)
class SampleSettings:
    """How completions are drawn and what is kept of the teacher at each position.

    ``temperature``: sampling temperature (0: greedy); ``top_p``: nucleus mass in (0, 1];
    ``max_new_tokens``: the longest completion; ``stop_ids``: tokens that end a completion
    (kept in it); ``k``: entries per target; ``kd_temperature``: the targets' temperature;
    ``prompt_targets``: keep targets at the prompt's positions too (``loss_on: all``);
    ``last_trained``: a finished row trains the token after its stop token too (a chat
    template's trailing tokens under ``loss_on: all``); ``canonical``: says of completions
    (token lists) whether their text tokenizes back to them; a token that would make one that
    does not is banned and drawn again (at most :data:`REDRAWS` times a step)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()
    k: int = 32
    kd_temperature: float = 1.0
    prompt_targets: bool = False
    last_trained: bool = False
    canonical: Callable[[list[list[int]]], list[bool]] | None = None


def check_sample_settings(
    *, n: object, temperature: object, top_p: object, max_new_tokens: object, seed: object
) -> None:
    """The sampling flags in range, one line naming the flag (before anything is loaded)."""

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (integer(n) and 1 <= n <= 1 << 16):
        raise KDError(f"--n (samples per prompt) must be an integer in [1, 65536], got {n!r}")
    if not (number(temperature) and 0 <= temperature <= 100):
        raise KDError(
            f"--temperature (sampling) must be a number in [0, 100] (0: greedy), got {temperature!r}"
        )
    if not (number(top_p) and 0 < top_p <= 1):
        raise KDError(f"--top-p must be a number in (0, 1], got {top_p!r}")
    if not (integer(max_new_tokens) and 1 <= max_new_tokens <= 1 << 24):
        raise KDError(f"--max-new-tokens must be an integer in [1, 2**24], got {max_new_tokens!r}")
    if not (integer(seed) and 0 <= seed < 1 << 63):
        raise KDError(f"--seed must be an integer in [0, 2**63), got {seed!r}")


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """The generator seed of sample ``sample`` of prompt ``prompt`` (63 bits of blake2b)."""
    h = hashlib.blake2b(f"{seed}:{prompt}:{sample}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class Sampled:
    """One completion and the teacher's targets along its sequence ``S = prompt + tokens``.

    ``tokens``: the sampled ids (the stop token last when ``finished``); ``first``: the position
    of entry 0 (0 with prompt targets, else ``len(prompt) - 1``); ``ids`` / ``logp`` / ``tail``:
    ``[n, k]`` int32, ``[n, k]`` float32, ``[n]`` float32 for positions ``first .. len(S) - 1``;
    ``mass``: ``[V]`` float64, the summed distributions at the positions its row will train
    (None once a writer has added it up)."""

    prompt: list[int]
    tokens: list[int]
    finished: bool
    redraws: int
    first: int
    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor
    mass: torch.Tensor | None

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.tokens


class TeacherSampler:
    """A local Hugging Face causal LM as the teacher of ``kdkit lm generate``.

    Args:
        model: the teacher (frozen, in eval mode, on ``device``).
        vocab: its real vocabulary (padded head rows are never sampled nor a target).
        pad_id: the id left padding is filled with.
        device: where it runs.
    """

    def __init__(self, model: nn.Module, vocab: int, pad_id: int, device: torch.device) -> None:
        self.model, self.vocab, self.pad_id, self.device = model, vocab, pad_id, device
        self.head = output_head(model)
        self.transform = output_transform(model)

    def score(
        self, batch: object, k: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A full forward over a :class:`~kdkit.lm.align.TokenBatch` (a row whose text is not
        what was sampled): the capture's own targets at its trained positions."""
        top = teacher_topk(self.model, batch.to(self.device), self.vocab, k, temperature)
        return top.ids, top.logp, top.tail, top.mass

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return project_logits(hidden, self.head, self.transform, self.vocab)

    def _draw(
        self, logits: torch.Tensor, s: SampleSettings, gens: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """One token per row of ``logits`` ``[R, V]``: nucleus of ``softmax(f / T)``, then the
        inverse CDF at each row's own uniform draw (greedy at T = 0)."""
        if s.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / s.temperature, dim=-1)
        order = None
        if s.top_p < 1:  # keep the smallest prefix (by probability) whose mass reaches top_p
            probs, order = probs.sort(dim=-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= s.top_p, 0.0)
        cdf = probs.cumsum(dim=-1)  # in id order without top-p: no sort needed
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
        u = (u.to(cdf.device) * cdf[:, -1].double()).float()[:, None]
        pick = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)
        while True:  # never a token of zero probability (u on a flat stretch of the CDF)
            zero = probs.gather(1, pick) == 0
            if not bool(zero.any()):
                break
            pick = torch.where(zero, pick - 1, pick).clamp(min=0)
        return (pick if order is None else order.gather(1, pick)).squeeze(1)

    def _canonical(
        self,
        token: torch.Tensor,
        rows: list[int],
        logits: torch.Tensor,
        s: SampleSettings,
        gens: Sequence[torch.Generator],
        history: list[list[int]],
        redraws: list[int],
    ) -> None:
        """Draw again (in place) the token of a row whose completion would no longer tokenize
        back to its ids, that token banned; after :data:`REDRAWS` the last draw stands (its
        row is then scored again by the writer). Only such a row's generator draws again."""
        banned: torch.Tensor | None = None
        for attempt in range(REDRAWS + 1):
            drawn = token[rows].tolist()
            ok = s.canonical([history[i] + [t] for i, t in zip(rows, drawn, strict=True)])
            rows = [i for i, good in zip(rows, ok, strict=True) if not good]
            if not rows or attempt == REDRAWS:
                return
            if banned is None:
                banned = torch.zeros_like(logits, dtype=torch.bool)
            where = torch.as_tensor(rows, device=logits.device)
            banned[where, token[where]] = True
            masked = logits[where].masked_fill(banned[where], float("-inf"))
            token[where] = self._draw(masked, s, [gens[i] for i in rows])
            for i in rows:
                redraws[i] += 1

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[list[int]],
        seeds: Sequence[int],
        limits: Sequence[int],
        s: SampleSettings,
    ) -> list[Sampled]:
        """A completion per prompt (``limits[i]``: its most tokens) and its targets."""
        b, width, dev = len(prompts), max(len(p) for p in prompts), self.device
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[i, width - len(p) :] = torch.as_tensor(p)
            attention[i, width - len(p) :] = 1
        ids, attention = ids.to(dev), attention.to(dev)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(int(x)) for x in seeds]
        mass = torch.zeros((b, self.vocab), dtype=torch.float64, device=dev)
        hidden, past = decoder_step(self.model, ids, positions, attention)
        pre = self._prompt_targets(hidden, prompts, mass, s) if s.prompt_targets else None
        steps: list[tuple[torch.Tensor, ...]] = []
        stop = torch.tensor(list(s.stop_ids) or [-1], device=dev)
        limit = torch.as_tensor(list(limits), device=dev)
        running = torch.ones(b, dtype=torch.bool, device=dev)  # still sampling
        fed = running.clone()  # this step's position belongs to the row
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        count = 0
        last = hidden[:, -1]
        history: list[list[int]] = [[] for _ in prompts]
        redraws = [0] * b
        while True:
            logits = self._logits(last)
            lp = torch.log_softmax(logits / s.kd_temperature, dim=-1)
            top_ids, top_lp, tail = topk_entries(lp, s.k)
            steps.append((top_ids.int(), top_lp, tail, fed))
            trained = fed & (running | ~finished | s.last_trained)  # the last: see above
            rows = trained.nonzero().squeeze(1)
            mass.index_add_(0, rows, lp[rows].double().exp())
            if not bool(running.any()):
                break
            rows = running.nonzero().squeeze(1)
            live = rows.tolist()
            token = torch.full((b,), self.pad_id, dtype=torch.long, device=dev)
            token[rows] = self._draw(logits[rows], s, [gens[i] for i in live])
            if s.canonical is not None:
                self._canonical(token, live, logits, s, gens, history, redraws)
            for i, t in zip(live, token[rows].tolist(), strict=True):
                history[i].append(t)
            count += 1
            hit = torch.isin(token, stop) & running
            finished |= hit
            fed = running.clone()
            running = running & ~hit & (count < limit)
            attention = torch.cat([attention, attention.new_ones((b, 1))], dim=1)
            positions = positions[:, -1:] + 1
            hidden, past = decoder_step(self.model, token[:, None], positions, attention, past)
            last = hidden[:, -1]
        return self._collect(prompts, pre, steps, history, finished, mass, redraws)

    def _prompt_targets(
        self,
        hidden: torch.Tensor,
        prompts: Sequence[list[int]],
        mass: torch.Tensor,
        s: SampleSettings,
    ) -> list[tuple[torch.Tensor, ...]]:
        """Targets at positions ``0 .. |P|-2`` of each prompt (the prefill's columns)."""
        width, out = hidden.shape[1], []
        for i, p in enumerate(prompts):
            h = hidden[i, width - len(p) : width - 1]
            lp = torch.log_softmax(self._logits(h) / s.kd_temperature, dim=-1)
            ids, logp, tail = topk_entries(lp, s.k)
            out.append((ids.int().cpu(), logp.cpu(), tail.cpu()))
            mass[i] += lp.double().exp().sum(0)
        return out

    def _collect(self, prompts, pre, steps, history, finished, mass, redraws) -> list[Sampled]:
        """Per row: the tokens it sampled, its entries in position order, on the CPU."""
        ids = torch.stack([x[0] for x in steps], 1).cpu()  # [B, steps, k]
        lp = torch.stack([x[1] for x in steps], 1).cpu()
        tail = torch.stack([x[2] for x in steps], 1).cpu()
        fed = torch.stack([x[3] for x in steps], 1).cpu()
        finished, mass = finished.cpu(), mass.cpu()
        out = []
        for i, p in enumerate(prompts):
            n = int(fed[i].sum())  # positions |P|-1 .. |S|-1: one per sampled token, plus one
            row = (ids[i, :n], lp[i, :n], tail[i, :n])
            first = len(p) - 1
            if pre is not None:
                row = tuple(torch.cat([a, b_]) for a, b_ in zip(pre[i], row, strict=True))
                first = 0
            out.append(
                Sampled(
                    prompt=list(p),
                    tokens=history[i],  # n - 1 of them
                    finished=bool(finished[i]),
                    redraws=redraws[i],
                    first=first,
                    ids=row[0],
                    logp=row[1],
                    tail=row[2],
                    mass=mass[i],
                )
            )
        return out


def entries_of(sample: Sampled, positions: np.ndarray) -> tuple[torch.Tensor, ...]:
    """``(ids, logp, tail)`` of ``sample`` at sequence ``positions`` (each in its range)."""
    idx = torch.as_tensor(positions - sample.first, dtype=torch.long)
    return sample.ids[idx].long(), sample.logp[idx], sample.tail[idx]
