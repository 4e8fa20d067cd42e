"""Absolute paths (a run directory is self-contained) and key-by-key comparison (resume)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdkit.config._checks import looks_like_path
from kdkit.config._yaml import to_dict
from kdkit.config.lm_schema import LMModelConfig, LMRunConfig
from kdkit.config.schema import TEACHER_ONLY_PREFIXES, RunConfig, SourceConfig

__all__ = ["resolve_paths", "diff"]

# -- paths, comparison, loading ------------------------------------------------------------


def _abs(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    return str((base / Path(path).expanduser()).resolve())


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


def resolve_paths(cfg: RunConfig, base: str | os.PathLike | None = None) -> RunConfig:
    """The same config with every file/folder path absolute (relative ones are taken from
    ``base``, default the working directory), so a run directory is self-contained."""
    base = Path(base) if base is not None else Path.cwd()
    if isinstance(cfg, LMRunConfig):
        return _resolve_lm(cfg, base)
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
        run_dir=_abs(cfg.run_dir or f"runs/{cfg.name}", base),
    )


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
