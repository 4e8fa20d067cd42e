"""``kdkit eval`` and ``kdkit export --hf`` for a ``task: lm`` run directory.

A run's checkpoint holds the student's weights and the resolved config; the student is rebuilt
from ``student.model`` (its config, random init) and the weights loaded, so a run directory is
all these commands need. The exported folder is a plain ``save_pretrained`` folder
(safetensors + tokenizer) that ``transformers.AutoModelForCausalLM`` loads with no kdkit
installed. ``trust_code`` (``--trust-code``) lets the run's model and tokenizer folders run code of
their own (``auto_map``); without it such a folder is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from kdkit._io import check_output_path, writing
from kdkit.config import LMRunConfig, parse
from kdkit.errors import KDError
from kdkit.lm._hf import quiet_progress
from kdkit.lm.models import load_lm, load_tokenizer, max_positions, output_head
from kdkit.lm.task import LMTask, TokenInputs
from kdkit.load import load_checkpoint
from kdkit.run.lm_job import build_lm_data, load_lm_teacher, shared_vocab
from kdkit.run.lm_xtok import cross_tokenizer
from kdkit.run.models import checkpoint_in

__all__ = ["lm_run_config", "load_lm_student", "evaluate_lm_run", "export_hf"]


def lm_run_config(ckpt: dict[str, Any]) -> LMRunConfig:
    cfg = parse(ckpt["config"])
    if not isinstance(cfg, LMRunConfig):  # a guard on the input, not a dispatch
        raise KDError("this checkpoint is not from a task: lm run")
    return cfg


def load_lm_student(
    path: str | Path, *, trust_code: bool = False
) -> tuple[torch.nn.Module, Any, LMRunConfig]:
    """``(student with the run's weights, tokenizer, config)`` from a run dir or checkpoint."""
    ckpt = load_checkpoint(checkpoint_in(path), map_location="cpu")
    cfg = lm_run_config(ckpt)
    sc, tc = cfg.student, cfg.teacher
    student, tokenizer = load_lm(
        sc.model, dtype=sc.dtype, tokenizer=sc.tokenizer, trust_code=trust_code
    )
    if tokenizer is None and tc is not None:  # the teacher's, without its weights
        if tc.model.startswith("cache:"):
            from kdkit.lm.cache import TopKCache

            cache = TopKCache(tc.model.removeprefix("cache:"))
            tokenizer = cache.tokenizer(trust_code=trust_code)
        elif not tc.model.startswith(("http://", "https://")):  # a served one stays there
            tokenizer = load_tokenizer(tc.model, tc.tokenizer, trust_code=trust_code)
    student.load_state_dict(ckpt["student"])
    return student.eval(), tokenizer, cfg


def evaluate_lm_run(
    path: str | Path,
    device: torch.device,
    *,
    teacher: bool = True,
    data: list[str] = (),
    trust_code: bool = False,
) -> dict[str, dict[str, float]]:
    """The student's held-out perplexity, top-1 agreement with the teacher and mean KL (and,
    with ``teacher``, the teacher's perplexity) on the run's val tokens (``data``: other
    text files)."""
    student, tokenizer, cfg = load_lm_student(path, trust_code=trust_code)
    if data:
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, text_files=tuple(data), val=None)
        )
    # a model, or a target source: a top-k cache, a served teacher (kl and agree from it)
    # scored at T = 1 (LMTask's default): a served teacher is asked for T = 1 targets
    at_1 = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, temperature=1.0))
    teacher_model, teacher_tok = load_lm_teacher(at_1, trust_code=trust_code)
    cache = None if isinstance(teacher_model, torch.nn.Module) else teacher_model
    if cache is not None and data and cache.fixed_rows:  # other text than was captured
        teacher_model = cache = None  # the student's ppl only
    # a teacher (or a cache) of another tokenizer: its own tokens ride with each batch
    xtok = cross_tokenizer(cfg, student, teacher_model, tokenizer, teacher_tok)
    if cache is not None and xtok is None:
        cache.check_run(cfg.data, tokenizer, output_head(student).out_features)
    # padded heads (more rows than the tokenizer): the real vocabulary, as training had it
    vocab_size = (
        xtok.student_vocab if xtok else shared_vocab(student, teacher_model, tokenizer, teacher_tok)
    )
    run_data = build_lm_data(cfg, tokenizer, max_positions(student), None if xtok else cache, xtok)
    loader = run_data.val_loader if run_data.val_loader is not None else run_data.train_loader
    if loader is None:
        raise KDError("the run has no val data: pass --data FILES")
    inputs = TokenInputs(device)
    task = LMTask(student, teacher_model, vocab_size=vocab_size, probe=False)
    scores = {"student": task.to(device).evaluate(inputs(b) for b in loader)}
    if teacher and isinstance(teacher_model, torch.nn.Module):
        scores["teacher"] = task.score_teacher(inputs(b) for b in loader)
    return scores


def export_hf(path: str | Path, out_dir: str | Path, *, trust_code: bool = False) -> Path:
    """Write the run's student as a ``save_pretrained`` folder (safetensors + tokenizer)."""
    out = Path(out_dir)
    check_output_path(out, what="--hf", directory=True)
    if out.exists() and any(out.iterdir()):
        raise KDError(f"--hf {out} is not empty; give a new folder")
    student, tokenizer, _ = load_lm_student(path, trust_code=trust_code)
    with writing(out, "--hf"), quiet_progress():  # a full disk is one line, not a traceback
        student.save_pretrained(str(out), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    return out
