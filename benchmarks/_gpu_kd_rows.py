"""bench_gpu_kd's rows: which run in each phase, under which id and label.

Phase 1 (:func:`phase_tensors`) feeds every row from resident uint8 tensors; phase 2
(:func:`phase_files`) reads the generated JPEG folder through each loader. Each row is a step
function from :class:`_gpu_kd_steps.Bench`, timed by ``_harness`` (``stepped``), and recorded
by the :class:`_harness.Runner` under an id of :data:`ROW_IDS`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _gpu_kd_steps import MEAN, NUM_VIEWS, STD, Bench, Setup
from _harness import Runner, Skip, cycle, stepped, sync
from _synthetic import resident_batches

from kdkit.cache import CachedTeacher, precompute
from kdkit.data import ArrayDataset, Batch, ImageFolderManager

__all__ = ["ROW_IDS", "phase_files", "phase_tensors"]

log = logging.getLogger("bench_gpu_kd")

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
