"""The config side of the task table: each ``task:`` value's schema, checks and path rule.

One entry per task, one lookup (:func:`schema_for`): parsing, validation and path resolution
read the table instead of branching on the task. The run side of the same table (how a task
builds, reports, caches, evaluates and exports) is :mod:`kdkit.run.recipes`; this half sits in
``config/`` so that reading and checking a config never imports the builders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kdkit.config._checks import check_classify, check_name
from kdkit.config._lm_checks import check_lm
from kdkit.config._paths import ConfigBase, as_base, resolve_classify_paths, resolve_lm_paths
from kdkit.config._yaml import build_section
from kdkit.config.lm_schema import LMRunConfig
from kdkit.config.schema import RunConfig
from kdkit.errors import KDError, closest_names

__all__ = ["SCHEMAS", "TASKS", "TaskSchema", "parse", "resolve_paths", "schema_for", "validate"]


@dataclass(frozen=True)
class TaskSchema:
    """What a task's config is: its dataclass, its cross-field checks (``check(cfg,
    check_paths)``), and its paths made absolute (``paths(cfg, base)``, one rule for all)."""

    config: type
    check: Callable[[Any, bool], None]
    paths: Callable[[Any, ConfigBase], Any]


#: ``task:`` -> its schema; a config without ``task:`` is ``classify``
SCHEMAS: Mapping[str, TaskSchema] = {
    "classify": TaskSchema(RunConfig, check_classify, resolve_classify_paths),
    "lm": TaskSchema(LMRunConfig, check_lm, resolve_lm_paths),
}
TASKS = tuple(SCHEMAS)


def schema_for(task: Any) -> TaskSchema:
    """The table entry of ``task`` (a ``task:`` value, or a parsed config)."""
    name = getattr(task, "task", task)
    if name not in SCHEMAS:
        close = closest_names(str(name), TASKS, 1)
        raise KDError(
            f"config key 'task' expects one of {list(TASKS)}, got {name!r}; did you mean "
            f"{close[0]!r}?"
        )
    return SCHEMAS[name]


def parse(data: Any) -> RunConfig | LMRunConfig:
    """Map plain data (parsed YAML) onto the ``task:``'s config class (:class:`RunConfig`
    without one): types and value ranges only."""
    data = data if data is not None else {}
    task = data.get("task", "classify") if isinstance(data, Mapping) else "classify"
    return build_section(schema_for(task).config, data, "")


def validate(cfg: RunConfig | LMRunConfig, *, check_paths: bool = True) -> RunConfig:
    """Cross-field rules, names, and (``check_paths``) that every file and folder the config
    names exists; returns ``cfg``. Imports torch and kdkit.losses, builds nothing."""
    check_name(cfg.name)
    schema_for(cfg).check(cfg, check_paths)
    return cfg


def resolve_paths(cfg: RunConfig | LMRunConfig, base: Any = None) -> RunConfig:
    """The same config with every file/folder path absolute, read from ``base``: a
    :class:`ConfigBase` (``kdkit train CONFIG`` passes :func:`~kdkit.config.config_base`, the
    config file's folder with the working directory as fallback), or a folder (default: the
    working directory)."""
    return schema_for(cfg).paths(cfg, as_base(base))
