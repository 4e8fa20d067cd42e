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

Files: this one is the command line and the result; ``_gpu_kd_rows.py`` the rows of each
phase and their ids; ``_gpu_kd_steps.py`` the models and each row's step; ``_harness.py`` the
timing; ``_synthetic.py`` the generated JPEGs and tiny models.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from _gpu_kd_rows import ROW_IDS, phase_files, phase_tensors
from _gpu_kd_steps import Bench, Setup, build_models
from _harness import Row, Runner, markdown, ratios, versions
from _synthetic import decode_all, make_jpeg_folder

from kdkit._io import atomic_write_json
from kdkit.bench import describe_device
from kdkit.data import ImageFolderManager


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
