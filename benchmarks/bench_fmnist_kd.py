"""The Jetson tutorial's table on Fashion-MNIST, with seeds: how much does distillation buy?

Rows (each student is kdkit.models.fmnist_student, trained with the demo's recipe):
  teacher                 all 60k labels (one teacher, shared by every student seed)
  scratch, 1k labels      the baseline the demo beats
  KD, 1k labels only      distillation on the labeled images alone
  KD, 1k + 59k unlabeled  the demo's student (Hinton soft targets)
  DKD, 1k + 59k unlabeled decoupled KD instead of soft targets (the paper's alpha=1,
                          beta=8, T=4)
  scratch, 60k labels     the upper bound of supervised training

Prints mean +- std over seeds of the best and the last epoch's test accuracy, and writes the
Markdown table to --out. ``--val`` evaluates on a 5k validation split carved from train
instead of the test set (that is how hyper-parameters are chosen: never on test).

    python benchmarks/bench_fmnist_kd.py --seeds 0 1 2 --out docs/_fmnist_kd.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from kdkit.data import concat, holdout, load_fashion_mnist, split_labeled
from kdkit.demo import DemoConfig, demo_teacher, fast_teacher, train_model
from kdkit.losses import DKD
from kdkit.models import fmnist_student

ROWS = ("scratch-1k", "kd-1k", "kd-1k+59k", "dkd-1k+59k", "scratch-60k")


def run_row(row: str, seed: int, cfg: DemoConfig, data: dict, teacher) -> dict:
    cfg = replace(cfg, seed=seed)
    labeled, unlabeled = split_labeled(data["train"], cfg.n_labeled, seed=seed)
    train_set, model_teacher, epochs, criterion = {
        "scratch-1k": (labeled, None, cfg.scratch_epochs, None),
        "kd-1k": (labeled, teacher, cfg.scratch_epochs, None),
        "kd-1k+59k": (concat(labeled, unlabeled), teacher, cfg.kd_epochs, None),
        "dkd-1k+59k": (
            concat(labeled, unlabeled),
            teacher,
            cfg.kd_epochs,
            DKD(),
        ),
        "scratch-60k": (data["train"], None, cfg.kd_epochs, None),
    }[row]
    torch.manual_seed(seed)
    model = fmnist_student()
    start = time.perf_counter()
    history, _ = train_model(
        model, train_set, data["eval"], epochs, cfg, model_teacher, criterion=criterion
    )
    accs = [h["val_top1"] for h in history]
    return {"best": max(accs), "last": accs[-1], "time_s": time.perf_counter() - start}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--val", action="store_true", help="evaluate on a validation split")
    p.add_argument("--temperature", type=float, default=DemoConfig.temperature)
    p.add_argument("--kd-epochs", type=int, default=DemoConfig.kd_epochs)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = DemoConfig(progress=False, temperature=args.temperature, kd_epochs=args.kd_epochs)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    teacher = demo_teacher(cfg)
    data = {"train": train, "eval": test}
    if args.val:
        data["train"], data["eval"] = holdout(train, 5000, seed=123)
    split = "validation (5k from train)" if args.val else "test"
    lines = [
        f"| run | {split} top-1, best epoch | {split} top-1, last epoch | train time (s) |",
        "|---|---:|---:|---:|",
        f"| teacher, 60k labels (seed 0) | {teacher.test_top1:.2f} (test) | | |",
    ]
    live = fast_teacher(teacher.model, cfg)  # ORT on CPU, as in the demo
    for row in args.rows:
        results = [run_row(row, s, cfg, data, live) for s in args.seeds]
        line = (
            f"| {row} | {fmt([r['best'] for r in results])} | {fmt([r['last'] for r in results])} "
            f"| {statistics.mean(r['time_s'] for r in results):.0f} |"
        )
        lines.append(line)
        print(line, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
