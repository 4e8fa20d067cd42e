"""From a validated config to a finished run: data, models, Trainer, run directory, report.

The layer above the library that ``kdkit train`` / ``kdkit eval`` call; each module has one
job: :mod:`~kdkit.run.data` (loaders), :mod:`~kdkit.run.models` (teacher, student,
Distiller), :mod:`~kdkit.run.job` (Trainer, run directory, resume, report),
:mod:`~kdkit.run.evaluate` (top-1 / top-5 / loss).
"""

from kdkit.run.job import RunResult, build_trainer, train_run

__all__ = ["RunResult", "build_trainer", "train_run"]
