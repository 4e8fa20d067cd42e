"""The one typed schema of a distillation run: frozen dataclasses, YAML in, YAML out.

``kdkit train CONFIG.yaml`` reads a file of this shape (section and key names are the
contract; see README "kdkit train")::

    name: r50-to-r18
    teacher:  {model: "torchvision:resnet50", weights: teacher.pt}
    student:  {model: "torchvision:resnet18", kwargs: {num_classes: 10}}
    data:     {train: {image_folder: data/train}, val: {split: 0.1}, image_size: 224}
    distill:  {pairs: [{loss: soft_kl, args: {temperature: 4}}]}
    train:    {epochs: 30, optimizer: {name: AdamW, lr: 0.003}}

Why plain dataclasses (not OmegaConf / jsonargparse): the schema is ~15 small classes whose
type hints already say everything, the walk that maps YAML onto them is ~150 lines here, and
it gives the two messages users need (an unknown key with "did you mean", a wrong value
naming the key, what was expected and what was given) in one line each, with no new
dependency and no interpolation or YAML-as-code features to police.

:func:`parse_config` = read YAML -> apply ``--set`` overrides -> :func:`parse` (types);
:func:`load_resolved` = that -> :func:`resolve_paths` (from the config file's folder) ->
:func:`validate` (cross-field rules, names, paths), once. The task's schema, checks and path
rule come from one table (:data:`SCHEMAS`). Nothing here imports a model or builds one:
validation happens before any work, and the builders trust the validated config.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from kdkit.config._checks import looks_like_path
from kdkit.config._paths import ConfigBase, config_base, diff
from kdkit.config._tasks import SCHEMAS, TASKS, parse, resolve_paths, schema_for, validate
from kdkit.config._yaml import apply_overrides, build_section, read_yaml, to_dict, to_yaml
from kdkit.config.lm_schema import (
    LMCrossTokenizerConfig,
    LMDataConfig,
    LMDatasetConfig,
    LMDistillConfig,
    LMLayerPairConfig,
    LMModelConfig,
    LMOnPolicyConfig,
    LMPeftConfig,
    LMRunConfig,
    LMServedConfig,
    LMValConfig,
)
from kdkit.config.schema import (
    MODEL_PREFIXES,
    TEACHER_ONLY_PREFIXES,
    CalibrationConfig,
    DataConfig,
    DistillConfig,
    OptimizerConfig,
    PairConfig,
    RunConfig,
    SchedulerConfig,
    SourceConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    ViewsConfig,
    ZeroShotConfig,
)
from kdkit.errors import KDError

__all__ = [
    "LMRunConfig",
    "LMModelConfig",
    "LMDataConfig",
    "LMDatasetConfig",
    "LMValConfig",
    "LMDistillConfig",
    "LMOnPolicyConfig",
    "LMCrossTokenizerConfig",
    "LMServedConfig",
    "LMLayerPairConfig",
    "LMPeftConfig",
    "RunConfig",
    "TeacherConfig",
    "StudentConfig",
    "ZeroShotConfig",
    "CalibrationConfig",
    "SourceConfig",
    "ViewsConfig",
    "DataConfig",
    "PairConfig",
    "DistillConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainConfig",
    "MODEL_PREFIXES",
    "TEACHER_ONLY_PREFIXES",
    "SCHEMAS",
    "TASKS",
    "schema_for",
    "load_config",
    "parse_config",
    "parse",
    "build_section",
    "validate",
    "apply_overrides",
    "to_dict",
    "to_yaml",
    "read_yaml",
    "diff",
    "resolve_paths",
    "config_base",
    "ConfigBase",
    "looks_like_path",
    "load_resolved",
]


def parse_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *, data: Any = None
) -> RunConfig | LMRunConfig:
    """YAML file (or already parsed ``data``) + ``--set`` overrides -> typed config: types and
    value ranges only, not yet validated (:func:`validate`) nor its paths resolved."""
    raw = read_yaml(path) if path is not None else data
    return parse(apply_overrides(raw, overrides))


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    data: Any = None,
    check_paths: bool = True,
) -> RunConfig | LMRunConfig:
    """YAML file (or already parsed ``data``) + ``--set`` overrides -> validated config (its
    relative paths as written; :func:`load_resolved` reads them from the file's folder)."""
    return validate(parse_config(path, overrides, data=data), check_paths=check_paths)


def load_resolved(
    path: str | os.PathLike, overrides: Sequence[str] = (), *, run_dir: str | None = None
) -> RunConfig | LMRunConfig:
    """A config file + ``--set`` overrides, its relative paths read from the file's folder
    (:func:`config_base`), then validated once with every path checked: what ``kdkit train
    CONFIG``, ``kdkit precompute CONFIG`` and ``kdkit cache check CONFIG`` run on.
    ``run_dir``: the ``--run-dir`` flag (relative to the working directory, like any
    command-line path)."""
    cfg = parse_config(path, overrides)
    if run_dir is not None:
        cfg = dataclasses.replace(cfg, run_dir=os.path.abspath(run_dir))
    base = config_base(path)
    cfg = resolve_paths(cfg, base)
    try:
        return validate(cfg)
    except KDError as err:
        text = str(err)
        if "no " in text and " at " in text:
            raise KDError(
                f"{err} (relative paths are read from the config's folder {base.folder})"
            ) from None
        raise
