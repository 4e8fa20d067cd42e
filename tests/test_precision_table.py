"""One precision table (kdkit._precision); every other list of precision names agrees with it."""

from __future__ import annotations

import dataclasses
import typing

import torch

from kdkit import _precision as P


def test_the_derived_tables():
    assert P.FLOAT_DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert P.AUTOCAST_DTYPES == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert P.TEACHER_PRECISIONS == ("fp32", "bf16", "fp16", "int8") == P.TRT_PRECISIONS
    assert P.ONNX_PRECISIONS == ("fp32", "int8")


def test_the_teachers_and_the_trainer_read_the_one_table():
    from kdkit.teachers import tensorrt_teacher, torch_teacher
    from kdkit.train import precision

    assert torch_teacher.PRECISIONS is P.FLOAT_DTYPES
    assert tensorrt_teacher.TRT_PRECISIONS is P.TRT_PRECISIONS
    assert precision.PRECISION_DTYPES == P.AUTOCAST_DTYPES  # to be derived (one line)


def test_the_config_schema_names_the_same_precisions():
    from kdkit.config import schema

    assert typing.get_args(schema.Precision) == P.FLOAT_PRECISIONS
    teacher = {f.name: f for f in dataclasses.fields(schema.TeacherConfig)}["precision"]
    hint = typing.get_type_hints(schema.TeacherConfig)["precision"]
    assert teacher.default == "fp32" and typing.get_args(hint) == P.TEACHER_PRECISIONS
