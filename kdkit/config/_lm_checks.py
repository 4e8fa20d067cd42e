"""The ``task: lm`` rules a type cannot say: model strings and folders (``hf:``, ``hf-config:``,
``cache:``, a served teacher's ``http://HOST:PORT``), the text globs and the val source,
``loss_on`` against ``format``, and ``distill.on_policy``. The ``train:`` section is checked as
for every task."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kdkit.config._checks import check_path, check_train_section
from kdkit.config.lm_schema import CHAT_TEMPLATE_NAMES, LM_PREFIXES, LMModelConfig, LMRunConfig
from kdkit.errors import KDError, closest_names

__all__ = ["check_lm"]


def _served(mc: LMModelConfig, key: str) -> bool:
    """A teacher at ``http(s)://HOST:PORT`` (True), checked; False for any other model string."""
    if not mc.model.startswith(("http://", "https://")):
        if mc.served is not None:
            raise KDError(
                f"config key '{key}.served' applies to a served teacher (model: "
                f"'http://HOST:PORT'), got model {mc.model!r}"
            )
        return False
    if key != "teacher":
        raise KDError(f"config key '{key}.model': only the teacher can be served, got {mc.model!r}")
    try:
        url = urlsplit(mc.model)
        port = url.port
    except ValueError:
        url, port = None, None
    if (
        url is None
        or not url.hostname
        or port is None
        or url.path not in ("", "/")
        or (url.query or url.fragment or url.username or url.password)
    ):
        raise KDError(
            f"config key 'teacher.model' expects 'http://HOST:PORT' (kdkit lm serve, or vLLM), "
            f"with no path, user or query, got {mc.model!r}"
        )
    if (mc.backend, mc.precision) != ("torch", "fp32") or mc.dtype or mc.tokenizer:
        raise KDError(
            "config key 'teacher.backend' / 'precision' / 'dtype' / 'tokenizer': a served "
            "teacher's engine, dtype and tokenizer are chosen where it runs (kdkit lm serve "
            "--backend onnx --precision int8 ...); drop the key"
        )
    return True


def _lm_model(mc: LMModelConfig, key: str, check_paths: bool) -> None:
    if _served(mc, key):
        return
    prefix, sep, path = mc.model.partition(":")
    if key == "teacher" and mc.peft is not None:
        raise KDError("config key 'teacher.peft': LoRA adapters train a student; drop the key")
    if key == "teacher" and prefix == "cache" and path:  # a kdkit lm capture folder
        if (mc.backend, mc.precision) != ("torch", "fp32") or mc.dtype not in (None, "float32"):
            raise KDError(
                "config key 'teacher.backend' / 'precision' / 'dtype': a cache:DIR teacher is "
                "never run (its log-probs are on disk); drop the key, or capture with that "
                "teacher (kdkit lm capture)"
            )
        if check_paths and not (Path(path).expanduser() / "manifest.json").is_file():
            raise KDError(
                f"config key 'teacher.model': {path} is not an LM teacher cache (no "
                "manifest.json); make one with kdkit lm capture CONFIG.yaml --out DIR"
            )
        return
    if not sep or prefix not in LM_PREFIXES or not path:
        close = closest_names(prefix, LM_PREFIXES, 1)
        raise KDError(
            f"config key '{key}.model' expects 'hf:DIR' (a save_pretrained folder) or "
            f"'hf-config:DIR' (random init from its config.json)"
            + (
                " or 'cache:DIR' (a kdkit lm capture) or 'http://HOST:PORT' (kdkit lm serve)"
                if key == "teacher"
                else ""
            )
            + f", got {mc.model!r}"
            + (f"; did you mean '{close[0]}:{path}'?" if sep and close else "")
        )
    if key == "teacher" and prefix == "hf-config":
        raise KDError(
            f"config key 'teacher.model': {mc.model!r} builds a randomly initialised model from "
            "its config.json; a teacher must have weights: use 'hf:DIR' (a save_pretrained "
            "folder with its weights) or 'cache:DIR'"
        )
    if mc.dtype not in (None, "float32", "bfloat16", "float16"):
        raise KDError(
            f"config key '{key}.dtype' expects float32, bfloat16 or float16, got {mc.dtype!r}"
        )
    if key != "teacher" and (mc.backend, mc.precision) != ("torch", "fp32"):
        raise KDError(
            f"config key '{key}.backend' / '{key}.precision' applies to the teacher only; "
            f"the {key} trains in PyTorch (drop the key, or use {key}.dtype)"
        )
    if (mc.backend == "onnx" or mc.precision == "int8") and mc.dtype not in (None, "float32"):
        raise KDError(
            f"config key '{key}.dtype': the ONNX Runtime teacher (backend: onnx / precision: "
            f"int8) is exported from float32 weights, got dtype {mc.dtype!r}"
        )
    if check_paths:
        if not (Path(path).expanduser() / "config.json").is_file():
            raise KDError(
                f"config key '{key}.model': {path} has no config.json (not a model folder)"
            )
        check_path(mc.tokenizer, f"{key}.tokenizer", folder=True)


def _globs_match(patterns: tuple[str, ...], key: str) -> dict[str, str]:
    """``{real path: the path a pattern matched}`` of every file the patterns match."""
    files: dict[str, str] = {}
    for i, pattern in enumerate(patterns):
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches:
            raise KDError(f"config key '{key}.{i}': no file matches {pattern!r}")
        for match in matches:
            if os.path.isfile(match):
                files.setdefault(os.path.realpath(match), match)
    return files


def _check_data_paths(d: Any) -> None:
    """``data.dataset.path`` exists on disk (a Hub name is never downloaded), and a
    ``data.chat_template`` that is not a name kdkit ships is a file."""
    if d.dataset is not None and not Path(d.dataset.path).exists():
        name = "/".join(Path(d.dataset.path).parts[-2:])
        raise KDError(
            f"config key 'data.dataset.path': {d.dataset.path} is not a file or folder here; "
            f"kdkit reads datasets from disk and never downloads (a Hub name such as {name!r}: "
            "datasets.load_dataset(NAME).save_to_disk(DIR) where there is a network, then "
            "path: DIR)"
        )
    template = d.chat_template
    if template is not None and template not in CHAT_TEMPLATE_NAMES:
        if not Path(template).is_file():
            raise KDError(
                f"config key 'data.chat_template': {template} is neither a template kdkit ships "
                f"({', '.join(CHAT_TEMPLATE_NAMES)}) nor a file (a Jinja chat template)"
            )


def _check_on_policy(cfg: LMRunConfig) -> None:
    """``distill.on_policy`` with ``lambda > 0`` (:mod:`kdkit.lm.onpolicy`): a live teacher
    scores the student's samples, the prompt ends where the trained tokens begin, and the
    rows are regenerated one document each, the same forwards on every rank."""
    op = cfg.distill.on_policy
    if op is None or op.lam == 0:
        return
    key = "config key 'distill.on_policy'"
    if cfg.teacher is None:
        raise KDError(f"{key} needs a teacher to score the student's samples; set teacher.model")
    if cfg.teacher.model.startswith("cache:"):
        raise KDError(
            f"{key}: a teacher cache (teacher.model {cfg.teacher.model!r}) holds scores of the "
            "corpus' tokens only and cannot score new samples; use a live teacher (hf:DIR) or "
            "on_policy.lambda: 0"
        )
    d = cfg.data
    if d.format not in ("prompt_completion", "chat"):
        raise KDError(
            f"{key} needs data.format prompt_completion or chat (the student regenerates the "
            f"completions), got {d.format!r}"
        )
    if d.loss_on == "all":
        raise KDError(
            f"{key} needs data.loss_on {'completion' if d.format != 'chat' else 'assistant'}: "
            "the prompt ends where the trained tokens begin (loss_on all trains the prompt too)"
        )
    if d.pack:
        raise KDError(
            f"{key} needs data.pack: false (a packed row's documents cannot be regenerated "
            "in place)"
        )
    if cfg.train.fsdp:
        raise KDError(
            f"{key} does not run with train.fsdp: true (each rank samples completions of its own "
            "length; FSDP needs the same forwards on every rank); use DDP (torchrun, no fsdp)"
        )


def _check_served(cfg: LMRunConfig) -> None:
    """What a served teacher can give: no corpus prior, and vLLM's log-probs at T = 1 only."""
    t, dc = cfg.teacher, cfg.distill
    if t is None or not t.model.startswith(("http://", "https://")):
        return
    served = t.served
    if dc.tail == "prior":
        raise KDError(
            "config key 'distill.tail': 'prior' spreads the tail over the teacher's mean "
            "distribution over a captured corpus, which a served teacher does not have; use "
            "bucket, renorm, uniform or drop (or capture a cache: kdkit lm capture)"
        )
    if dc.tail == "label":
        raise KDError(
            "config key 'distill.tail': 'label' reads the text's next token beside the cached "
            "top k; a served teacher's targets come without it: use bucket, renorm, uniform "
            "or drop (or capture a cache: kdkit lm capture)"
        )
    if served is not None and served.protocol == "vllm" and dc.temperature != 1.0:
        if dc.tail != "renorm":
            raise KDError(
                f"config key 'distill.temperature': vLLM's prompt log-probs are at temperature "
                f"1 (it applies no temperature to them), so {dc.temperature:g} is exact only "
                "with distill.tail: renorm; or serve with kdkit lm serve (protocol: kdkit)"
            )


def _check_cross_tokenizer(cfg: LMRunConfig) -> None:
    """``distill.cross_tokenizer``: a live or cached teacher, off-policy, a divergence that a
    projection keeps finite. (Whether the tokenizers differ is known once they are loaded.)"""
    xt, dc = cfg.distill.cross_tokenizer, cfg.distill
    if xt is None:
        return
    key = "config key 'distill.cross_tokenizer'"
    if cfg.teacher is None:
        raise KDError(f"{key} needs a teacher (teacher.model) whose tokenizer differs")
    if cfg.teacher.model.startswith(("http://", "https://")):
        raise KDError(
            f"{key}: a served teacher scores the student's own tokens; serve a teacher of the "
            "student's tokenizer, or use teacher.model hf:DIR / cache:DIR"
        )
    if dc.on_policy is not None and dc.on_policy.lam > 0:
        raise KDError(f"{key} runs off-policy only; set distill.on_policy.lambda: 0")
    if dc.divergence == "rkl" and xt.method != "uld":
        raise KDError(
            f"{key}: method {xt.method!r} leaves student tokens with zero teacher mass, where "
            "divergence rkl is infinite; use fkl, jsd, skew_rkl or tvd (or method: uld)"
        )
    if cfg.train.fsdp:
        raise KDError(f"{key} does not run with train.fsdp: true yet; use one process or DDP")
    if dc.pairs:
        raise KDError(
            f"{key}: distill.pairs compares hidden states position by position, which two "
            "tokenizations do not share; drop distill.pairs"
        )


def check_lm(cfg: LMRunConfig, check_paths: bool = True) -> None:
    """The ``task: lm`` rules: model strings and folders, text globs, the val source, that
    ``loss_on`` fits ``format``, and ``distill.on_policy``; the train section as for every task."""
    _lm_model(cfg.student, "student", check_paths)
    _check_on_policy(cfg)
    _check_served(cfg)
    _check_cross_tokenizer(cfg)
    if cfg.distill.pairs:
        t = cfg.teacher
        live = t is not None and not t.model.startswith(("cache:", "http://", "https://"))
        if not live or (t.backend, t.precision) != ("torch", "fp32"):
            raise KDError(
                "config key 'distill.pairs' pairs decoder layers of a live PyTorch teacher "
                "(teacher.model hf:DIR, backend torch, precision fp32): a cache, a served "
                "teacher or an ONNX Runtime teacher has no layers to read"
            )
        if cfg.train.fsdp:
            raise KDError("config key 'distill.pairs' does not run with train.fsdp: true yet")
    if cfg.teacher is not None:
        _lm_model(cfg.teacher, "teacher", check_paths)
        t = cfg.teacher
        if cfg.train.fsdp and (t.backend, t.precision) != ("torch", "fp32"):
            raise KDError(
                "config key 'teacher.backend': an ONNX Runtime teacher cannot be sharded "
                "(train.fsdp: true); use backend: torch, precision: fp32 with FSDP"
            )
    d = cfg.data
    if not d.text_files and d.dataset is None:
        raise KDError(
            "config key 'data.text_files' is empty: name at least one file or glob (or give "
            "data.dataset: {path: DIR_OR_FILE} instead)"
        )
    if d.text_files and d.dataset is not None:
        raise KDError("config key 'data': give text_files or dataset, not both")
    if d.chat_template is not None and d.format != "chat":
        raise KDError(
            f"config key 'data.chat_template' renders conversations (format chat); this "
            f"config's data.format is {d.format!r}"
        )
    needs = {"completion": "prompt_completion", "assistant": "chat"}
    if d.loss_on in needs and d.format != needs[d.loss_on]:
        raise KDError(
            f"config key 'data.loss_on': {d.loss_on!r} needs data.format "
            f"{needs[d.loss_on]!r}, got {d.format!r}"
        )
    if d.truncation is not None and d.format == "text":
        raise KDError(
            "config key 'data.truncation' applies to format prompt_completion and chat; plain "
            "text uses data.overflow (split | truncate)"
        )
    if d.val is not None and (d.val.text_files is None) == (d.val.split is None):
        raise KDError("config key 'data.val' takes one of text_files: [...] or split: F")
    check_train_section(cfg.train)
    if check_paths:
        _check_data_paths(d)
        train = _globs_match(d.text_files, "data.text_files")
        if d.val is not None and d.val.text_files:
            val = _globs_match(d.val.text_files, "data.val.text_files")
            both = sorted(set(train) & set(val))
            if both:
                raise KDError(
                    f"config key 'data.val.text_files': {val[both[0]]} is also matched by "
                    f"data.text_files ({len(both)} file(s) in both), so the student would be "
                    "scored on text it trained on; take it out of the training globs (or use "
                    "val: {split: F})"
                )
