"""The GPU path end to end, one command: every way to distill, same models, batch and data.

    python benchmarks/bench_gpu_kd.py                         # CUDA: resnet152 -> resnet18, 224 px,
                                                              # batch 256, 10k JPEGs of 500x375
    python benchmarks/bench_gpu_kd.py --json gpu_kd.json      # + machine-readable rows
    python benchmarks/bench_gpu_kd.py --device cpu --small    # the same code paths, tiny models
                                                              # and images, < 1 min on a CPU
    python benchmarks/bench_gpu_kd.py --device cpu --smoke --only naive,student  # seconds
    python benchmarks/bench_gpu_kd.py --json gpu_kd.json --only cached,files-cached  # rerun
                                                              # rows; merged into the JSON

One process, one run. Phase 1 feeds every row from GPU-resident uint8 tensors (the JPEGs below,
decoded once at the working size); phase 2 reads the JPEG folder the script generates (kept in
``--data-dir`` and reused). Rows, each as img/s and the ratio to its phase's naive row:

* naive: the tutorials' loop (fp32 eager teacher and student, KL * T^2 + CE, ``loss.item()``
  each step for the running loss); in phase 2 fed by the PIL loader (decode + RandomResizedCrop
  in DataLoader workers), the tutorials' data path;
* timm ``LogitDistillationTask`` (fp32 and bf16 autocast), when timm imports;
* kdkit online through ``Trainer.train_step``, one row per teacher backend that is available:
  ``TorchTeacher`` bf16 + channels_last eager and compiled, ``OnnxTeacher`` (CUDA I/O binding
  needs onnxruntime-gpu), ``TensorRTTeacher`` fp16 (when tensorrt imports);
* kdkit cached replay: ``kdkit.cache.precompute`` (K views, its own rate is a row), then
  ``CachedTeacher`` with the same ViewSampler;
* the teacher alone (bf16 inference) and the student alone (supervised step, no teacher);
* kdkit's defaults (``kdkit train`` with no speed keys: fp32, ``teacher.backend: auto``,
  ``train.channels_last: auto``, chosen on the first batch as a run does, the choice and its
  cost in the row's label) and the student alone in that same precision and memory format,
  its ceiling;
* phase 2 only: each loader alone (PIL, kdkit ``decode="cpu"``, ``decode="gpu"`` nvJPEG).

Every kdkit and peer row applies the same device-side ViewSampler views (K fixed views, so the
cache can serve them); the phase-2 naive/timm rows take the PIL loader's own augmentation.
Models have random weights: speed does not depend on them. A row that cannot run on this
machine is listed with the reason; a row that fails is listed with the error (``--strict``
raises instead).

Timing: every row first runs warm-up steps on the shapes it will be timed on (torch.compile,
worker start-up and the precompute's partial last batch happen there), then up to
``--steps`` steps between two ``torch.cuda.synchronize`` calls, stopping after
``--row-budget-s`` seconds of timed work; rows left when ``--total-budget-s`` has passed are
skipped (the defaults fit the whole run in 8 minutes on an H100, compile included). Peak
memory is what the row allocated above what was resident when it started (the GPU-resident
dataset, the shared teacher). With ``--json`` the file is rewritten after every row, so a
killed run still returns what it measured; ``--only ID,...`` reruns some rows (ids in the
table) and merges them into an existing JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from _harness import Budget, Row, Runner, Skip, cycle, markdown, ratios, stepped, sync, versions
from _synthetic import decode_all, make_jpeg_folder, resident_batches, tiny_cnn
from torch import nn

from kdkit import Distiller, SoftTargetKL, Trainer
from kdkit._compile import compile_static
from kdkit._io import atomic_write_json
from kdkit.bench import describe_device
from kdkit.cache import CachedTeacher, precompute
from kdkit.data import ArrayDataset, Batch, ImageFolderManager, ViewSampler, prepare_input, to_float
from kdkit.data.pipeline import InputPipeline
from kdkit.errors import KDError
from kdkit.teachers import TorchTeacher

log = logging.getLogger("bench_gpu_kd")

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


#: every row's id, in the order they run (``--only`` takes these)
ROW_IDS = (
    "naive",
    "timm-fp32",
    "timm-bf16",
    "online-eager",
    "online-compiled",
    "online-onnx",
    "online-tensorrt",
    "precompute",
    "cached",
    "teacher",
    "student",
    "default-auto",
    "student-default",
    "files-naive",
    "files-timm",
    "loader-pil",
    "loader-cpu",
    "loader-gpu",
    "files-online-cpu",
    "files-online-gpu",
    "files-cached",
    "files-student",
)


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


# -- the two phases -------------------------------------------------------------------------
def _warm_teacher(teacher: Any, sizes: set[int], setup: Setup, device: torch.device) -> None:
    """Call ``teacher`` once per batch size it will see, so no compile is timed."""
    for n in sorted(sizes - {0}):
        teacher(torch.zeros(n, 3, setup.size, setup.size, device=device))
    sync(device)


def phase_tensors(
    b: Bench, images: torch.Tensor, labels: torch.Tensor, workdir: Path, runner: Runner
) -> None:
    setup = b.setup
    phase = "GPU-resident tensors" if b.device.type == "cuda" else "resident tensors (CPU)"
    dev_images = images.to(b.device)
    tag = "compiled" if setup.compile else "compile off"

    def data() -> Iterator[Batch]:
        return resident_batches(dev_images, labels, setup.batch)

    def row(row_id: str, path: str, make: Callable[[], tuple[Callable, Iterator]]) -> None:
        runner.run(row_id, phase, path, stepped(make, b.device, setup.budget))

    def kd(teacher_fn: Callable[[], Any], compile: bool) -> Callable[[], tuple[Callable, Iterator]]:
        return lambda: (b.trainer(teacher_fn(), compile).train_step, data())

    row("naive", "naive: fp32 eager (the tutorials' loop)", lambda: (b.naive(b.augmented), data()))
    row(
        "timm-fp32", "timm LogitDistillationTask fp32", lambda: (b.timm(b.augmented, False), data())
    )
    row(
        "timm-bf16",
        "timm LogitDistillationTask bf16 autocast",
        lambda: (b.timm(b.augmented, True), data()),
    )
    eager = kd(lambda: b.torch_teacher(False), False)
    row("online-eager", "kdkit online, TorchTeacher bf16+cl eager", eager)
    if setup.compile:  # with --no-compile this row would repeat the eager one
        compiled = kd(lambda: b.torch_teacher(True), True)
        row("online-compiled", "kdkit online, TorchTeacher bf16+cl compiled", compiled)
    row(
        "online-onnx",
        f"kdkit online, OnnxTeacher (student {tag})",
        kd(b.onnx_teacher, setup.compile),
    )
    row(
        "online-tensorrt",
        f"kdkit online, TensorRTTeacher fp16 (student {tag})",
        kd(lambda: b.tensorrt_teacher(workdir), setup.compile),
    )

    def precompute_rate() -> float:
        """One pass of ``kdkit.cache.precompute`` over every image, ``NUM_VIEWS`` views each."""
        teacher = b.torch_teacher(setup.compile)
        dataset = ArrayDataset(images, labels)
        dataset.fingerprint()  # hashing the pixels is not the teacher's time
        # full batches (its probe is one) and the partial last batch: compiled here, untimed
        _warm_teacher(teacher, {setup.batch, len(dataset) % setup.batch}, setup, b.device)
        start = time.perf_counter()
        precompute(
            teacher,
            dataset,
            b.cache_dir,
            views=b.views,
            batch_size=setup.batch,
            mean=MEAN,
            std=STD,
            device=b.device,
            progress=False,
            overwrite=True,
        )
        sync(b.device)
        return len(dataset) * NUM_VIEWS / (time.perf_counter() - start)

    b.cache_dir = workdir / "cache"
    runner.run(
        "precompute",
        phase,
        f"kdkit.cache.precompute, {NUM_VIEWS} views, teacher bf16+cl {tag}",
        precompute_rate,
    )
    row("cached", f"kdkit cached replay (student {tag})", kd(lambda: _cached(b), setup.compile))
    row(
        "teacher",
        f"teacher alone, bf16+cl {tag} (inference)",
        lambda: (b.teacher_alone(setup.compile), data()),
    )
    row("student", f"student alone, bf16+cl {tag} (no teacher)", kd(lambda: None, setup.compile))
    runner.run(
        "default-auto",
        phase,
        "kdkit defaults (fp32, teacher.backend auto, channels_last auto)",
        stepped(
            lambda: (b.default_trainer(data, False).train_step, data()), b.device, setup.budget
        ),
    )
    runner.run(
        "student-default",
        phase,
        "student alone, fp32, the defaults' memory format (ceiling)",
        stepped(lambda: (b.default_trainer(data, True).train_step, data()), b.device, setup.budget),
    )
    if b.default_label:
        log.info("kdkit defaults: %s", b.default_label)


def _cached(b: Bench) -> CachedTeacher:
    if not (Path(b.cache_dir) / "meta.json").is_file():
        raise Skip("no cache: the precompute row did not run (--only: add precompute)")
    return CachedTeacher(b.cache_dir, device=b.device)


def phase_files(b: Bench, root: Path, runner: Runner) -> None:
    setup = b.setup
    phase = f"JPEG files ({setup.images} x {setup.image_w}x{setup.image_h})"
    cuda = b.device.type == "cuda"
    managers: dict[str, ImageFolderManager] = {}

    def loader(decode: str) -> Any:
        if decode == "gpu" and not cuda:
            raise Skip("nvJPEG decode needs a CUDA device")
        if decode not in managers:
            managers[decode] = ImageFolderManager(
                root,
                size=setup.size,
                batch_size=setup.batch,
                workers=setup.workers,
                decode=decode,
                device=b.device if decode != "pil" else None,
                work_size=setup.work_size,
            )
        return cycle(managers[decode].train_loader)

    def loader_alone(decode: str) -> Callable:
        def make():
            batches = loader(decode)
            touch = (
                (lambda x: x.to(b.device, non_blocking=True)) if decode == "pil" else (lambda x: x)
            )
            return (lambda batch: touch(batch.images)), batches

        return make

    def trainer_row(teacher_fn: Callable[[], Any], decode: str) -> Callable:
        def make():
            batches = loader(decode)
            return b.trainer(teacher_fn(), setup.compile).train_step, batches

        return make

    tag = "compiled" if setup.compile else "compile off"
    best = "gpu" if cuda else "cpu"

    def row(row_id: str, path: str, make: Callable[[], tuple[Callable, Iterator]]) -> None:
        runner.run(row_id, phase, path, stepped(make, b.device, setup.budget))

    row(
        "files-naive",
        "naive: fp32 eager + PIL loader (the tutorials' data path)",
        lambda: (b.naive(b.pil_input), loader("pil")),
    )
    row(
        "files-timm",
        "timm LogitDistillationTask bf16 + PIL loader",
        lambda: (b.timm(b.pil_input, True), loader("pil")),
    )
    for decode in ("pil", "cpu", "gpu"):
        row(f"loader-{decode}", f"loader alone: decode={decode}", loader_alone(decode))
    for decode in ("cpu", "gpu"):
        row(
            f"files-online-{decode}",
            f"kdkit online, TorchTeacher bf16+cl {tag}, decode={decode}",
            trainer_row(lambda: b.torch_teacher(setup.compile), decode),
        )
    row(
        "files-cached",
        f"kdkit cached replay ({tag}), decode={best}",
        trainer_row(lambda: _cached(b), best),
    )
    row("files-student", f"student alone ({tag}), decode={best}", trainer_row(lambda: None, best))
    for manager in managers.values():  # stop the loaders' persistent workers now
        close = getattr(manager.train_loader, "close", None)
        if callable(close):
            close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--small", action="store_true", help="tiny models, 48 tiny images, 2 steps")
    p.add_argument(
        "--smoke", action="store_true", help="--small with 16 images and 1 step: seconds on a CPU"
    )
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 10000)")
    p.add_argument("--image-size", default=None, help="WxH of the JPEGs (default 500x375)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row, at most")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row, at most")
    p.add_argument("--row-budget-s", type=float, default=None, help="timed seconds per row")
    p.add_argument(
        "--total-budget-s", type=float, default=None, help="skip the rows left after this"
    )
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (on in full mode)")
    p.add_argument("--data-dir", default=None, help="where the JPEGs live (reused if complete)")
    p.add_argument("--json", default=None, help="also write the rows here (after every row)")
    p.add_argument("--only", default=None, help=f"comma-separated row ids: {', '.join(ROW_IDS)}")
    p.add_argument("--skip-files", action="store_true", help="phase 1 only")
    p.add_argument("--strict", action="store_true", help="a failing row raises (tests)")
    return p.parse_args(argv)


def _only(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    ids = frozenset(t.strip() for t in text.split(",") if t.strip())
    unknown = sorted(ids - set(ROW_IDS))
    if unknown or not ids:
        raise SystemExit(f"--only: unknown row ids {unknown}; the ids are {', '.join(ROW_IDS)}")
    return ids


def make_setup(args: argparse.Namespace) -> Setup:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --small for the CPU check")
    small = args.small or args.smoke
    if device == "cpu" and not small:
        raise SystemExit("the full benchmark is for a GPU; on a CPU use --device cpu --small")
    w, h = map(int, (args.image_size or ("40x30" if small else "500x375")).split("x"))
    size = 32 if small else 224
    cores = len(os.sched_getaffinity(0))
    tiny = {"images": 16, "batch": 4, "steps": 1} if args.smoke else {}
    return Setup(
        device=device,
        small=small,
        batch=args.batch or tiny.get("batch", 8 if small else 256),
        size=size,
        work_size=36 if small else 256,
        num_classes=10 if small else 1000,
        images=args.images or tiny.get("images", 48 if small else 10_000),
        image_w=w,
        image_h=h,
        warmup=args.warmup if args.warmup is not None else (1 if small else 10),
        steps=args.steps or tiny.get("steps", 2 if small else 30),
        workers=args.workers if args.workers is not None else (0 if small else min(cores, 16)),
        compile=not (args.no_compile or small),
        data_dir=args.data_dir
        or os.path.join(tempfile.gettempdir(), f"kdkit-bench-jpegs-{'small' if small else 'full'}"),
        row_budget_s=args.row_budget_s if args.row_budget_s is not None else 12.0,
        total_budget_s=args.total_budget_s if args.total_budget_s is not None else 450.0,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print Markdown; return (and with ``--json`` write) the result."""
    args = parse_args(argv)
    only = _only(args.only)
    setup = make_setup(args)
    threads = torch.get_num_threads()
    if setup.device == "cpu":
        torch.set_num_threads(1)  # tiny models: threads only add barriers (a shared machine)
    try:
        result = _run(setup, args, only)
    finally:
        torch.set_num_threads(threads)
    print(markdown(result))
    return result


def _earlier_rows(path: str | None, only: frozenset[str] | None) -> list[Row]:
    """With ``--only``, the rows of an earlier ``--json`` file that this run does not redo."""
    if path is None or only is None or not Path(path).is_file():
        return []
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (ValueError, KeyError, TypeError):
        return []
    fields = set(Row.__dataclass_fields__)
    kept = [Row(**{k: v for k, v in r.items() if k in fields}) for r in rows]
    return [r for r in kept if r.id not in only]


def _ordered(rows: list[Row]) -> list[Row]:
    order = {row_id: i for i, row_id in enumerate(ROW_IDS)}
    return sorted(rows, key=lambda r: order.get(r.id, len(order)))


def _run(setup: Setup, args: argparse.Namespace, only: frozenset[str] | None) -> dict[str, Any]:
    start = time.perf_counter()
    teacher, student, models = build_models(setup)
    earlier = _earlier_rows(args.json, only)
    result: dict[str, Any] = {
        "device": describe_device(setup.device),
        "versions": versions(),
        "workload": (
            f"{models}, {setup.size} px (views cropped from {setup.work_size} px), batch "
            f"{setup.batch}, up to {setup.warmup} warm-up + {setup.steps} timed steps or "
            f"{setup.row_budget_s:g} s per row, {setup.workers} loader workers, torch.compile "
            f"{'on' if setup.compile else 'off'}"
        ),
        "setup": asdict(setup),
        "complete": False,
        "rows": [],
    }

    def record(rows: list[Row]) -> None:
        merged = _ordered(earlier + [copy.copy(r) for r in rows])
        ratios(merged)
        result["rows"] = [asdict(r) for r in merged]
        if args.json:
            atomic_write_json(args.json, result)

    runner = Runner(
        torch.device(setup.device),
        strict=args.strict,
        only=only,
        deadline=start + setup.total_budget_s,
        on_row=record,
    )
    root = make_jpeg_folder(
        setup.data_dir, setup.images, setup.image_w, setup.image_h, setup.num_classes, setup.workers
    )
    probe = ImageFolderManager(
        root, size=setup.size, batch_size=setup.batch, workers=0, decode="cpu", device="cpu"
    )
    samples = probe.train_loader.encoded.samples
    images = decode_all(samples, setup.work_size, setup.device)
    labels = torch.tensor([y for _, y in samples], dtype=torch.int64)
    result["workload"] += f"; resident dataset {images.numel() / 2**30:.2f} GiB (not in peaks)"
    bench = Bench(setup, teacher, student)
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-") as work:
        phase_tensors(bench, images, labels, Path(work), runner)
        if not args.skip_files:
            phase_files(bench, root, runner)
    result["complete"] = True
    record(runner.rows)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
