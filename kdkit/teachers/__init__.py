"""Teacher backends behind one protocol: ``teacher(x, index=, view=) -> TeacherOutput``.

onnxruntime and tensorrt are imported only when an OnnxTeacher / TensorRTTeacher is made.
"""

from kdkit.teachers.auto_teacher import AutoTeacher
from kdkit.teachers.base import Teacher, TeacherOutput, TopK
from kdkit.teachers.clip_teacher import ClipInput, ClipTeacher
from kdkit.teachers.ensemble import EnsembleTeacher
from kdkit.teachers.factory import make_teacher, teacher
from kdkit.teachers.onnx_teacher import OnnxTeacher
from kdkit.teachers.tensorrt_teacher import TensorRTTeacher
from kdkit.teachers.torch_teacher import PRECISIONS, TorchTeacher, module_fingerprint

__all__ = [
    "Teacher",
    "TeacherOutput",
    "TopK",
    "AutoTeacher",
    "ClipTeacher",
    "ClipInput",
    "TorchTeacher",
    "OnnxTeacher",
    "TensorRTTeacher",
    "EnsembleTeacher",
    "PRECISIONS",
    "module_fingerprint",
    "teacher",
    "make_teacher",
]
