"""Patient and consistent teaching on Fashion-MNIST (Beyer et al. 2022, arXiv:2106.05237).

The demo's teacher (kdkit.models.fmnist_teacher, trained on all 60k labels, cached under
~/.cache/kdkit/demo) distills the demo's student on 1k labels + the other train images
unlabeled. Every row is chosen on a validation split carved from train (5k, stratified,
seed 123), never on test; ``--test`` evaluates the rows on the test set instead (run it once,
for the chosen recipe). The teacher sees exactly the student's view (pad-2 crop + flip, and
with ``mix`` the same mixup/CutMix partner and weight: kdkit.data.views.ViewSampler).

Rows (``--rows``; each: loss, temperature, mixing, epochs):
  soft-T1-e2          soft targets, T=1, no mixing, 2 epochs   (the demo's recipe, shorter)
  soft-T1-mix-e2      + mixup (alpha 1) / CutMix (alpha 1), half of the samples each
  soft-T1-e4, ...     the same, 4 epochs (the "patient" axis)
  dkd-e2              DKD (alpha 1, beta 8, T 4), no mixing
  dkd-w1-e2           DKD with the distillation weight ramped up over 1 epoch (LossBalancer)

Every run is single-threaded; results are appended as JSON lines to ``--log`` (one per run,
so a cut-short study keeps what it measured) and ``--table`` prints mean +- std over seeds.

    python benchmarks/bench_patient.py --rows soft-T1-e2 soft-T1-mix-e2 --seeds 0 1 2
    python benchmarks/bench_patient.py --table
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from kdkit.balance import LossBalancer
from kdkit.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FastLoader,
    concat,
    holdout,
    load_fashion_mnist,
    split_labeled,
)
from kdkit.data.views import ViewSampler
from kdkit.demo import DemoConfig, _teacher, fast_teacher
from kdkit.distiller import Distiller
from kdkit.losses import DKD, SoftTargetKL
from kdkit.models import fmnist_student
from kdkit.train.trainer import Trainer

LOG = Path("runs/bench_patient.jsonl")


def parse_row(row: str) -> dict:
    """``soft-T1-mix-e4`` -> loss soft, T 1, mixing on, 4 epochs; ``dkd-e2`` -> DKD."""
    parts = row.split("-")
    spec = {"loss": parts[0], "temperature": 1.0, "mix": False, "epochs": 2, "warmup": 0.0}
    for p in parts[1:]:
        if p.startswith("T"):
            spec["temperature"] = float(p[1:])
        elif p == "mix":
            spec["mix"] = True
        elif p.startswith("e"):
            spec["epochs"] = int(p[1:])
        elif p.startswith("w"):
            spec["warmup"] = float(p[1:])
        else:
            raise SystemExit(f"unknown row part {p!r} in {row!r}")
    if spec["loss"] not in ("soft", "dkd"):
        raise SystemExit(f"unknown loss in {row!r}")
    return spec


def views(seed: int, mix: bool) -> ViewSampler:
    alpha = 1.0 if mix else 0.0
    return ViewSampler(seed=seed, crop="pad", pad=2, size=28, flip_p=0.5, mixup=alpha, cutmix=alpha)


def run(row: str, seed: int, cfg: DemoConfig, train, evalset, teacher) -> dict:
    spec = parse_row(row)
    cfg = replace(cfg, seed=seed)
    labeled, unlabeled = split_labeled(train, cfg.n_labeled, seed=seed)
    data = concat(labeled, unlabeled)
    torch.manual_seed(seed)
    model = fmnist_student()
    if spec["loss"] == "dkd":
        criterion = DKD(temperature=spec["temperature"] if "T" in row else 4.0)
    else:
        criterion = SoftTargetKL(temperature=spec["temperature"])
    distiller = Distiller(model, teacher, criterion, LossBalancer(warmup_epochs=spec["warmup"]))
    loader = FastLoader(data, cfg.batch_size, shuffle=True, seed=seed)
    steps = spec["epochs"] * len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    trainer = Trainer(
        distiller,
        loader,
        FastLoader(evalset, 1000, shuffle=False),
        optimizer=opt,
        scheduler=sched,
        scheduler_interval="step",
        epochs=spec["epochs"],
        seed=seed,
        views=views(seed, spec["mix"]),
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        device="cpu",
        progress=False,
    )
    start = time.perf_counter()
    history = trainer.fit(resume=False)
    return {
        "row": row,
        "seed": seed,
        "top1": [h["val_top1"] for h in history],
        "time_s": time.perf_counter() - start,
    }


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(log: Path) -> str:
    runs = defaultdict(list)
    for line in log.read_text().splitlines():
        r = json.loads(line)
        runs[(r["split"], r["row"])].append(r)
    lines = [
        "| row | split | seeds | top-1, last epoch | top-1, best epoch | time per run (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (split, row), rs in runs.items():
        last = [r["top1"][-1] for r in rs]
        best = [max(r["top1"]) for r in rs]
        secs = statistics.mean(r["time_s"] for r in rs)
        lines.append(f"| {row} | {split} | {len(rs)} | {fmt(last)} | {fmt(best)} | {secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["soft-T1-e2", "soft-T1-mix-e2"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--test", action="store_true", help="evaluate on test (the chosen recipe)")
    p.add_argument("--log", type=Path, default=LOG)
    p.add_argument("--table", action="store_true", help="print the table of --log and exit")
    args = p.parse_args()
    if args.table:
        print(table(args.log))
        return
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    cfg = DemoConfig(progress=False)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    teacher = _teacher(cfg, train, test)  # the demo's cached teacher (all 60k labels)
    split = "test" if args.test else "val"
    if not args.test:
        train, test = holdout(train, 5000, seed=123)
    live = fast_teacher(teacher.model, cfg)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        for seed in args.seeds:
            r = run(row, seed, cfg, train, test, live)
            r.update(split=split, load=os.getloadavg()[0], teacher_test_top1=teacher.test_top1)
            with args.log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
