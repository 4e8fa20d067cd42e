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
from kdkit.lm._chat import use_chat_template
from kdkit.lm._hf import quiet_progress
from kdkit.lm.generations import sample_generations
from kdkit.lm.models import load_lm, load_tokenizer, max_positions
from kdkit.lm.student import add_lora
from kdkit.lm.task import LMTask, TokenInputs
from kdkit.load import load_checkpoint
from kdkit.run.lm_job import build_lm_data, load_lm_teacher
from kdkit.run.lm_vocab import eval_byte_lengths, vocab_pairing
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
    """``(student with the run's weights, tokenizer, config)`` from a run dir or checkpoint
    (a LoRA student with its adapters in place, as it trained)."""
    student, tokenizer, cfg, _ = _rebuild(path, trust_code)
    return student, tokenizer, cfg


def _rebuild(path: str | Path, trust_code: bool) -> tuple[torch.nn.Module, Any, LMRunConfig, Any]:
    """:func:`load_lm_student` and, for a LoRA student, its ``peft.PeftModel`` (else None)."""
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
    if tokenizer is not None:  # data.chat_template: what the rows were rendered with
        use_chat_template(tokenizer, cfg.data.chat_template)
    wrapped = None if sc.peft is None else add_lora(student, sc.peft)
    student = student if wrapped is None else wrapped.get_base_model()
    student.load_state_dict(ckpt["student"])
    return student.eval(), tokenizer, cfg, wrapped


def evaluate_lm_run(
    path: str | Path,
    device: torch.device,
    *,
    teacher: bool = True,
    data: list[str] = (),
    trust_code: bool = False,
    samples: int = 3,
) -> dict[str, Any]:
    """The student's held-out perplexity, bits per byte, top-1 agreement with the teacher and
    mean KL (and, with ``teacher``, the teacher's perplexity and bits per byte) on the run's val
    tokens (``data``: other text files), and under ``samples`` the greedy continuations of that
    many val prompts by the student and the teacher."""
    student, tokenizer, cfg = load_lm_student(path, trust_code=trust_code)
    if data:
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, text_files=tuple(data), val=None, dataset=None)
        )
    # a model, or a target source: a top-k cache, a served teacher (kl and agree from it)
    # scored at T = 1 (LMTask's default): a served teacher is asked for T = 1 targets
    at_1 = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, temperature=1.0))
    teacher_model, teacher_tok = load_lm_teacher(at_1, trust_code=trust_code)
    cache = None if isinstance(teacher_model, torch.nn.Module) else teacher_model
    if cache is not None and data and cache.fixed_rows:  # other text than was captured
        teacher_model = cache = None  # the student's ppl only
    # as training had it: padded heads masked, a cache checked, or across tokenizers
    xtok, vocab_size = vocab_pairing(cfg, student, teacher_model, tokenizer, teacher_tok)
    run_data = build_lm_data(cfg, tokenizer, max_positions(student), None if xtok else cache, xtok)
    loader = run_data.val_loader if run_data.val_loader is not None else run_data.train_loader
    if loader is None:
        raise KDError("the run has no val data: pass --data FILES")
    inputs = TokenInputs(device)
    byte_lengths = eval_byte_lengths(tokenizer)
    task = LMTask(
        student, teacher_model, vocab_size=vocab_size, probe=False, byte_lengths=byte_lengths
    )
    scores = {"student": task.to(device).evaluate(inputs(b) for b in loader)}
    if teacher and isinstance(teacher_model, torch.nn.Module):
        scores["teacher"] = task.score_teacher(inputs(b) for b in loader)
    if samples and tokenizer is not None:  # a few prompts, teacher and student side by side
        rows = [loader.dataset[i] for i in range(min(samples, len(loader.dataset)))]
        gens = sample_generations(student, teacher_model, rows, tokenizer)
        scores["samples"] = [g.as_dict() for g in gens]
    return scores


def export_hf(
    path: str | Path, out_dir: str | Path, *, trust_code: bool = False, adapter: bool = False
) -> Path:
    """Write the run's student as a ``save_pretrained`` folder (safetensors + tokenizer). A
    LoRA student (``student.peft``) is merged into its base weights (a plain model, no peft
    needed to load it), or with ``adapter`` saved as the adapter alone (PEFT's
    ``adapter_config.json`` + ``adapter_model.safetensors``, loaded over the base model)."""
    out = Path(out_dir)
    check_output_path(out, what="--hf", directory=True)
    if out.exists() and any(out.iterdir()):
        raise KDError(f"--hf {out} is not empty; give a new folder")
    student, tokenizer, _, wrapped = _rebuild(path, trust_code)
    if adapter and wrapped is None:
        raise KDError(
            "--adapter: this run's student has no LoRA adapters (student.peft); export the "
            "whole model with --hf DIR alone"
        )
    model = student if wrapped is None else wrapped if adapter else wrapped.merge_and_unload()
    with writing(out, "--hf"), quiet_progress():  # a full disk is one line, not a traceback
        model.save_pretrained(str(out), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    return out
