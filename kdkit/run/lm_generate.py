"""``kdkit lm generate CONFIG --prompts FILE --out DIR`` (and ``--score FILE``): a config's
teacher writes completions and their top-k targets (:mod:`kdkit.lm.cache.generated`), or scores
completions it did not write (a capture of FILE, :func:`kdkit.run.lm_job.capture_run`).

The config is the one training will use: its ``teacher`` (a live ``hf:DIR``), its tokenizer
(the student's, else the teacher's, as ``kdkit train`` picks it), its ``data`` settings (format,
max_length, loss_on; the rows are built by the training path) and ``distill.temperature`` (the
targets' temperature). ``data.text_files`` is not read: the prompts (or FILE) are the data here,
and the written ``OUT/data/*.jsonl`` is what training reads afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kdkit.config import LMRunConfig, config_base, parse_config, resolve_paths, validate
from kdkit.errors import KDError
from kdkit.lm._chat import use_chat_template
from kdkit.lm.cache.capture import Provenance, check_capture_options
from kdkit.lm.cache.format import data_settings
from kdkit.lm.models import freeze_teacher, load_lm, max_positions, output_head
from kdkit.lm.prompts import PromptFile, PromptFormat
from kdkit.lm.sampling import SampleSettings, TeacherSampler, check_sample_settings
from kdkit.lm.tokenizer import pad_id
from kdkit.run.lm_job import capture_run, lm_datasets, run_tokenizer

__all__ = ["generate_config", "generate_run", "generate_lines", "score_run"]

log = logging.getLogger(__name__)


def generate_config(path: str | Path, overrides: list[str], data_file: str | Path) -> LMRunConfig:
    """The ``task: lm`` config at ``path`` with ``data.text_files`` set to ``data_file`` (the
    prompts or the completions to score) and no other source (``data.dataset``, val), validated
    as ``kdkit train`` would."""
    cfg = parse_config(path, overrides)
    if not isinstance(cfg, LMRunConfig):
        raise KDError("kdkit lm generate needs a task: lm config")
    if not Path(data_file).is_file():
        raise KDError(f"no such file {str(data_file)!r}")
    data = replace(cfg.data, text_files=(str(Path(data_file).resolve()),), dataset=None, val=None)
    return validate(resolve_paths(replace(cfg, data=data), config_base(path)))


def _live_teacher(cfg: LMRunConfig) -> None:
    tc = cfg.teacher
    if tc is None or tc.model.startswith(("cache:", "http://", "https://")):
        raise KDError(
            "kdkit lm generate needs a live teacher here: teacher: {model: 'hf:DIR'} (a cache "
            "cannot sample, and a served teacher answers top-k targets, not samples)"
        )
    if (tc.backend, tc.precision) != ("torch", "fp32"):
        raise KDError(
            "kdkit lm generate samples with the PyTorch teacher (a KV cache); set "
            "teacher.backend: torch and teacher.precision: fp32 (teacher.dtype may be bfloat16)"
        )


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The data path's per-file INFO line, silenced for each written part."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def generate_run(
    cfg: LMRunConfig, prompts: str | Path, out: str | Path, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Sample ``options["n"]`` completions per prompt from the config's teacher into ``out``
    (resuming an unfinished run there). ``options``: n, temperature, top_p, max_new_tokens,
    seed, topk, encoding, shard_rows, batch_size, keep_unfinished, dedup, device, progress,
    trust_code (None: the default). Returns the manifest."""
    from kdkit._fingerprint import module_fingerprint
    from kdkit.lm.cache.generated import GenerateOptions, generate
    from kdkit.lm.probe import probe_model
    from kdkit.lm.vocab import check_vocab

    o = {k: v for k, v in options.items() if v is not None}
    sampling_flags = {"n": o.get("n", 1), "temperature": o.get("temperature", 1.0),
                      "top_p": o.get("top_p", 1.0), "max_new_tokens": o.get("max_new_tokens", 256),
                      "seed": o.get("seed", 0)}  # fmt: skip
    check_sample_settings(**sampling_flags)
    batch_size = o.get("batch_size", cfg.data.batch_size)
    check_capture_options(topk=o.get("topk", 32), encoding=o.get("encoding", "q8"),
                          temperature=cfg.distill.temperature,
                          shard_rows=o.get("shard_rows", 256), batch_size=batch_size)  # fmt: skip
    _live_teacher(cfg)
    if cfg.data.pack:
        raise KDError(
            "kdkit lm generate caches one completion per row: set data.pack: false (to train "
            "packed rows, generate, then kdkit lm capture the written data with pack: true)"
        )
    source = PromptFile(prompts, cfg.data.format)  # the format and the file, before any load
    trust = bool(o.get("trust_code", False))
    tc = cfg.teacher
    teacher, teacher_tok = load_lm(
        tc.model, dtype=tc.dtype, tokenizer=tc.tokenizer, trust_code=trust
    )
    freeze_teacher(teacher)
    tokenizer = run_tokenizer(cfg, teacher_tok, trust_code=trust)
    # data.chat_template before the first prompt is rendered (the rows are built with it too)
    use_chat_template(tokenizer, cfg.data.chat_template)
    head_rows = output_head(teacher).out_features
    vocab = min(head_rows, len(tokenizer))
    if teacher_tok is not None and teacher_tok is not tokenizer:
        vocab = check_vocab(tokenizer, teacher_tok, head_rows, head_rows)
    fmt = PromptFormat(tokenizer, cfg.data.format)
    first = fmt.prompt_ids(next(source.read()).record)
    if len(first) >= 2:  # kdkit's view of the teacher against its own logits, before any work
        probe_model(teacher, torch.as_tensor(first), role="teacher")
    device = torch.device(o.get("device") or cfg.train.device or _default_device())
    weights = module_fingerprint(teacher)
    teacher.to(device)
    positions = max_positions(teacher)

    def rows_of(part: Path) -> list[Any]:
        # read once: not kept in the tokenized-corpus cache (data.token_cache)
        data = replace(cfg.data, text_files=(str(part),), val=None, token_cache=False)
        sub = replace(cfg, data=data)
        with _quiet("kdkit.lm.data"):
            return list(lm_datasets(sub, tokenizer, positions)[0].rows)

    provenance = Provenance(
        model=tc.model, weights_sha256=weights,
        dtype=str(next(teacher.parameters()).dtype).removeprefix("torch."),
        vocab_rows=head_rows, engine=f"{tc.backend} {tc.precision}", data=data_settings(cfg.data),
    )  # fmt: skip
    sampling = SampleSettings(
        temperature=float(sampling_flags["temperature"]), top_p=float(sampling_flags["top_p"]),
        max_new_tokens=sampling_flags["max_new_tokens"], stop_ids=fmt.stop_ids,
        k=o.get("topk", 32), kd_temperature=float(cfg.distill.temperature),
        prompt_targets=cfg.data.loss_on == "all",
        last_trained=cfg.data.loss_on == "all" and fmt.after_stop > 0,
        canonical=_canonical(fmt, o),
    )  # fmt: skip
    limit = min(cfg.data.max_length, positions or cfg.data.max_length)
    run = GenerateOptions(
        max_length=limit, n=sampling_flags["n"], seed=sampling_flags["seed"],
        batch_size=batch_size, keep_unfinished=bool(o.get("keep_unfinished", False)),
        dedup=bool(o.get("dedup", True)), shard_rows=o.get("shard_rows", 256),
        encoding=o.get("encoding", "q8"), progress=bool(o.get("progress", True)),
    )  # fmt: skip
    sampler = TeacherSampler(teacher, vocab, pad_id(tokenizer), device)
    return generate(sampler, source, fmt, out, rows_of=rows_of, tokenizer=tokenizer,
                    provenance=provenance, sampling=sampling, options=run)  # fmt: skip


def _canonical(fmt: PromptFormat, options: Mapping[str, Any]) -> Any:
    """The check that keeps a completion's text tokenizing back to its ids (so its row is the
    one sampled), unless ``any_tokenization`` or the tokenizer never round-trips plain text."""
    if options.get("any_tokenization"):
        return None
    if not fmt.round_trips():
        log.warning(
            "generate: this tokenizer does not give plain text back from its ids; completions "
            "are sampled without the tokenization check (rows that differ are scored again)"
        )
        return None
    return fmt.canonical


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def score_run(cfg: LMRunConfig, out: str | Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """``--score FILE``: the config's teacher over completions it did not write (``cfg`` from
    :func:`generate_config` with FILE), at ``distill.temperature``: a capture of FILE."""
    o = {k: v for k, v in options.items() if v is not None}
    _live_teacher(cfg)
    return capture_run(
        cfg, out, topk=o.get("topk", 32), encoding=o.get("encoding", "q8"),
        temperature=cfg.distill.temperature, shard_rows=o.get("shard_rows", 256),
        progress=bool(o.get("progress", True)), trust_code=bool(o.get("trust_code", False)),
    )  # fmt: skip


def generate_lines(manifest: Mapping[str, Any], out: Path, config: str) -> list[str]:
    """The summary ``kdkit lm generate`` prints, and the three ways to train on it."""
    from kdkit.lm.cache.gen_rows import Counts

    c = Counts.of(manifest["generate"]["counts"])
    cap, session = manifest["capture"], manifest.get("session")
    rate = ""
    if session:  # a run finished earlier has no session of its own
        rate = f" ({session['wall_s']:.1f} s here, {session['tokens_per_s']:,.0f} tok/s)"
    kept = f"{c.kept:,} completions ({c.kept_tokens:,} tokens) of {c.prompts:,} prompts"
    files = f"'data.text_files=[\"{out}/data/*.jsonl\"]'"
    tokenizer = f"student.tokenizer={out}/tokenizer"
    return [
        f"wrote {kept} into {out}{rate}",
        f"  samples {c.samples:,}: {c.unfinished:,} hit --max-new-tokens "
        f"({c.unfinished_dropped:,} dropped), {c.duplicates:,} duplicates dropped, "
        f"{c.skipped_prompts:,} prompts skipped (no room under data.max_length), "
        f"{c.redrawn:,} tokens drawn again (their text would tokenize otherwise), "
        f"{c.rescored:,} rows scored again",
        f"  completion lengths (tokens): {c.histogram()}",
        f"  targets: top-{cap['k']} at temperature {cap['temperature']:g} "
        f"(distill.temperature), {manifest['bytes_per_token']:.1f} bytes per token",
        "train on it (the same config):",
        f"  sequence-level KD: kdkit train {config} --set teacher=null --set {tokenizer} "
        f"--set {files}",
        f"  token-level KD:    kdkit train {config} --set teacher.model=cache:{out} --set {files}",
        f"  both:              ... --set teacher.model=cache:{out} --set distill.ce_weight=0.5",
    ]
