"""One ``kdkit train`` job with ``task: lm``: config -> tokenizer, models, token rows -> Trainer.

The same front door as the image job (:mod:`kdkit.run.job`): the config is validated before
anything is built, the run directory is refused when it holds a run (unless ``--resume``), and
``config.yaml`` is written only once training is about to start. The loop is the same
:class:`~kdkit.Trainer`; only the task (:class:`~kdkit.lm.task.LMTask`) and the input pipeline
(:class:`~kdkit.lm.task.TokenInputs`) differ.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from kdkit.config import LMRunConfig, to_dict
from kdkit.errors import KDError
from kdkit.lm._chat import template_note, use_chat_template
from kdkit.lm._rows import ConcatRows
from kdkit.lm._sources import DatasetSource
from kdkit.lm._token_cache import default_token_cache
from kdkit.lm.align import Aligner
from kdkit.lm.data import load_lm_dataset
from kdkit.lm.hidden import LayerPair
from kdkit.lm.models import freeze_teacher, load_lm, load_tokenizer, max_positions, output_head
from kdkit.lm.onpolicy import OnPolicy, turn_end_id
from kdkit.lm.packing import check_packing
from kdkit.lm.student import prepare_student
from kdkit.lm.task import LMTask, TokenInputs
from kdkit.lm.tokenizer import pad_id
from kdkit.lm.vocab import check_borrowed_tokenizer, same_tokenization
from kdkit.run.fingerprints import lm_run_fingerprints
from kdkit.run.lm_report import data_notes
from kdkit.run.lm_served import capture_served, served_teacher
from kdkit.run.lm_vocab import eval_byte_lengths, shared_vocab, vocab_pairing
from kdkit.train import Trainer, distributed

__all__ = [
    "LMRunData",
    "served_teacher",
    "capture_run",
    "eval_byte_lengths",
    "run_tokenizer",
    "build_lm_trainer",
    "build_lm_data",
    "lm_datasets",
    "load_lm_teacher",
    "load_lm_teacher_backend",
    "probe_first_row",
    "shared_vocab",
]

log = logging.getLogger(__name__)


@dataclass
class LMRunData:
    #: DataLoaders (a served teacher's wrap theirs: kdkit.lm.serve.ServedLoader)
    train_loader: Any
    val_loader: Any
    tokenizer: Any
    train_rows: int
    #: the train and val rows' fingerprint (files, tokenizer, settings, ids) before any split
    corpus_fingerprint: str = ""
    #: lines for the report: what the data cost (truncation) and how it was rendered
    notes: tuple[str, ...] = ()


def _split(dataset: Any, fraction: float, seed: int) -> tuple[Subset, Subset]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    n_val = max(1, round(fraction * len(dataset)))
    if n_val >= len(dataset):
        raise KDError(f"data.val.split {fraction} leaves no training rows of {len(dataset)}")
    return Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])


def lm_datasets(cfg: LMRunConfig, tokenizer: Any, positions: int | None) -> tuple[Any, Any]:
    """The rows of ``data.text_files`` and of a separate ``data.val.text_files`` (None when
    there is none), tokenized once: what training reads and ``kdkit lm capture`` caches."""
    d = cfg.data
    kwargs = {
        "format": d.format,
        "max_length": d.max_length,
        "pack": d.pack,
        "loss_on": d.loss_on,
        # prompt/completion and chat records are never split (a split would orphan a reply)
        "overflow": d.overflow if d.format == "text" else "truncate",
        "max_positions": positions,
        "truncation": d.truncation,
        "cache_dir": default_token_cache() if d.token_cache else None,
    }
    use_chat_template(tokenizer, d.chat_template)  # data.chat_template, before any row
    source = None
    if d.dataset is not None:  # a Hugging Face datasets dataset on disk
        ds = d.dataset
        fields = {"text": ds.text_field, "prompt": ds.prompt_field,
                  "completion": ds.completion_field, "messages": ds.messages_field}  # fmt: skip
        source = DatasetSource(ds.path, ds.split, tuple(fields.items()))
    train = load_lm_dataset(list(d.text_files), tokenizer, source=source, **kwargs)
    val = None
    if d.val is not None and d.val.text_files:
        val = load_lm_dataset(list(d.val.text_files), tokenizer, **kwargs)
    return train, val


def build_lm_data(
    cfg: LMRunConfig, tokenizer: Any, positions: int | None, cache: Any = None, xtok: Any = None
) -> LMRunData:
    """Token rows of ``data.text_files`` (and the val source) in loaders; with a target source
    ``cache`` (a top-k cache, a served teacher) every batch carries its teacher targets; with
    ``xtok`` (:func:`kdkit.run.lm_xtok.cross_tokenizer`) every row its teacher's tokens."""
    d = cfg.data
    train, val = lm_datasets(cfg, xtok.source_tokenizer if xtok else tokenizer, positions)
    if xtok is not None:  # computed once per row, here, never in the step
        train, val = xtok.wrap(train), xtok.wrap(val)
    corpus = train.fingerprint + (val.fingerprint if val is not None else "")
    notes = data_notes(train, val)
    if d.format == "chat":
        notes += (template_note(tokenizer, d.chat_template),)
    collate: Any = Aligner(pad_id=pad_id(tokenizer), max_length=d.max_length)
    if xtok is not None:
        collate = xtok.collate(collate, train, val)
    if d.val is not None and d.val.split is not None:
        train, val = _split(train, d.val.split, d.seed)
    if cache is not None:  # a top-k cache attaches targets here, a served teacher in loader()
        collate = cache.collate(collate, policy=cfg.distill.tail)
    # the order is a function of (seed, epoch) alone (the Trainer calls set_epoch), so a
    # resumed run sees the same batches; under torchrun each rank reads its own share
    sampler = DistributedSampler(
        train,
        num_replicas=distributed.world_size(),
        rank=distributed.rank(),
        seed=cfg.train.seed,
        shuffle=True,
    )
    # each loader its own generator: an iterator draws its base seed from the global RNG
    # otherwise, and a mid-epoch resume would shift the on-policy samples (issue 38)
    gen = [torch.Generator().manual_seed(cfg.train.seed + i) for i in range(2)]
    train_loader = DataLoader(
        train, batch_size=d.batch_size, sampler=sampler, collate_fn=collate, generator=gen[0]
    )
    val_loader = None
    if val is not None:
        val_loader = DataLoader(
            val, batch_size=d.batch_size, shuffle=False, collate_fn=collate, generator=gen[1]
        )
    if cache is not None:  # a served teacher's targets are fetched ahead of the step
        train_loader = cache.loader(train_loader)
        val_loader = None if val_loader is None else cache.loader(val_loader)
    corpus = hashlib.sha256(corpus.encode()).hexdigest()
    return LMRunData(train_loader, val_loader, tokenizer, len(train), corpus, notes)


def load_lm_teacher(cfg: LMRunConfig, *, trust_code: bool = False) -> tuple[Any, Any]:
    """``(teacher, its tokenizer)`` of ``cfg.teacher``: a frozen-to-be model for ``hf:DIR``, a
    :class:`~kdkit.lm.cache.TopKCache` for ``cache:DIR`` (never a model), a
    :class:`~kdkit.lm.serve.ServedTeacher` for ``http://HOST:PORT`` (its tokenizer stays where
    it runs: None), ``(None, None)`` without a teacher. ``trust_code``: folders may run code of
    their own (``auto_map``)."""
    tc = cfg.teacher
    if tc is None:
        return None, None
    if tc.model.startswith(("http://", "https://")):
        return served_teacher(cfg), None
    if tc.model.startswith("cache:"):
        from kdkit.lm.cache import TopKCache

        cache = TopKCache(tc.model.removeprefix("cache:"))
        return cache, cache.tokenizer(trust_code=trust_code)
    return load_lm(tc.model, dtype=tc.dtype, tokenizer=tc.tokenizer, trust_code=trust_code)


def load_lm_teacher_backend(
    teacher: torch.nn.Module | None,
    cfg: LMRunConfig,
    dataset: Any,
    collate: Any,
    device: torch.device,
    temperature: float | None = None,
) -> torch.nn.Module | None:
    """The loaded teacher in the engine ``teacher.backend`` / ``teacher.precision`` name:
    itself (torch, fp32), or an :class:`~kdkit.lm.onnx_teacher.OnnxLMTeacher` exported to the
    ONNX cache folder (``~/.cache/kdkit/onnx``, keyed by its weights) and, for int8, gated on
    the first training rows at the run's KD temperature."""
    tc = cfg.teacher
    if teacher is None or tc is None or (tc.backend, tc.precision) == ("torch", "fp32"):
        return teacher
    from kdkit.lm.onnx_teacher import OnnxLMTeacher, probe_batches

    # the exported graph keeps the torch model's view: check that view before exporting it
    probe_first_row(teacher, dataset, "teacher", packing=cfg.data.pack)

    if device.type != "cpu":
        log.warning(
            "teacher.backend: onnx runs the teacher on the CPU; every batch crosses to %s and "
            "back (backend: torch keeps it on the device)",
            device,
        )
    probe = probe_batches(dataset, collate) if tc.precision == "int8" else None
    t = cfg.distill.temperature if temperature is None else temperature
    onnx = OnnxLMTeacher.from_model(teacher, precision=tc.precision, probe=probe, temperature=t)
    log.info("teacher: %s%s", onnx, f" ({onnx.fidelity})" if onnx.fidelity else "")
    return onnx


def build_lm_trainer(
    cfg: LMRunConfig, device: torch.device, *, trust_code: bool = False
) -> tuple[Trainer, LMRunData]:
    """Tokenizer, student, teacher (frozen), vocabulary check, data, LMTask and Trainer.
    ``trust_code`` lets the model and tokenizer folders run code of their own (``auto_map``)."""
    t, sc = cfg.train, cfg.student
    student, tokenizer = load_lm(
        sc.model, dtype=sc.dtype, tokenizer=sc.tokenizer, seed=t.seed, trust_code=trust_code
    )
    student = prepare_student(
        student, peft=sc.peft, gradient_checkpointing=t.gradient_checkpointing
    )
    teacher, teacher_tok = load_lm_teacher(cfg, trust_code=trust_code)
    if tokenizer is None and teacher_tok is not None:  # the teacher's, if the head fits it
        check_borrowed_tokenizer(sc.model, output_head(student).out_features, teacher_tok)
    tokenizer = tokenizer or teacher_tok
    if tokenizer is None:
        raise KDError(
            "no tokenizer: the student folder has none and the teacher gives none (there is no "
            "teacher, or it is served); set student.tokenizer: DIR (a save_pretrained folder)"
        )
    # a target source (a top-k cache, a served teacher) makes its targets outside the step
    cache = None if teacher is None or isinstance(teacher, torch.nn.Module) else teacher
    # the shared vocabulary, the cache's check, or across tokenizers (kdkit.lm.xtok)
    xtok, vocab_size = vocab_pairing(cfg, student, teacher, tokenizer, teacher_tok)
    if cfg.data.pack:  # a family that attends across packed documents: refused before any work
        for role, model in (("student", student), ("teacher", teacher)):
            if isinstance(model, torch.nn.Module):
                check_packing(model, role)
    positions = max_positions(student)
    # a cache of the teacher's tokens is read by the cross-tokenizer collate
    data = build_lm_data(cfg, tokenizer, positions, None if xtok else cache, xtok)
    # what resume compares (before the teacher becomes an ONNX engine or is sharded)
    fingerprints = lm_run_fingerprints(teacher, tokenizer, data.corpus_fingerprint)
    if cache is None:  # a cache is never a model to run
        loader = data.train_loader
        teacher = load_lm_teacher_backend(teacher, cfg, loader.dataset, loader.collate_fn, device)
    dc = cfg.distill
    on_policy = None
    if dc.on_policy is not None and dc.on_policy.lam > 0:
        # stop where the data's completions stop: EOS, or a chat template's end-of-turn token
        turn_end = turn_end_id(data.train_loader.dataset, cfg.data.max_length)
        stops = {tokenizer.eos_token_id, turn_end} - {None}
        on_policy = OnPolicy(
            dc.on_policy.lam,
            dc.on_policy.max_new_tokens,
            dc.on_policy.temperature,
            eos_token_id=tuple(sorted(stops)),
            aligner=data.train_loader.collate_fn,
        )
    task = LMTask(
        student,
        teacher,
        divergence=dc.divergence,
        temperature=dc.temperature,
        beta=dc.beta,
        skew=dc.skew,
        ce_weight=dc.ce_weight,
        memory_budget_mb=dc.memory_budget_mb,
        vocab_size=vocab_size,
        on_policy=on_policy,
        router_aux_loss=dc.router_aux_loss,
        packed=cfg.data.pack,
        layer_pairs=[LayerPair(p.student, p.teacher, p.weight, p.loss) for p in dc.pairs],
        byte_lengths=eval_byte_lengths(tokenizer),
    )
    if t.fsdp and distributed.is_distributed():
        task.probe(data.train_loader.dataset[0])  # before sharding (the Trainer's is skipped)
        task.to(device).shard()
        log.info("FSDP2: student and teacher sharded over %d ranks", distributed.world_size())
    elif t.fsdp:
        log.warning("train.fsdp: one process has nothing to shard over; run under torchrun")
    trainer = Trainer.from_config(
        cfg.train,
        task,
        data.train_loader,
        data.val_loader,
        device=device,
        inputs=TokenInputs(device),
        checkpoint_dir=cfg.run_dir,
        run_info={
            "student_spec": None,
            "teacher_spec": None if cfg.teacher is None else to_dict(cfg.teacher),
            "config": to_dict(cfg),
            "fingerprints": fingerprints,
        },
    )
    return trainer, data


def probe_first_row(model: Any, dataset: Any, role: str, *, packing: bool) -> Any:
    """The logits probe (:func:`kdkit.lm.probe.probe_model`) of one model on the first
    document of ``dataset``'s first row (a one-line KDError when kdkit's view is wrong)."""
    from kdkit.lm.probe import probe_model

    row = dataset[0]
    first = row.input_ids[row.doc_ids == row.doc_ids[0]]
    return probe_model(model, first, role=role, packing=packing)


def run_tokenizer(
    cfg: LMRunConfig, teacher_tokenizer: Any = None, *, trust_code: bool = False
) -> Any:
    """The tokenizer a run tokenizes its text with: the student's, else the teacher's (as
    :func:`build_lm_trainer` picks it)."""
    try:
        return load_tokenizer(cfg.student.model, cfg.student.tokenizer, trust_code=trust_code)
    except KDError:
        if teacher_tokenizer is None:
            raise
        return teacher_tokenizer


def capture_run(
    cfg: LMRunConfig,
    out: str | Path,
    *,
    topk: int = 32,
    encoding: str = "q8",
    temperature: float = 1.0,
    shard_rows: int = 256,
    progress: bool = True,
    trust_code: bool = False,
) -> dict[str, Any]:
    """``kdkit precompute CONFIG`` for ``task: lm`` (alias ``kdkit lm capture``): the config's
    teacher over its corpus (train and val rows, tokenized as training will) into the top-k
    cache ``out``; resumes an unfinished capture there. Returns the manifest. ``trust_code``
    lets the model and tokenizer folders run code of their own (``auto_map``)."""
    from kdkit._fingerprint import module_fingerprint
    from kdkit.lm.cache.capture import Provenance, capture, check_capture_options
    from kdkit.lm.cache.format import data_settings

    check_capture_options(topk=topk, encoding=encoding, temperature=temperature,
                          shard_rows=shard_rows, batch_size=cfg.data.batch_size)  # fmt: skip
    if cfg.teacher is None or cfg.teacher.model.startswith("cache:"):
        raise KDError("kdkit lm capture needs a live teacher: teacher: {model: 'hf:DIR'}")
    if cfg.teacher.model.startswith(("http://", "https://")):  # a served teacher is asked
        tokenizer = run_tokenizer(cfg)  # the run's: the served one stays where it runs
        return capture_served(cfg, out, tokenizer, lambda n: lm_datasets(cfg, tokenizer, n),
                              topk=topk, encoding=encoding, temperature=temperature,
                              shard_rows=shard_rows, progress=progress)  # fmt: skip
    tc = cfg.teacher
    teacher, teacher_tok = load_lm(
        tc.model, dtype=tc.dtype, tokenizer=tc.tokenizer, trust_code=trust_code
    )
    freeze_teacher(teacher)
    tokenizer = run_tokenizer(cfg, teacher_tok, trust_code=trust_code)
    if teacher_tok is not None and not same_tokenization(tokenizer, teacher_tok):
        # a student of another tokenizer trains from the teacher's own tokens (kdkit.lm.xtok)
        log.info("capture: the student tokenizes differently; capturing the teacher's own tokens")
        tokenizer = teacher_tok
    head_rows = output_head(teacher).out_features
    train, val = lm_datasets(cfg, tokenizer, max_positions(teacher))
    # the cache stores the model's own distribution: kdkit's view of it is checked first
    probe_first_row(teacher, train, "teacher", packing=cfg.data.pack)
    # read as one sequence, a row at a time: a mapped corpus is never copied into memory
    rows = ConcatRows(train.rows, *([val.rows] if val is not None else []))
    weights = module_fingerprint(teacher)  # of the weights, whatever engine runs them
    aligner = Aligner(pad_id=pad_id(tokenizer), max_length=cfg.data.max_length)
    engine = f"{cfg.teacher.backend} {cfg.teacher.precision}"
    # teacher.backend: onnx / precision: int8 (gated on the first rows, at the capture's T)
    teacher = load_lm_teacher_backend(
        teacher, cfg, train, aligner, torch.device("cpu"), temperature=temperature
    )
    provenance = Provenance(
        model=cfg.teacher.model,
        weights_sha256=weights,
        dtype=str(next(teacher.parameters()).dtype).removeprefix("torch."),
        vocab_rows=head_rows,
        engine=engine,
        data=data_settings(cfg.data),
    )
    return capture(
        teacher,
        rows,
        aligner,
        out,
        tokenizer=tokenizer,
        provenance=provenance,
        topk=topk,
        encoding=encoding,
        temperature=temperature,
        shard_rows=shard_rows,
        batch_size=cfg.data.batch_size,
        progress=progress,
    )
