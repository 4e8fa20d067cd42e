"""kdkit: knowledge distillation for PyTorch.

Train a small, fast student to match a large teacher, then ship the student::

    d = kdkit.Distiller(student, teacher, kdkit.SoftTargetKL(temperature=4.0))
    kdkit.Trainer(d, train_loader, val_loader, epochs=10).fit()
    student = d.export()

The names below are what a user imports; everything else lives in its subpackage
(``kdkit.data``, ``kdkit.teachers``, ``kdkit.cache``, ``kdkit.lm``, ``kdkit.bench``...). Other
tools' APIs (ModelOpt, darklight, Intel Distiller's flags) are in :mod:`kdkit.compat`. Names
load lazily (PEP 562): ``import kdkit`` costs neither torchvision nor the CLI, and optional
backends (ONNX Runtime, TensorRT, transformers) are imported only when used.
"""

from __future__ import annotations

from kdkit._lazy import lazy_face

__version__ = "0.1.0"

#: public name -> module that defines it
_PUBLIC = {
    # the core: a task (image KD), its pairs and balancer, the loop
    "Distiller": "kdkit.distiller",
    "Pair": "kdkit.pairs",
    "LossBalancer": "kdkit.balance",
    "Trainer": "kdkit.train.trainer",
    "LoopOptions": "kdkit.train.options",
    "KDError": "kdkit.errors",
    # the losses configs name
    "SoftTargetKL": "kdkit.losses",
    "HardLabel": "kdkit.losses",
    "DKD": "kdkit.losses",
    "FeatureMSE": "kdkit.losses",
    "CosineEmbedding": "kdkit.losses",
    "AttentionTransfer": "kdkit.losses",
    "MGD": "kdkit.losses",
    "RKD": "kdkit.losses",
    # teachers
    "make_teacher": "kdkit.teachers.factory",
    "Teacher": "kdkit.teachers.base",
    "TeacherOutput": "kdkit.teachers.base",
    # shipping the student
    "export_onnx": "kdkit.export",
    "load_model": "kdkit.load",
    "bench_model": "kdkit.bench",
}

#: names of earlier releases, still importable for one release (with a DeprecationWarning)
_MOVED = {
    "teacher": ("kdkit.teachers.factory", "teacher", "kdkit.make_teacher"),
    "TorchTeacher": ("kdkit.teachers", "TorchTeacher", "kdkit.teachers.TorchTeacher"),
    "OnnxTeacher": ("kdkit.teachers", "OnnxTeacher", "kdkit.teachers.OnnxTeacher"),
    "TensorRTTeacher": ("kdkit.teachers", "TensorRTTeacher", "kdkit.teachers.TensorRTTeacher"),
    "EnsembleTeacher": ("kdkit.teachers", "EnsembleTeacher", "kdkit.teachers.EnsembleTeacher"),
    "ClipTeacher": ("kdkit.teachers", "ClipTeacher", "kdkit.teachers.ClipTeacher"),
    "CachedTeacher": ("kdkit.cache", "CachedTeacher", "kdkit.cache.CachedTeacher"),
    "FastLoader": ("kdkit.data", "FastLoader", "kdkit.data.FastLoader"),
    "ViewSampler": ("kdkit.data", "ViewSampler", "kdkit.data.ViewSampler"),
    "ImageFolderManager": ("kdkit.data", "ImageFolderManager", "kdkit.data.ImageFolderManager"),
    "load_student": ("kdkit.load", "load_student", "kdkit.load_model(path, role='student')"),
    "StudentTrainer": ("kdkit.compat", "StudentTrainer", "kdkit.compat.StudentTrainer"),
    "add_distillation_args": (
        "kdkit.compat",
        "add_distillation_args",
        "kdkit.compat.add_distillation_args",
    ),
    "distillation_from_args": (
        "kdkit.compat",
        "distillation_from_args",
        "kdkit.compat.distillation_from_args",
    ),
}

#: subpackages and modules reachable as attributes (``import kdkit; kdkit.teachers.OnnxTeacher``)
_SUBMODULES = (
    "balance", "bench", "cache", "capture", "cli", "compat", "config", "data", "demo",
    "distiller", "errors", "export", "lm", "load", "losses", "metrics", "models", "pairs",
    "registry", "report", "run", "task", "teachers", "train",
)  # fmt: skip

__all__ = list(_PUBLIC)
__getattr__, _dir = lazy_face(__name__, _PUBLIC, submodules=_SUBMODULES, moved=_MOVED)


def __dir__() -> list[str]:
    return sorted([*_dir(), "__version__"])
