"""One recipe per task, in one table: every front door dispatches through it.

``kdkit train``, ``precompute``, ``cache``, ``eval``, ``export``, ``predict``, ``bench`` and
``demo`` look up the recipe of what they were given (a config's ``task:``, the task a
checkpoint's config records, a cache folder's format) and call its job; none of them branches
on the task. The config side of the same table (schema, checks, path rule) is
:data:`kdkit.config.SCHEMAS`. A new task (dense prediction, say) is one entry in each.

=========  =================================  ===========================================
task       recipe                             builders it calls
=========  =================================  ===========================================
classify   :class:`ClassifyRecipe`            ``run/classify_job.py``, ``cache_job.py``,
                                              ``evaluate.py``, ``export_run.py``, ``predict.py``,
                                              ``vision_demo.py``
lm         :class:`LMRecipe`                  ``run/lm_job.py``, ``lm_tools.py``,
                                              ``lm_report.py``, ``lm_demo.py``
=========  =================================  ===========================================
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdkit.errors import KDError, closest_names
from kdkit.run.recipes.base import Built, Recipe, RunResult
from kdkit.run.recipes.classify import ClassifyRecipe
from kdkit.run.recipes.lm import LMRecipe

__all__ = [
    "RECIPES",
    "Built",
    "ClassifyRecipe",
    "LMRecipe",
    "Recipe",
    "RunResult",
    "recipe_for",
    "recipe_for_cache",
    "recipe_for_run",
]

#: ``task:`` -> what every front door does for it
RECIPES: Mapping[str, Recipe] = {r.task: r for r in (ClassifyRecipe(), LMRecipe())}


def recipe_for(source: Any) -> Recipe:
    """The recipe of ``source``: a task name, a config (its ``task``), or a checkpoint's
    contents (the ``task`` of the config it records; a checkpoint without one, or with no
    config at all, is an image one)."""
    if isinstance(source, str):
        task = source
    elif isinstance(source, Mapping):
        task = (source.get("config") or {}).get("task", "classify")
    else:
        task = getattr(source, "task", "classify")
    if task not in RECIPES:
        close = closest_names(str(task), list(RECIPES), 1)
        raise KDError(f"no task {task!r}: kdkit knows {list(RECIPES)}; did you mean {close[0]!r}?")
    return RECIPES[task]


def recipe_for_cache(folder: str | Path) -> Recipe:
    """The recipe whose cache format ``folder`` holds (each recipe knows its manifest file)."""
    path = Path(folder)
    for recipe in RECIPES.values():
        if path.is_dir() and recipe.holds_cache(path):
            return recipe
    what = "is not a folder" if not path.is_dir() else "holds no meta.json or manifest.json"
    raise KDError(
        f"{path} is not a teacher cache: it {what} (kdkit precompute CONFIG writes one, for "
        "images or task: lm)"
    )


def recipe_for_run(path: str | Path) -> Recipe:
    """The recipe of a run directory (the ``task`` of its ``config.yaml``) or a kdkit
    checkpoint (the ``task`` of the config it records); any other file (an ``.onnx``) is an
    image model's. A path that does not exist is left to the recipe's job to refuse."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        from kdkit.config import read_yaml

        raw = read_yaml(path / "config.yaml")
        return recipe_for(
            (raw or {}).get("task", "classify") if isinstance(raw, Mapping) else "classify"
        )
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        from kdkit.load import load_checkpoint

        try:
            return recipe_for(load_checkpoint(path, map_location="cpu"))
        except KDError:  # not a kdkit checkpoint (a plain state dict): the image job says so
            return RECIPES["classify"]
    return RECIPES["classify"]
