"""From a validated config to a finished run: data, models, Trainer, run directory, report.

The layer above the library that every front door calls. One recipe per task
(:mod:`kdkit.run.recipes`: ``classify``, ``lm``) owns what differs: building, reporting,
precomputing a cache, evaluating and exporting a run. :mod:`~kdkit.run.job` is the one
``kdkit train`` job (run directory, resume, lock); the builders it and the recipes call each
have one job: :mod:`~kdkit.run.data` (loaders, views), :mod:`~kdkit.run.models` (teacher,
student, Distiller), :mod:`~kdkit.run.classify_job` and :mod:`~kdkit.run.lm_job` (a task's
Trainer), :mod:`~kdkit.run.cache_job` (an image cache from a config),
:mod:`~kdkit.run.evaluate` / :mod:`~kdkit.run.lm_tools` (``kdkit eval``).
"""

from kdkit._lazy import lazy_face

#: public name -> module that defines it (loaded on first use: ``kdkit cache info`` looks a
#: recipe up without importing torch)
_PUBLIC = {
    "RECIPES": "kdkit.run.recipes",
    "Recipe": "kdkit.run.recipes",
    "recipe_for": "kdkit.run.recipes",
    "RunResult": "kdkit.run.recipes",
    "build_trainer": "kdkit.run.job",
    "train_run": "kdkit.run.job",
}

__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_face(__name__, _PUBLIC)
