"""kdkit: knowledge distillation for PyTorch.

Train a small, fast student to match a large teacher, then ship the student::

    d = kdkit.Distiller(student, teacher, kdkit.SoftTargetKL(temperature=4.0))
    kdkit.Trainer(d, train_loader, val_loader, epochs=10).fit()
    student = d.export()

Optional backends (ONNX Runtime, TensorRT) are imported only when used.
"""

from kdkit.args import KDPolicy, add_distillation_args, distillation_from_args
from kdkit.balance import LossBalancer
from kdkit.bench import BenchResult, bench_model, compare, plot_comparison
from kdkit.cache import CachedTeacher
from kdkit.capture import Capture, capture
from kdkit.data import FastLoader, ImageFolderManager, ImageNetManager, ViewSampler
from kdkit.distiller import Distiller, PairInfo, PairTable
from kdkit.errors import KDError
from kdkit.export import ExportReport, export_onnx, load_student
from kdkit.losses import (
    DKD,
    RKD,
    AttentionTransfer,
    CosineEmbedding,
    FeatureMSE,
    HardLabel,
    SoftTargetKL,
)
from kdkit.teachers import (
    EnsembleTeacher,
    OnnxTeacher,
    Teacher,
    TeacherOutput,
    TensorRTTeacher,
    TopK,
    TorchTeacher,
    teacher,
)
from kdkit.train import StepOutput, StudentTrainer, Trainer

__version__ = "0.1.0"

__all__ = [
    "KDError",
    "Distiller",
    "PairInfo",
    "PairTable",
    "LossBalancer",
    "Capture",
    "capture",
    "add_distillation_args",
    "distillation_from_args",
    "KDPolicy",
    "SoftTargetKL",
    "HardLabel",
    "DKD",
    "FeatureMSE",
    "CosineEmbedding",
    "AttentionTransfer",
    "RKD",
    "Teacher",
    "TeacherOutput",
    "TopK",
    "TorchTeacher",
    "OnnxTeacher",
    "TensorRTTeacher",
    "EnsembleTeacher",
    "CachedTeacher",
    "teacher",
    "FastLoader",
    "ViewSampler",
    "ImageFolderManager",
    "ImageNetManager",
    "export_onnx",
    "ExportReport",
    "load_student",
    "bench_model",
    "BenchResult",
    "compare",
    "plot_comparison",
    "Trainer",
    "StudentTrainer",
    "StepOutput",
]
