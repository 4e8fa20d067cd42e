"""bench_gpu_kd's models and the step function of each kind of row.

:class:`Setup` is what one run compares; :func:`build_models` makes its teacher and student
(random weights: speed does not depend on them); :class:`Bench` holds the run's shared state
(models, views) and builds one row's step: the tutorials' naive loop, timm's
``LogitDistillationTask``, kdkit's Trainer with each teacher backend, kdkit's defaults, the
teacher alone. The phases that time them are in ``_gpu_kd_rows.py``; the CLI is
``bench_gpu_kd.py``.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from _harness import Budget, Skip
from _synthetic import tiny_cnn
from torch import nn

from kdkit import Distiller, SoftTargetKL, Trainer
from kdkit._compile import compile_static
from kdkit.data import Batch, ViewSampler, prepare_input, to_float
from kdkit.data.pipeline import InputPipeline
from kdkit.errors import KDError
from kdkit.teachers import TorchTeacher

__all__ = [
    "MEAN",
    "NUM_VIEWS",
    "STD",
    "TEMPERATURE",
    "Bench",
    "Setup",
    "TimmStudent",
    "build_models",
]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEMPERATURE = 4.0
NUM_VIEWS = 2  # views per sample in the cache (and for every row, so all rows see the same)


@dataclass(frozen=True)
class Setup:
    """What one run compares (see ``--help``)."""

    device: str
    small: bool
    batch: int
    size: int
    work_size: int
    num_classes: int
    images: int
    image_w: int
    image_h: int
    warmup: int
    steps: int
    workers: int
    compile: bool
    data_dir: str
    row_budget_s: float = 12.0
    total_budget_s: float = 450.0

    @property
    def budget(self) -> Budget:
        return Budget(self.warmup, self.steps, self.row_budget_s)


# -- models ---------------------------------------------------------------------------------
def build_models(setup: Setup) -> tuple[nn.Module, nn.Module, str]:
    """(teacher, student, description), random weights, on the device."""
    torch.manual_seed(0)
    if setup.small:
        teacher, student = (
            tiny_cnn((16, 32, 32), setup.num_classes),
            tiny_cnn((8, 16), setup.num_classes),
        )
        name = "tiny CNN (3 convs) -> tiny CNN (2 convs)"
    else:
        teacher = torchvision.models.resnet152(num_classes=setup.num_classes)
        student = torchvision.models.resnet18(num_classes=setup.num_classes)
        name = "torchvision resnet152 -> resnet18"
    return teacher.to(setup.device).eval(), student.to(setup.device), name


class TimmStudent(nn.Module):
    """The three attributes timm's task reads from a timm model, around a torchvision one."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model, self.num_classes, self.in_chans = model, num_classes, 3
        self.pretrained_cfg = {"mean": MEAN, "std": STD}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# -- the rows' steps ------------------------------------------------------------------------
class Bench:
    """The shared state of one run: models, views, data; one method per kind of row."""

    def __init__(self, setup: Setup, teacher: nn.Module, student: nn.Module) -> None:
        self.setup = setup
        self.device = torch.device(setup.device)
        self.teacher, self.student0 = teacher, student
        self.views = ViewSampler(seed=0, num_views=NUM_VIEWS, size=setup.size)
        self.bf16 = "bf16"
        self.channels_last = True
        self._compiled_teacher: TorchTeacher | None = None
        self._default: tuple | None = None  # the auto choices, made once per run
        self.default_label = ""
        self.cache_dir = Path(tempfile.gettempdir()) / "kdkit-bench-cache-unset"

    def student(self) -> nn.Module:
        return copy.deepcopy(self.student0)

    def augmented(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The kdkit rows' input: views + normalisation on the device; labels to the device."""
        ids = self.views.view_ids(batch.indices, 0)
        x = prepare_input(batch.images, batch.indices, ids, self.views, MEAN, STD, self.device)
        return x, batch.labels.to(self.device, non_blocking=True)

    def pil_input(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The PIL loader's batches are augmented already: move and normalise only."""
        x = to_float(batch.images.to(self.device, non_blocking=True), MEAN, STD)
        return x, batch.labels.to(self.device, non_blocking=True)

    # naive: the tutorials' loop
    def naive(self, prep: Callable) -> Callable[[Batch], None]:
        student, teacher = self.student(), self.teacher
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        running = [0.0]
        t = TEMPERATURE

        def step(batch: Batch) -> None:
            x, y = prep(batch)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            soft = F.kl_div(
                F.log_softmax(s_logits / t, 1), F.softmax(t_logits / t, 1), reduction="batchmean"
            )
            loss = 0.5 * soft * t * t + 0.5 * F.cross_entropy(s_logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running[0] += loss.item()

        return step

    def timm(self, prep: Callable, bf16: bool) -> Callable[[Batch], None]:
        try:
            from timm.task import LogitDistillationTask
        except ImportError as err:
            raise Skip(f"timm does not import ({err})") from None
        task = LogitDistillationTask(
            TimmStudent(self.student(), self.setup.num_classes),
            self.teacher,
            criterion=nn.CrossEntropyLoss(),
            temperature=TEMPERATURE,
            task_loss_weight=0.5,
            device=self.device,
            verbose=False,
        )
        opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.01, momentum=0.9)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

        def step(batch: Batch) -> None:
            x, y = prep(batch)
            with autocast:
                out = task(x, y)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

        return step

    def trainer(self, teacher: Any, compile: bool) -> Trainer:
        # no probe batch: SoftTargetKL has no lazy adapter, so there is no dry run, and the
        # first step a compiled model sees is a timed row's first warm-up batch
        loss = SoftTargetKL(temperature=TEMPERATURE) if teacher is not None else None
        distiller = Distiller(self.student(), teacher, loss)
        return self._trainer(distiller, self.channels_last, compile, precision=self.bf16)

    def _trainer(
        self, distiller: Distiller, channels_last: bool, compile: bool = False, **options: Any
    ) -> Trainer:
        """``distiller`` in a Trainer with the rows' views, normalisation and optimizer; its
        student in the channels-last format and compiled first where asked."""
        if channels_last:
            distiller.student.to(memory_format=torch.channels_last)
        if compile:
            distiller.student = compile_static(distiller.student)
        return Trainer(
            distiller,
            [],
            optimizer=lambda p: torch.optim.SGD(p, **{"lr": 0.01, "momentum": 0.9}),
            inputs=InputPipeline(self.views, MEAN, STD, channels_last=channels_last),
            device=self.device,
            progress=False,
            **options,
        )

    def torch_teacher(self, compile: bool) -> TorchTeacher:
        if compile and self._compiled_teacher is not None:
            return self._compiled_teacher
        t = TorchTeacher(self.teacher, self.bf16, channels_last=self.channels_last, compile=compile)
        if compile:
            self._compiled_teacher = t
        return t

    def onnx_teacher(self) -> Any:
        from kdkit.teachers import OnnxTeacher
        from kdkit.teachers.onnx_teacher import import_onnxruntime

        try:
            ort = import_onnxruntime()
        except KDError as err:
            raise Skip(str(err)) from None
        if (
            self.device.type == "cuda"
            and "CUDAExecutionProvider" not in ort.get_available_providers()
        ):
            raise Skip("onnxruntime has no CUDAExecutionProvider (pip install kdkit[onnx-gpu])")
        shape = (3, self.setup.size, self.setup.size)
        return OnnxTeacher(copy.deepcopy(self.teacher).float(), input_shape=shape).to(self.device)

    def tensorrt_teacher(self, workdir: Path) -> Any:
        if self.device.type != "cuda":
            raise Skip("TensorRT needs a CUDA device")
        try:
            import tensorrt  # noqa: F401
        except ImportError as err:
            raise Skip(f"tensorrt does not import ({err})") from None
        from kdkit.export import export_onnx
        from kdkit.teachers import TensorRTTeacher

        path = workdir / "teacher.onnx"
        export_onnx(
            copy.deepcopy(self.teacher).float().cpu(), path, (3, self.setup.size, self.setup.size)
        )
        b = self.setup.batch
        return TensorRTTeacher(path, "fp16", max_batch=b, opt_batch=b, device=self.device)

    def default_trainer(self, data: Callable[[], Iterator[Batch]], alone: bool) -> Trainer:
        """kdkit's defaults: fp32, the teacher backend and the memory format chosen by
        measurement on the first batch (:mod:`kdkit.run.autotune`), as ``kdkit train`` does;
        ``alone``: the student alone in the format chosen for it (the row's ceiling)."""
        from kdkit.run.autotune import choose_channels_last
        from kdkit.teachers.autotune import choose_backend

        x = self.augmented(next(iter(data())))[0]
        if self._default is None:
            teacher, t_choice = choose_backend(copy.deepcopy(self.teacher).float(), x)
            cl = choose_channels_last(self.student0, x, recorded=None)
            self._default = (teacher, t_choice, cl)
        teacher, t_choice, cl = self._default
        self.default_label = (
            f"backend {t_choice.value}, channels_last {cl.value}, "
            f"chosen in {t_choice.cost_s + cl.cost_s:.1f} s"
        )
        loss = None if alone else SoftTargetKL(temperature=TEMPERATURE)
        distiller = Distiller(self.student(), None if alone else teacher, loss)
        return self._trainer(distiller, bool(cl.value))

    def teacher_alone(self, compile: bool) -> Callable[[Batch], None]:
        t = self.torch_teacher(compile)

        def step(batch: Batch) -> None:
            t(self.augmented(batch)[0])

        return step
