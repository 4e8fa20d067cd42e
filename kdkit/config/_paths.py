"""Absolute paths (a run directory is self-contained) and key-by-key comparison (resume)."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.config._checks import looks_like_path
from kdkit.config._yaml import to_dict
from kdkit.config.lm_schema import CHAT_TEMPLATE_NAMES, LMModelConfig, LMRunConfig
from kdkit.config.schema import TEACHER_ONLY_PREFIXES, RunConfig, SourceConfig

__all__ = [
    "ConfigBase",
    "as_base",
    "config_base",
    "diff",
    "resolve_classify_paths",
    "resolve_lm_paths",
]

log = logging.getLogger(__name__)

# -- paths, comparison, loading ------------------------------------------------------------


@dataclass(frozen=True)
class ConfigBase:
    """Where the relative paths of a config file are read from: its ``folder``; an input
    found only under ``fallback`` (the working directory, where configs written before this
    rule were read from) is taken from there, with a warning."""

    folder: Path
    fallback: Path


def _abs(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    given = Path(path).expanduser()
    if not isinstance(base, ConfigBase):  # a plain folder: the default run directory's
        return str((base / given).resolve())
    here = Path(os.path.abspath(base.folder / given)).resolve()  # "..": the folder as given
    if not given.is_absolute() and not here.exists():
        there = Path(os.path.abspath(base.fallback / given)).resolve()
        if there.exists():
            log.warning(
                "%s: not in the config file's folder %s, found in the working directory; "
                "relative paths are read from the config's folder: write %s",
                path,
                base.folder,
                there,
            )
            return str(there)
    return str(here)


def config_base(config_file: str | os.PathLike, fallback: str | os.PathLike | None = None):
    """The base of :func:`resolve_paths` for a config file: its folder, and ``fallback``
    (default: the working directory) for inputs found only there."""
    folder = Path(os.path.abspath(Path(config_file).expanduser().parent))
    return ConfigBase(folder, Path(fallback) if fallback is not None else Path.cwd())


def _abs_model(model: str, base: Path) -> str:
    prefix, sep, rest = model.partition(":")
    if sep and prefix in TEACHER_ONLY_PREFIXES:
        return f"{prefix}:{_abs(rest, base)}"
    if looks_like_path(model):
        return _abs(model, base)
    return model


def _abs_glob(pattern: str, base: ConfigBase) -> str:
    """A glob of text files: from the config's folder, or (matching nothing there, and files
    in the working directory) from the working directory, with the same warning as a path."""
    path = Path(pattern).expanduser()
    if path.is_absolute():
        return str(path)
    here = str(Path(os.path.abspath(base.folder / path)))
    if not glob.glob(here, recursive=True):
        there = str(Path(os.path.abspath(base.fallback / path)))
        if glob.glob(there, recursive=True):
            log.warning(
                "%s: matches nothing in the config file's folder %s, files in the working "
                "directory; relative paths are read from the config's folder: write %s",
                pattern,
                base.folder,
                there,
            )
            return there
    return here


def resolve_lm_paths(cfg: LMRunConfig, base: ConfigBase) -> LMRunConfig:
    """The ``task: lm`` config with its model folders, tokenizers, text globs and run
    directory absolute (the same rule as every task: see :func:`resolve_classify_paths`)."""
    rep = dataclasses.replace

    def model(mc: LMModelConfig | None) -> LMModelConfig | None:
        if mc is None:
            return None
        prefix, _, path = mc.model.partition(":")
        if prefix in ("http", "https"):  # a served teacher: an address, not a path
            return rep(mc, tokenizer=_abs(mc.tokenizer, base))
        return rep(mc, model=f"{prefix}:{_abs(path, base)}", tokenizer=_abs(mc.tokenizer, base))

    d = cfg.data
    val = d.val
    if val is not None and val.text_files:
        val = rep(val, text_files=tuple(_abs_glob(p, base) for p in val.text_files))
    dataset = d.dataset if d.dataset is None else rep(d.dataset, path=_abs(d.dataset.path, base))
    template = d.chat_template
    if template is not None and template not in CHAT_TEMPLATE_NAMES:
        template = _abs(template, base)
    files = tuple(_abs_glob(p, base) for p in d.text_files)
    return rep(
        cfg,
        student=model(cfg.student),
        teacher=model(cfg.teacher),
        data=rep(d, text_files=files, val=val, dataset=dataset, chat_template=template),
        run_dir=_run_dir(cfg, base),
    )


def resolve_classify_paths(cfg: RunConfig, base: ConfigBase) -> RunConfig:
    """The same config with every file/folder path absolute, so a run directory is
    self-contained. The rule, for every task: a relative path is read from ``base.folder``
    (the config file's folder); an input found only under ``base.fallback`` (the working
    directory) is taken from there with a warning; an explicit ``run_dir`` is relative to the
    config's folder, the default ``runs/NAME`` to the working directory."""
    rep = dataclasses.replace
    t, s, d = cfg.teacher, cfg.student, cfg.data

    def src(x: SourceConfig | None) -> SourceConfig | None:
        if x is None:
            return None
        return rep(x, image_folder=_abs(x.image_folder, base), root=_abs(x.root, base))

    if t is not None:
        t = rep(
            t,
            model=_abs_model(t.model, base),
            weights=_abs(t.weights, base),
            probe=_abs(t.probe, base),
        )
    return rep(
        cfg,
        teacher=t,
        student=rep(s, model=_abs_model(s.model, base), weights=_abs(s.weights, base)),
        data=rep(
            d,
            train=src(d.train),
            val=src(d.val),
            unlabeled=tuple(_abs(u, base) for u in d.unlabeled),
        ),
        run_dir=_run_dir(cfg, base),
    )


def _run_dir(cfg: RunConfig | LMRunConfig, base: ConfigBase) -> str:
    # the default runs/NAME is not a path in the config: the working directory's
    return _abs(cfg.run_dir, base) or _abs(f"runs/{cfg.name}", base.fallback)


def as_base(base: str | os.PathLike | ConfigBase | None) -> ConfigBase:
    """A :class:`ConfigBase`; a plain folder (default: the working directory) is both the
    folder and the fallback (Python callers resolving a config they built in memory)."""
    if isinstance(base, ConfigBase):
        return base
    folder = Path(base) if base is not None else Path.cwd()
    return ConfigBase(folder, folder)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj:
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: obj}


def diff(a: RunConfig, b: RunConfig, ignore: Sequence[str] = ("versions",)) -> dict[str, tuple]:
    """Keys whose values differ: ``{"train.epochs": (3, 4)}`` (``ignore``: top-level keys, or
    dotted keys such as ``train.progress`` that do not change the result). ``a`` and ``b`` are
    configs or their plain data (a checkpoint's); a config saved before ``task:`` was written
    out is a ``classify`` one."""

    def flat(cfg: Any) -> dict[str, Any]:
        data = {"task": "classify", **to_dict(cfg)}
        return _flatten({k: v for k, v in data.items() if k not in ignore})

    fa, fb = flat(a), flat(b)
    keys = sorted(k for k in set(fa) | set(fb) if k not in ignore)
    return {k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)}
