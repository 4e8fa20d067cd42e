"""kdkit: knowledge distillation for PyTorch.

Train a small, fast student to match a large teacher, then ship the student::

    d = kdkit.Distiller(student, teacher, kdkit.SoftTargetKL(temperature=4.0))
    kdkit.Trainer(d, train_loader, val_loader, epochs=10).fit()
    student = d.export()

The names below are what a user imports; everything else lives in its subpackage
(``kdkit.data``, ``kdkit.teachers``, ``kdkit.cache``, ``kdkit.bench``...). Other tools' APIs
(ModelOpt, darklight, Intel Distiller's flags) are in :mod:`kdkit.compat`. Optional backends
(ONNX Runtime, TensorRT) are imported only when used.
"""

from kdkit.balance import LossBalancer
from kdkit.bench import bench_model
from kdkit.cache import CachedTeacher
from kdkit.compat import StudentTrainer, add_distillation_args, distillation_from_args
from kdkit.data import FastLoader, ImageFolderManager, ViewSampler
from kdkit.distiller import Distiller
from kdkit.errors import KDError
from kdkit.export import export_onnx
from kdkit.load import load_model, load_student
from kdkit.losses import (
    DKD,
    MGD,
    RKD,
    AttentionTransfer,
    CosineEmbedding,
    FeatureMSE,
    HardLabel,
    SoftTargetKL,
)
from kdkit.teachers import (
    ClipTeacher,
    EnsembleTeacher,
    OnnxTeacher,
    Teacher,
    TeacherOutput,
    TensorRTTeacher,
    TorchTeacher,
    teacher,
)
from kdkit.train import Trainer

__version__ = "0.1.0"

__all__ = [
    # the core: a distiller, its losses and balancer, the loop
    "Distiller",
    "LossBalancer",
    "Trainer",
    "KDError",
    "SoftTargetKL",
    "HardLabel",
    "DKD",
    "FeatureMSE",
    "CosineEmbedding",
    "AttentionTransfer",
    "MGD",
    "RKD",
    # teachers
    "teacher",
    "Teacher",
    "TeacherOutput",
    "TorchTeacher",
    "OnnxTeacher",
    "TensorRTTeacher",
    "EnsembleTeacher",
    "ClipTeacher",
    "CachedTeacher",
    # data
    "FastLoader",
    "ViewSampler",
    "ImageFolderManager",
    # shipping the student
    "export_onnx",
    "bench_model",
    "load_model",
    "load_student",
    # other tools' entry points (kdkit.compat)
    "StudentTrainer",
    "add_distillation_args",
    "distillation_from_args",
]
