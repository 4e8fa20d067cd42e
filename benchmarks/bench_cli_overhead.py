"""What `kdkit train` costs over the Python API, on the demo's KD recipe.

Runs the same Fashion-MNIST KD recipe twice, each in a fresh process so both pay the same
interpreter and torch start-up:

- API: ``kdkit.demo.train_model`` (the demo's "student, KD" recipe with a Trainer built by
  hand; ``kdkit demo`` itself now runs each row as a config, through ``kdkit train``'s job);
- CLI: ``kdkit train configs/fmnist_kd.yaml`` (config parsing and validation, building from
  the config, run directory, the teacher's own val pass and report.md/curves.png).

Prints wall time, the CLI's overhead in percent and both test top-1s (which should be equal:
same seed, same order, same arithmetic). The teacher is the demo's (trained once and cached
under ~/.cache/kdkit/demo by the first run).

    OMP_NUM_THREADS=1 python benchmarks/bench_cli_overhead.py [--epochs 6] [--repeats 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

API_JOB = """
import json, sys, torch
from kdkit.data import concat, load_fashion_mnist, split_labeled
from kdkit.demo import DemoConfig, fast_teacher, train_model
from kdkit.models import fmnist_student, fmnist_teacher
from kdkit.load import load_weights
epochs, weights = int(sys.argv[1]), sys.argv[2]
cfg = DemoConfig(kd_epochs=epochs, progress=False)
train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
labeled, unlabeled = split_labeled(train, cfg.n_labeled, seed=cfg.seed)
teacher = load_weights(fmnist_teacher(), weights).eval()
torch.manual_seed(cfg.seed)
student = fmnist_student()
history, top1 = train_model(
    student, concat(labeled, unlabeled), test, epochs, cfg, teacher=fast_teacher(teacher, cfg)
)
print(json.dumps({"top1": top1, "history": [h["val_top1"] for h in history]}))
"""


def demo_teacher_path() -> Path:
    """The demo's cached teacher (trained here on first use: ~3 minutes on 2 cores)."""
    from kdkit.demo import DemoConfig, demo_teacher, teacher_files

    cfg = DemoConfig(progress=False)
    demo_teacher(cfg)
    return teacher_files(cfg)[0]  # where demo_teacher keeps it


def timed(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return wall, done.stdout


def cli_only_costs(weights: Path, run_dir: Path) -> dict[str, float]:
    """Seconds of the work only the CLI does, timed in-process (less noisy than comparing
    two long runs on a shared machine): config parse + validation, the teacher's val pass
    and report.md + curves.png. Building data, models and the Trainer is shared work."""
    import torch

    from kdkit.config import load_config, resolve_paths
    from kdkit.run.job import RunResult, build_trainer
    from kdkit.run.run_report import teacher_top1, write_run_report

    torch.set_num_threads(1)
    start = time.perf_counter()
    sets = [
        "teacher.model=kdkit:fmnist_teacher",
        f"teacher.weights={weights}",
        "train.progress=false",
        f"run_dir={run_dir}",
    ]
    cfg = resolve_paths(load_config(ROOT / "configs/fmnist_kd.yaml", sets))
    config_s = time.perf_counter() - start
    trainer, data = build_trainer(cfg)
    with (run_dir / "metrics.csv").open() as f:
        trainer.history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    for row in trainer.history:
        row["epoch"] = int(row["epoch"]) - 1  # metrics.csv counts from 1, history from 0
    start = time.perf_counter()
    top1 = teacher_top1(trainer, data)
    teacher_s = time.perf_counter() - start
    start = time.perf_counter()
    write_run_report(cfg, trainer, data, RunResult(run_dir, trainer.history, None, top1), 0)
    report_s = time.perf_counter() - start
    return {"config_s": config_s, "teacher_val_s": teacher_s, "report_s": report_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="runs/bench_cli")
    parser.add_argument("--teacher", help="the demo teacher's weights (default: train or reuse "
                        "the demo's cached teacher)")  # fmt: skip
    parser.add_argument("--costs-only", action="store_true",
                        help="only time the CLI-only work, reusing OUT/cli-0 from a full run")  # fmt: skip
    args = parser.parse_args()
    weights = Path(args.teacher) if args.teacher else demo_teacher_path()
    out = ROOT / args.out
    if args.costs_only:
        costs = cli_only_costs(weights, out / "cli-0")
        print(
            ", ".join(f"{k} {v:.2f}" for k, v in costs.items()),
            f"(total {sum(costs.values()):.2f} s)",
        )
        return
    rows = []
    for r in range(args.repeats):
        api_s, api_out = timed([sys.executable, "-c", API_JOB, str(args.epochs), str(weights)])
        api = json.loads(api_out.strip().splitlines()[-1])
        run_dir = out / f"cli-{r}"
        cli_s, _ = timed(
            [sys.executable, "-m", "kdkit", "train", "configs/fmnist_kd.yaml",
             "--set", "teacher.model=kdkit:fmnist_teacher", "--set", f"teacher.weights={weights}", "--set", f"train.epochs={args.epochs}",
             "--set", "train.progress=false", "--run-dir", str(run_dir)]
        )  # fmt: skip
        with (run_dir / "metrics.csv").open() as f:
            cli_top1 = float(list(csv.DictReader(f))[-1]["val_top1"])
        rows.append((api_s, cli_s, api["top1"], cli_top1))
        print(
            f"repeat {r}: API {api_s:.1f} s, top-1 {api['top1']:.2f} | CLI {cli_s:.1f} s, "
            f"top-1 {cli_top1:.2f} | overhead {100 * (cli_s / api_s - 1):+.1f}%",
            flush=True,
        )
    api_s = sum(r[0] for r in rows) / len(rows)
    cli_s = sum(r[1] for r in rows) / len(rows)
    print(
        f"\n| path | wall time (s) | test top-1 (%) |\n|---|---:|---:|\n"
        f"| Python API (`kdkit.demo.train_model`) | {api_s:.1f} | {rows[-1][2]:.2f} |\n"
        f"| `kdkit train configs/fmnist_kd.yaml` | {cli_s:.1f} | {rows[-1][3]:.2f} |\n\n"
        f"CLI overhead: {100 * (cli_s / api_s - 1):+.1f}% of wall time "
        f"({args.epochs} epochs, mean of {len(rows)} run(s) each)"
    )


if __name__ == "__main__":
    main()
