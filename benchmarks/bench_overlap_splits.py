"""Every thread split of ``train.overlap`` through the Trainer's own loop, interleaved (issue 39).

``train.overlap: auto`` times its candidates on one batch and keeps the sequential path unless
a split is clearly faster. This bench times each split over many batches instead, so a reader
can see what ``auto`` chose between: ``off`` (the teacher in the step, on every thread), ``T+S``
(the next batch's teacher on a worker with ``T`` threads beside a student with ``S``), and
oversubscribed splits such as ``1+2`` (the teacher's thread beside a student that keeps every
core; auto does not offer them). The teacher is the int8 ONNX one ``teacher.backend: auto``
picks, the student channels_last, both pinned so that only the split varies; the batches and
views are ``bench_defaults.py``'s.

    OMP_NUM_THREADS=2 python benchmarks/bench_overlap_splits.py --threads 2 \\
        --teacher ~/.cache/kdkit/demo/teacher-<hash>.pt --splits off 1+1 1+2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_defaults  # noqa: E402

PINNED = {"teacher.backend": "onnx", "teacher.precision": "int8", "train.channels_last": "true"}


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    from kdkit.teachers.autotune import Choice
    from kdkit.train.overlap import KEY, Split

    torch.set_num_threads(args.threads)
    bench = bench_defaults.Bench(args.teacher, args.warmup + args.steps)
    loops = {}
    for name in args.splits:
        trainer, _, _ = bench.kdkit_run({**PINNED, "train.overlap": "false"})
        trainer.overlap.choice = Choice(KEY, Split.parse(name).name)  # the split, not measured
        loops[name] = bench.trainer_loop(trainer)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.rounds):
        for name, loop in loops.items():
            rates[name].append(bench_defaults.timed(loop, bench.batches, args.warmup))
        bench_defaults.say(
            f"round {r}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items())
        )
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher", default="runs/demo/teacher.pt", help="from `kdkit demo`")
    p.add_argument("--splits", nargs="+", default=["off", "1+1", "1+2"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    rates = run(args)
    off = statistics.median(rates["off"]) if "off" in rates else None
    print(f"| split | img/s (median) | vs off | per round |  ({args.threads} threads, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'default')})")  # fmt: skip
    print("|---|---:|---:|---|")
    for name, v in rates.items():
        med = statistics.median(v)
        ratio = f"{med / off:.2f}x" if off else "-"
        print(f"| {name} | {med:,.0f} | {ratio} | {' / '.join(f'{x:,.0f}' for x in v)} |")


if __name__ == "__main__":
    main()
