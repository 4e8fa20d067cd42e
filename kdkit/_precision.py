"""The one precision table: the names a config or a constructor may use, and their dtypes.

Four tables used to say this separately (the config schema's ``Literal``, the Trainer's
autocast dtypes with ``fp32 -> None``, ``TorchTeacher``'s weight dtypes and TensorRT's list);
they now all derive from :data:`FLOAT_DTYPES`. Teachers add ``int8``: a quantized model run
by ONNX Runtime (:mod:`kdkit.teachers.quantize`) or an int8 TensorRT engine; it has no torch
dtype of its own (the quantized file is the model). Ground floor: imports only torch.
"""

from __future__ import annotations

import logging

import torch

__all__ = [
    "AUTOCAST_DTYPES",
    "FLOAT_DTYPES",
    "FLOAT_PRECISIONS",
    "INT8",
    "ONNX_PRECISIONS",
    "TEACHER_PRECISIONS",
    "TRT_PRECISIONS",
]

log = logging.getLogger(__name__)

#: precision name -> the dtype weights and inputs are cast to
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
FLOAT_PRECISIONS = tuple(FLOAT_DTYPES)
#: the Trainer's autocast dtype per precision; fp32 is no autocast at all (None)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    name: None if dtype is torch.float32 else dtype for name, dtype in FLOAT_DTYPES.items()
}

INT8 = "int8"
#: what a teacher section may ask for: the float precisions, plus int8 (quantized backends)
TEACHER_PRECISIONS = (*FLOAT_PRECISIONS, INT8)
#: ONNX Runtime runs the fp32 file or its int8 quantization (half types are TensorRT's)
ONNX_PRECISIONS = ("fp32", INT8)
#: a TensorRT engine is built in any of them
TRT_PRECISIONS = TEACHER_PRECISIONS
