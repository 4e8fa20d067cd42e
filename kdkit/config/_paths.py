"""Absolute paths (a run directory is self-contained) and key-by-key comparison (resume)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.config._checks import looks_like_path
from kdkit.config._yaml import to_dict
from kdkit.config.lm_schema import LMModelConfig, LMRunConfig
from kdkit.config.schema import TEACHER_ONLY_PREFIXES, RunConfig, SourceConfig

__all__ = ["resolve_paths", "diff", "config_base", "ConfigBase"]

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
    if not isinstance(base, ConfigBase):
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


def _abs_glob(pattern: str, base: Path) -> str:
    path = Path(pattern).expanduser()
    return str(path if path.is_absolute() else Path(os.path.abspath(base / path)))


def _resolve_lm(cfg: LMRunConfig, base: Path) -> LMRunConfig:
    rep = dataclasses.replace

    def model(mc: LMModelConfig | None) -> LMModelConfig | None:
        if mc is None:
            return None
        prefix, _, path = mc.model.partition(":")
        return rep(mc, model=f"{prefix}:{_abs(path, base)}", tokenizer=_abs(mc.tokenizer, base))

    d = cfg.data
    val = d.val
    if val is not None and val.text_files:
        val = rep(val, text_files=tuple(_abs_glob(p, base) for p in val.text_files))
    return rep(
        cfg,
        student=model(cfg.student),
        teacher=model(cfg.teacher),
        data=rep(d, text_files=tuple(_abs_glob(p, base) for p in d.text_files), val=val),
        run_dir=_abs(cfg.run_dir or f"runs/{cfg.name}", base),
    )


def resolve_paths(cfg: RunConfig, base: str | os.PathLike | ConfigBase | None = None) -> RunConfig:
    """The same config with every file/folder path absolute (relative ones are taken from
    ``base``, default the working directory), so a run directory is self-contained.
    ``kdkit train CONFIG`` passes :func:`config_base` (the config file's folder)."""
    if not isinstance(base, ConfigBase):
        base = Path(base) if base is not None else Path.cwd()
    if isinstance(cfg, LMRunConfig):  # task: lm keeps the working directory's paths
        return _resolve_lm(cfg, _fallback(base))
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
        # the default runs/NAME is not a path in the config: the working directory's
        run_dir=_abs(cfg.run_dir, base) or _abs(f"runs/{cfg.name}", _fallback(base)),
    )


def _fallback(base: Path | ConfigBase) -> Path:
    return base.fallback if isinstance(base, ConfigBase) else base


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
    dotted keys such as ``train.progress`` that do not change the result)."""
    fa = _flatten({k: v for k, v in to_dict(a).items() if k not in ignore})
    fb = _flatten({k: v for k, v in to_dict(b).items() if k not in ignore})
    keys = sorted(k for k in set(fa) | set(fb) if k not in ignore)
    return {k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)}
