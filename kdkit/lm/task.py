"""Token-level distillation of a causal language model, as a :class:`~kdkit.task.Task`.

The loop (:class:`kdkit.Trainer`) runs it like the image task: ``step(batch)`` returns the
loss, ``evaluate`` the held-out metrics. One step, one room per line::

    s = hidden_and_head(student, **batch.model_inputs())   # lm/models.py: hidden, no logits
    t = hidden_and_head(teacher, **batch.model_inputs())   # the frozen teacher, under no_grad
    out = token_divergence(s.hidden[m], s.head, DenseTeacher(t.hidden[m], t.head, t_transform),
                           student_transform=s_transform, ...)             # lm/fused.py
    return StepOutput(out.loss, {...}, normalizer=out.tokens)

What each model does after its head (Gemma's soft-cap, Granite's and Cohere's logit scales) is
found once, from the model, by :func:`kdkit.lm.logits.output_transform`, and checked against
the model's own logits before the first step (:mod:`kdkit.lm.probe`). A mixture-of-experts
student adds its router load-balancing loss as its own training would (:mod:`kdkit.lm.moe`).

The loss is a *sum* over the batch's trained tokens with ``normalizer`` = their count, so the
loop divides by the tokens of the whole optimizer step (every micro-batch, every rank): 1x8
and 8x1 give the same gradient. Only positions the :class:`~kdkit.lm.align.Aligner` marked
(``mask``) are selected, before the head, so padding and prompts cost nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

import kdkit._sharding as fsdp
from kdkit.errors import KDError
from kdkit.lm.align import TokenBatch
from kdkit.lm.data import TokenRow
from kdkit.lm.divergence import DIVERGENCES
from kdkit.lm.fused import DenseTeacher, LossOutput, token_divergence
from kdkit.lm.hidden import HiddenPairs, LayerPair
from kdkit.lm.logits import output_transform
from kdkit.lm.models import HiddenAndHead, decoder_outputs, freeze_teacher, hidden_and_head
from kdkit.lm.moe import router_aux
from kdkit.lm.onpolicy import OnPolicy
from kdkit.lm.packing import check_packing
from kdkit.lm.probe import ProbeResult, probe_model
from kdkit.lm.targets import NoTeacher
from kdkit.lm.xtok.data import XTokBatch, teacher_example
from kdkit.load import restore_part
from kdkit.task import StepOutput, Task

__all__ = ["LMTask", "TokenInputs"]

log = logging.getLogger(__name__)


class TokenInputs:
    """The LM input pipeline: an :class:`~kdkit.lm.align.TokenBatch` (what the DataLoader's
    :class:`~kdkit.lm.align.Aligner` collated) moved to the device once."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def to(self, device: torch.device | str) -> TokenInputs:
        self.device = torch.device(device)
        return self

    def __call__(self, batch: TokenBatch, epoch: int = 0, *, augment: bool = True) -> TokenBatch:
        if not isinstance(batch, TokenBatch):
            raise KDError(
                f"the LM task trains on kdkit.lm.TokenBatch (collate with kdkit.lm.Aligner), "
                f"got {type(batch).__name__}"
            )
        return batch.to(self.device, non_blocking=True)


class _Hidden(nn.Module):
    """A causal LM whose ``forward`` is :func:`hidden_and_head`: the root unit a sharded
    teacher runs through, so FSDP2 gathers its embeddings, norm and head for the step."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: TokenBatch) -> HiddenAndHead:
        return hidden_and_head(self.lm, **batch.model_inputs())


class LMTask(Task):
    """A student LM distilled from a frozen teacher LM on the same tokens.

    Args:
        student: a causal LM (Hugging Face, or any module with the
            :func:`~kdkit.lm.models.hidden_and_head` protocol).
        teacher: the teacher LM, or None (the scratch baseline: cross-entropy only). It is
            frozen, kept in eval mode and in its own dtype, and held outside the module tree
            (never in the optimizer, a checkpoint or DDP). Or a target source, whose
            targets are made outside the step: a :class:`~kdkit.lm.cache.TopKCache` (every
            batch brings its cached targets: collate with ``cache.collate(aligner)``) or a
            :class:`~kdkit.lm.serve.ServedTeacher` (batches of ``served.loader(loader)`` bring
            theirs; on-policy samples are sent for scoring in the step).
        divergence: ``fkl``, ``rkl``, ``jsd``, ``skew_fkl``, ``skew_rkl``, ``tvd`` or ``ce``.
        temperature: the KD temperature (T^2 scaled); sampling temperatures are elsewhere.
        beta, skew: the ``jsd`` and ``skew_*`` parameters.
        ce_weight: weight of the hard-label cross-entropy mix (1 - ce_weight on the KD term).
        memory_budget_mb: the fused loss's working memory (sizes its token chunks).
        vocab_size: the real shared vocabulary when a head has padded rows
            (:func:`kdkit.lm.vocab.check_vocab`).
        on_policy: GKD's on-policy sampling (:class:`~kdkit.lm.onpolicy.OnPolicy`): in
            :meth:`step` only, some batches' completions are the student's own samples.
        probe: check kdkit's view of each model against its own logits once, before the first
            step (:meth:`probe`; the Trainer runs it from :meth:`check_inputs`).
        router_aux_loss: add a mixture-of-experts student's router load-balancing loss, with
            its config's ``router_aux_loss_coef`` (:mod:`kdkit.lm.moe`); logged as ``router_aux``.
        packed: the data packs documents into rows (``data.pack``): the probe checks packing.
        layer_pairs: hidden-state pairs between decoder layers (:mod:`kdkit.lm.hidden`,
            ``distill.pairs``), with a learned projection where the widths differ.
        byte_lengths: ``[ids]`` the UTF-8 bytes each token id stands for
            (:func:`kdkit.lm.tokenizer.token_byte_lengths`), or ``[2, ids]`` for a tokenizer
            with a dummy prefix (:func:`kdkit.run.lm_vocab.eval_byte_lengths`): :meth:`evaluate`
            then reports bits per byte, which compares models across tokenizers.
    """

    best_metric = ("ppl", False)
    unit = "tok"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        divergence: str = "fkl",
        temperature: float = 1.0,
        beta: float = 0.5,
        skew: float = 0.1,
        ce_weight: float = 0.0,
        memory_budget_mb: float = 256,
        vocab_size: int | None = None,
        on_policy: OnPolicy | None = None,
        probe: bool = True,
        router_aux_loss: bool = True,
        packed: bool = False,
        layer_pairs: Sequence[LayerPair] = (),
        byte_lengths: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            from kdkit.errors import closest_names

            hint = closest_names(divergence, DIVERGENCES, 1)
            raise KDError(
                f"unknown divergence {divergence!r}; expected one of {list(DIVERGENCES)}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        if teacher is student:
            raise KDError("the teacher is the student; distillation needs a separate teacher")
        self.cache = None if isinstance(teacher, nn.Module) or teacher is None else teacher
        teacher = None if self.cache is not None else teacher
        self.student = student
        object.__setattr__(self, "teacher", None if teacher is None else freeze_teacher(teacher))
        self.options = {
            "divergence": divergence,
            "temperature": temperature,
            "beta": beta,
            "skew": skew,
            "memory_budget_mb": memory_budget_mb,
            "vocab_size": vocab_size if self.cache is None else (vocab_size or self.cache.vocab),
        }
        self.ce_weight = 1.0 if teacher is None and self.cache is None else float(ce_weight)
        object.__setattr__(self, "_teacher_root", None if teacher is None else _Hidden(teacher))
        self.on_policy = on_policy
        # what each model does after its head: found once, here, from the model itself
        self.student_transform = output_transform(student)
        self.teacher_transform = None if teacher is None else output_transform(teacher)
        self.router = router_aux(student) if router_aux_loss else None
        self.probe_enabled, self.packed = probe, packed
        self.byte_lengths = byte_lengths  # a plain tensor: never in a checkpoint or the optimizer
        #: what the logits probe found (:meth:`probe`), for the run's report
        self.probe_results: list[ProbeResult] = []
        if layer_pairs and teacher is None:
            raise KDError("distill.pairs needs a live teacher (hf:DIR) whose layers run")
        self.hidden_pairs = HiddenPairs(layer_pairs, student, teacher) if layer_pairs else None

    def shard(self) -> LMTask:
        """FSDP2 over every rank (``train.fsdp: true``): each decoder layer of the student and
        of the teacher is a unit; the student's embeddings, norm and head form the root unit
        with this task (the step runs through :meth:`forward`), the frozen teacher's the root
        of its own. Call it under torchrun, after moving the models to this rank's device."""
        if self.teacher is not None:
            fsdp.shard(self._teacher_root, fsdp.blocks_of(self.teacher))
        fsdp.shard(self, fsdp.blocks_of(self.student))
        return self

    def to(self, *args: Any, **kwargs: Any) -> LMTask:
        super().to(*args, **kwargs)
        device = next(
            (a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device))), None
        )
        if device is not None and self.teacher is not None:
            self.teacher.to(device)  # its dtype stays its own
        return self

    def set_epoch(self, epoch: float) -> None:
        """Nothing is scheduled by epoch in the LM task."""

    # -- the step ----------------------------------------------------------------------------
    def _loss(self, batch: TokenBatch, *, reduction: str) -> LossOutput:
        if batch.n_tokens == 0:
            raise KDError(
                "every token of this batch is masked (nothing to train on): check data.loss_on "
                "and that completions / assistant turns are not truncated away"
            )
        mask = batch.mask
        if batch.packed:  # a family that attends across documents: refused, never trained
            check_packing(self.student, "student")
            if self.teacher is not None:
                check_packing(self.teacher, "teacher")
        route = self.router is not None and torch.is_grad_enabled()
        s = decoder_outputs(self.student, **batch.model_inputs(), router_logits=route)
        labels = batch.labels[mask]
        hidden = s.hidden[mask]
        teacher = contextlib.nullcontext()
        if self.cache is not None:  # targets made outside the step: the batch brings them
            target = batch.teacher if batch.teacher is not None else self.cache.target_of(batch)
        elif self.teacher is None:  # the scratch baseline: cross-entropy alone, no KD term
            target = NoTeacher(tuple(hidden.shape[:-1]), s.head.weight.shape[0])
        elif isinstance(batch.teacher, XTokBatch):  # another tokenizer: the teacher's own tokens
            teacher = fsdp.gathered(self._teacher_root)
            target = batch.teacher.run(self._teacher_root, self.teacher_transform, mask, labels)
        elif batch.teacher is not None:  # computed beside the previous step (teacher_ahead)
            target = batch.teacher.result()
        else:
            # sharded, the teacher's head stays gathered until the fused loss has read it
            teacher = fsdp.gathered(self._teacher_root)
            with torch.no_grad():
                t = self._teacher_root(batch)
            target = DenseTeacher(t.hidden[mask], t.head, self.teacher_transform)
        with teacher:
            out = token_divergence(
                hidden,
                s.head,
                target,
                labels=labels,
                ce_weight=self.ce_weight,
                reduction=reduction,
                student_transform=self.student_transform,
                **self.options,
            )
        if not route or not s.router_logits:
            return out
        # the model's own loss is mean + coef * aux; this one is a sum over `tokens`
        aux = self.router(s.router_logits, batch.padding_mask)
        weight = self.router.coef * (out.tokens if reduction == "sum" else 1.0)
        return replace(
            out, loss=out.loss + weight * aux.to(out.loss.dtype), router_aux=aux.detach()
        )

    def teacher_ahead(self, batch: TokenBatch, worker: Any) -> TokenBatch:
        """The next step's batch with the live teacher's target started on ``worker``
        (:mod:`kdkit.train.overlap`); not for a cache, on-policy samples (the student writes
        them at the step), sharded models (the teacher's forward is collective) or hidden-state
        pairs (their hooks catch the teacher's layers during the step itself)."""
        if self.teacher is None or self.on_policy is not None or fsdp.is_sharded(self):
            return batch
        if self.hidden_pairs is not None:
            return batch

        def target() -> Any:
            xt, mask = batch.teacher, batch.mask
            if isinstance(xt, XTokBatch):  # a teacher of another tokenizer: its own tokens
                return xt.run(self._teacher_root, self.teacher_transform, mask, batch.labels[mask])
            with torch.no_grad():
                t = self._teacher_root(batch)
            return DenseTeacher(t.hidden[mask], t.head, self.teacher_transform)

        return replace(batch, teacher=worker.submit(target))

    def forward(self, batch: TokenBatch, reduction: str = "sum") -> LossOutput:
        """The loss of ``batch`` (a module call, so FSDP2's hooks run around it when sharded);
        in training, with the hidden-state pairs' loss added."""
        if self.hidden_pairs is None or not torch.is_grad_enabled():
            return self._loss(batch, reduction=reduction)
        with self.hidden_pairs.capture() as seen:
            out = self._loss(batch, reduction=reduction)
        pairs = self.hidden_pairs.loss(seen, batch.mask)
        scale = 1.0 if reduction == "sum" else 1.0 / max(out.tokens, 1)
        return replace(
            out, loss=out.loss + scale * pairs, hidden=pairs.detach() / max(out.tokens, 1)
        )

    def step(self, batch: TokenBatch) -> StepOutput:
        """The summed loss of the batch's trained tokens; the loop normalizes by the step's
        token count (see the module docstring)."""
        if self.probe_enabled and not self.probe_results:  # a hand-written loop's first batch
            if fsdp.is_sharded(self):
                self.probe_enabled = False
            else:
                self.probe(batch)
        if self.on_policy is not None:  # the teacher scores the student's own samples
            batch = self.on_policy(self.student, batch)
        out = self(batch)
        components = {"loss": out.loss.detach() / max(out.tokens, 1)}  # per token
        if self.teacher is not None or self.cache is not None:  # no "kl 0" without a teacher
            components["kl"] = out.kl
        if out.ce is not None:
            components["ce"] = out.ce
        if out.router_aux is not None:
            components["router_aux"] = out.router_aux
        if out.hidden is not None:
            components["hidden"] = out.hidden
        return StepOutput(out.loss, components, None, count=out.tokens, normalizer=out.tokens)

    def epoch_stats(self) -> dict[str, float]:
        """An on-policy run's sample statistics (:meth:`OnPolicy.epoch_stats`), else none."""
        return {} if self.on_policy is None else self.on_policy.epoch_stats()

    # -- the logits probe ------------------------------------------------------------------------
    def probe(self, example: TokenBatch | TokenRow) -> list[ProbeResult]:
        """Check kdkit's view (hidden, head, transform) of the student and the live teacher
        against their own logits on the first document of ``example`` (and, when the data is
        packed, a packed row of its tokens): a one-line KDError above tolerance
        (:mod:`kdkit.lm.probe`). Stored in :attr:`probe_results`."""
        ids, doc = _first_row(example)
        first = ids[doc == doc[0]]
        packing = self.packed or getattr(example, "packed", False)
        models = [("student", self.student, self.student_transform, first)]
        if self.teacher is not None:  # on its own tokens (another tokenizer: the row's)
            t_ids, t_doc = _first_row(teacher_example(example))
            t_first = t_ids[t_doc == t_doc[0]]
            models.append(("teacher", self.teacher, self.teacher_transform, t_first))
        if fsdp.is_sharded(self):
            raise KDError("probe the models before sharding them (LMTask.probe, then shard)")
        self.probe_results = [
            probe_model(model, ids, role=role, transform=transform, packing=packing)
            for role, model, transform, ids in models
        ]
        return self.probe_results

    def check_inputs(self, dataset: Any, inputs: Any) -> None:
        """The logits probe (:meth:`probe`) on the first training row, before the first step
        (sharded models were probed before sharding by ``kdkit train``, or are not probed)."""
        if not self.probe_enabled or self.probe_results:
            return
        if fsdp.is_sharded(self):
            log.info("logits probe: skipped (the models are sharded; LMTask.probe before shard)")
            self.probe_enabled = False
            return
        try:
            row = dataset[0] if dataset is not None and len(dataset) else None
        except (TypeError, IndexError, KeyError):
            row = None
        if isinstance(row, TokenRow):
            self.probe(row)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, batches: Iterable[TokenBatch], autocast: Callable = contextlib.nullcontext
    ) -> dict[str, float]:
        """Held-out perplexity (exp of the token-mean cross-entropy), top-1 agreement with the
        teacher and the mean forward KL, over every trained token of ``batches``; with
        ``byte_lengths``, bits per byte (``bpb``: the summed cross-entropy in bits over the UTF-8
        bytes of the scored tokens) and those ``bytes``."""
        was = self.student.training
        self.student.eval()
        tokens = n_bytes = 0
        ce_sum = kl_sum = agree_sum = 0.0
        table = self.byte_lengths
        try:
            for batch in batches:
                with autocast():
                    out = self(batch)
                n = out.tokens
                tokens += n
                ce_sum += float(out.ce) * n
                kl_sum += float(out.kl) * n
                agree_sum += float(out.agree) * n if out.agree is not None else 0.0
                if table is not None:
                    table = table.to(batch.labels.device)  # once: a no-op after the first batch
                    m = batch.mask
                    n_bytes += _label_bytes(table, batch.labels[m], batch.input_ids[m])
        finally:
            self.student.train(was)
        if tokens == 0:
            raise KDError("the evaluation data holds no trained tokens")
        scores = {"ppl": math.exp(ce_sum / tokens), "ce": ce_sum / tokens, "tokens": float(tokens)}
        if n_bytes > 0:
            scores.update({"bpb": ce_sum / math.log(2) / n_bytes, "bytes": float(n_bytes)})
        if self.teacher is not None or self.cache is not None:
            scores.update({"kl": kl_sum / tokens, "agree": 100.0 * agree_sum / tokens})
        return scores

    def score_teacher(
        self, batches: Iterable[TokenBatch], autocast: Callable = contextlib.nullcontext
    ) -> dict[str, float]:
        """The teacher's own held-out perplexity on ``batches``, as :meth:`evaluate` scores the
        student's (sharded: every rank calls it; the teacher's root stays gathered meanwhile)."""
        if self.teacher is None:
            raise KDError("this task has no teacher to score")
        # a teacher of another tokenizer is scored on its own tokens of the same text (the
        # student's byte lengths are not its: no bits per byte for it here)
        it = iter(batches)
        first = next(it, None)
        cross = isinstance(getattr(first, "teacher", None), XTokBatch)
        own = (teacher_example(b) for b in itertools.chain([] if first is None else [first], it))
        with fsdp.gathered(self._teacher_root):
            lengths = None if cross else self.byte_lengths
            task = LMTask(self.teacher, None, probe=False, byte_lengths=lengths)
            return task.evaluate(own, autocast)

    # -- checkpoint parts ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The student's weights; sharded, gathered whole on rank 0 (every rank calls this)."""
        parts = {"student": fsdp.full_state(self.student)}
        if self.hidden_pairs is not None:  # the pairs' projections
            parts["adapters"] = self.hidden_pairs.state_dict()
        return parts

    def load_checkpoint_state(self, state: Mapping[str, Any], where: str = "") -> None:
        """Sharded, rank 0's copy is broadcast into every rank's shards (every rank calls it)."""
        if fsdp.is_sharded(self):
            fsdp.load_full_state(self.student, state.get("student") or {})
            return
        restore_part(where, "student", self.student, state.get("student"))
        if self.hidden_pairs is not None:
            restore_part(where, "adapters", self.hidden_pairs, state.get("adapters"))


def _label_bytes(table: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> int:
    """The UTF-8 bytes the scored ``labels`` stand for (a KDError for an id the table lacks);
    a ``[2, ids]`` table counts a label after a zero-byte input (BOS) by row 1 (dummy prefix)."""
    if labels.numel() and int(labels.max()) >= table.shape[-1]:
        raise KDError(
            f"token id {int(labels.max())} is beyond the byte-length table's "
            f"{table.shape[-1]} ids: build it from the tokenizer of the data"
        )
    if table.dim() == 1:
        return int(table[labels].sum())
    return int(table[(table[0][inputs.clamp_max(table.shape[1] - 1)] == 0).long(), labels].sum())


def _first_row(example: TokenBatch | TokenRow) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, doc_ids)`` of the first row (its real tokens, on the CPU)."""
    if isinstance(example, TokenRow):
        return example.input_ids.cpu(), example.doc_ids.cpu()
    doc = example.doc_ids[0].cpu()
    keep = doc >= 0
    return example.input_ids[0].cpu()[keep], doc[keep]
