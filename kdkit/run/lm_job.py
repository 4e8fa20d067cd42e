"""One ``kdkit train`` job with ``task: lm``: config -> tokenizer, models, token rows -> Trainer.

The same front door as the image job (:mod:`kdkit.run.job`): the config is validated before
anything is built, the run directory is refused when it holds a run (unless ``--resume``), and
``config.yaml`` is written only once training is about to start. The loop is the same
:class:`~kdkit.Trainer`; only the task (:class:`~kdkit.lm.task.LMTask`) and the input pipeline
(:class:`~kdkit.lm.task.TokenInputs`) differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from kdkit.config import LMRunConfig, to_dict
from kdkit.errors import KDError
from kdkit.lm.align import Aligner
from kdkit.lm.data import load_lm_dataset
from kdkit.lm.models import load_lm, max_positions
from kdkit.lm.onpolicy import OnPolicy, turn_end_id
from kdkit.lm.task import LMTask, TokenInputs
from kdkit.lm.vocab import check_vocab
from kdkit.train import Trainer, distributed

__all__ = ["LMRunData", "build_lm_trainer"]

log = logging.getLogger(__name__)


@dataclass
class LMRunData:
    train_loader: DataLoader
    val_loader: DataLoader | None
    tokenizer: Any
    train_rows: int


def _split(dataset: Any, fraction: float, seed: int) -> tuple[Subset, Subset]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    n_val = max(1, round(fraction * len(dataset)))
    if n_val >= len(dataset):
        raise KDError(f"data.val.split {fraction} leaves no training rows of {len(dataset)}")
    return Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])


def build_lm_data(cfg: LMRunConfig, tokenizer: Any, positions: int | None) -> LMRunData:
    """Token rows of ``data.text_files`` (and the val source), tokenized once, in loaders."""
    d = cfg.data
    kwargs = {
        "format": d.format,
        "max_length": d.max_length,
        "pack": d.pack,
        "loss_on": d.loss_on,
        # prompt/completion and chat records are never split (a split would orphan a reply)
        "overflow": d.overflow if d.format == "text" else "truncate",
        "max_positions": positions,
    }
    train = load_lm_dataset(list(d.text_files), tokenizer, **kwargs)
    val = None
    if d.val is not None and d.val.split is not None:
        train, val = _split(train, d.val.split, d.seed)
    elif d.val is not None:
        val = load_lm_dataset(list(d.val.text_files), tokenizer, **kwargs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Aligner(pad_id=int(pad), max_length=d.max_length)
    # the order is a function of (seed, epoch) alone (the Trainer calls set_epoch), so a
    # resumed run sees the same batches; under torchrun each rank reads its own share
    sampler = DistributedSampler(
        train,
        num_replicas=distributed.world_size(),
        rank=distributed.rank(),
        seed=cfg.train.seed,
        shuffle=True,
    )
    train_loader = DataLoader(train, batch_size=d.batch_size, sampler=sampler, collate_fn=collate)
    val_loader = None
    if val is not None:
        val_loader = DataLoader(val, batch_size=d.batch_size, shuffle=False, collate_fn=collate)
    return LMRunData(train_loader, val_loader, tokenizer, len(train))


def build_lm_trainer(cfg: LMRunConfig, device: torch.device) -> tuple[Trainer, LMRunData]:
    """Tokenizer, student, teacher (frozen), vocabulary check, data, LMTask and Trainer."""
    t = cfg.train
    student, tokenizer = load_lm(
        cfg.student.model, dtype=cfg.student.dtype, tokenizer=cfg.student.tokenizer, seed=t.seed
    )
    teacher = None
    vocab_size = None
    if cfg.teacher is not None:
        teacher, teacher_tok = load_lm(
            cfg.teacher.model, dtype=cfg.teacher.dtype, tokenizer=cfg.teacher.tokenizer
        )
        tokenizer = tokenizer or teacher_tok
        if teacher_tok is not None:
            vocab_size = check_vocab(
                tokenizer,
                teacher_tok,
                student.get_output_embeddings().out_features,
                teacher.get_output_embeddings().out_features,
            )
    if tokenizer is None:
        raise KDError(
            "no tokenizer: the student folder has none and there is no teacher; set "
            "student.tokenizer: DIR (a save_pretrained tokenizer folder)"
        )
    positions = max_positions(student)
    data = build_lm_data(cfg, tokenizer, positions)
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
    )
    if t.fsdp and distributed.is_distributed():
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
        },
    )
    return trainer, data
