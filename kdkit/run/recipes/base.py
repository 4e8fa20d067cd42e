"""What a recipe is: the jobs one task owns at every front door, and what they hand back.

A :class:`Recipe` is one task's entry in :data:`kdkit.run.recipes.RECIPES`. ``kdkit train``
asks it to :meth:`~Recipe.build` the run and :meth:`~Recipe.report` on it; ``kdkit
precompute``, ``cache``, ``eval``, ``export``, ``predict``, ``bench`` and ``demo`` ask it for
theirs. The methods are thin: each calls the builders of its task (``run/data.py``,
``run/models.py``, ``run/lm_job.py``...), so a new task is one new entry and no front door
changes. A job a task does not have is a one-line :class:`~kdkit.errors.KDError` naming the
task and what to use instead (the base class's default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.errors import KDError

__all__ = ["Built", "Recipe", "RunResult", "check_demo_out", "default_cache_dir", "refuse_options"]


def default_cache_dir(cfg: Any) -> Path:
    """Where ``kdkit precompute CONFIG`` writes without ``--out``: beside the run directory."""
    return Path(f"{cfg.run_dir}-teacher-cache")


def check_demo_out(out: str | Path) -> None:
    """A demo's report folder, checked before the demo starts: writable, and never a run
    directory or a cache (the demo writes ``report.md`` and ``config.json`` into it)."""
    from kdkit._io import check_output_path

    check_output_path(out, what="--out", directory=True, makes="demo folder")


def refuse_options(options: Mapping[str, Any], names: Sequence[str], what: str) -> None:
    """A flag given (not None) that ``what`` does not take is an error, never ignored."""
    for name in names:
        if options.get(name) not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise KDError(f"{flag} does not apply to {what}; drop it")


@dataclass
class Built:
    """A run ready to train, written nowhere yet: the Trainer, its data, the ``auto`` choices
    measured on the first batch (for ``choices.json`` and the report) and the other files the
    run directory gets beside ``config.yaml`` (name -> text, e.g. ``classes.json``)."""

    trainer: Any
    data: Any
    choices: list[Any] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    """What a run reached: its best val score on the task's ``metric`` (``top1`` in percent for
    image runs, the lowest ``ppl`` for ``task: lm``) and the teacher's on the same data (None
    where there is no val data or no teacher to score)."""

    run_dir: Path
    history: list[dict[str, Any]]
    best_score: float | None
    teacher_score: float | None
    metric: str = "top1"

    # the names of the first release, when every run was an image run scored by top-1
    @property
    def best_top1(self) -> float | None:
        return self.best_score

    @best_top1.setter
    def best_top1(self, value: float | None) -> None:
        self.best_score = value

    @property
    def teacher_top1(self) -> float | None:
        return self.teacher_score

    @teacher_top1.setter
    def teacher_top1(self, value: float | None) -> None:
        self.teacher_score = value


class Recipe:
    """One task's jobs. Subclasses set :attr:`task` and override what the task has."""

    #: the ``task:`` value of its configs and checkpoints
    task: str = ""
    #: ``kdkit demo NAME``
    demo_name: str = ""
    #: what the CLI prints the scores as (``"best val top-1: 91.2%"``)
    metric_label: str = ""

    def _missing(self, job: str, instead: str = "") -> KDError:
        return KDError(
            f"{job} is not a job of task: {self.task} runs" + (f"; {instead}" if instead else "")
        )

    # -- kdkit train ------------------------------------------------------------------------
    def build(self, cfg: Any, *, resume: bool, trust_code: bool) -> Built:
        raise self._missing("kdkit train")

    def report(
        self, cfg: Any, built: Built, result: RunResult, *, wall_s: float, extended: dict
    ) -> None:
        """Fill ``result.teacher_score`` and write ``report.md``. Called on every rank (a
        sharded teacher is scored by all of them); rank 0 writes."""

    def summary(self, result: RunResult) -> list[str]:
        """The lines ``kdkit train`` ends with."""
        best = (
            "n/a (no val data)"
            if result.best_score is None
            else self.format_score(result.best_score)
        )
        teacher = (
            ""
            if result.teacher_score is None
            else f", teacher {self.format_score(result.teacher_score)}"
        )
        return [
            f"best val {self.metric_label}: {best}{teacher}",
            f"run directory:  {result.run_dir}",
        ]

    def format_score(self, value: float) -> str:
        return f"{value:g}"

    # -- kdkit precompute CONFIG / kdkit cache DIR ------------------------------------------
    def precompute(self, cfg: Any, out: Path | None, options: Mapping[str, Any]) -> list[str]:
        """Run the config's teacher over its training data once into a cache; returns the
        lines to print. ``options`` are the verb's flags (None where not given)."""
        raise self._missing("kdkit precompute")

    def generate(
        self, config: str, overrides: Sequence[str], options: Mapping[str, Any]
    ) -> list[str]:
        """``kdkit lm generate CONFIG``: the config's teacher writes completions and their
        targets (``--prompts``), or scores completions it did not write (``--score``)."""
        raise self._missing(
            "kdkit lm generate", "it samples from a language model teacher: a task: lm config"
        )

    def holds_cache(self, folder: Path) -> bool:
        """Is ``folder`` a cache of this task's format (read from its manifest file)?"""
        return False

    def cache_info(self, folder: Path) -> list[str]:
        raise self._missing("kdkit cache info")

    def cache_verify(self, folder: Path, options: Mapping[str, Any]) -> tuple[list[str], int]:
        raise self._missing("kdkit cache verify")

    def cache_check(self, target: Path, options: Mapping[str, Any]) -> tuple[list[str], int]:
        """``target``: a cache folder, or a config (its teacher against its cache)."""
        raise self._missing("kdkit cache check")

    # -- kdkit eval / export / predict / bench RUN -----------------------------------------
    def evaluate(
        self,
        checkpoint: Path,
        meta: Mapping[str, Any],
        *,
        device: str | None,
        data: Sequence[str],
        teacher: bool,
        trust_code: bool,
    ) -> dict[str, dict[str, float]]:
        """Scores of the checkpoint's student (and, with ``teacher``, its teacher) on the
        run's val data, or on the data ``--data`` names."""
        raise self._missing("kdkit eval")

    def score_lines(self, scores: Mapping[str, Mapping[str, float]]) -> list[str]:
        return [f"{who + ':':9} {dict(s)}" for who, s in scores.items()]

    def export(self, checkpoint: str, options: Mapping[str, Any]) -> list[str]:
        raise self._missing("kdkit export")

    def predict(self, model: str, options: Mapping[str, Any]) -> Any:
        raise self._missing("kdkit predict")

    def bench_models(self, run: str, *, trust_code: bool) -> tuple[Any, str, Any]:
        """``(teacher, student checkpoint, input_shape)`` of a run, for ``kdkit bench RUN``."""
        raise self._missing("kdkit bench RUN")

    # -- kdkit demo -------------------------------------------------------------------------
    def demo(self, options: Mapping[str, Any]) -> Path:
        """Run the task's demo; returns the path of its Markdown report."""
        raise self._missing("kdkit demo")
