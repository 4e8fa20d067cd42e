"""``kdkit demo``: teacher -> student from scratch -> distilled student, with a report."""

from __future__ import annotations

import argparse

#: kdkit demo NAME: one per task recipe (kdkit.run.recipes), listed here so --help imports no torch
_DEMOS = ("vision", "lm")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="distill on Fashion-MNIST (or, `kdkit demo lm`, a tiny Llama) and print a report",
        description="vision (default): train a teacher, a student from 1k labels, and a "
        "student distilled from 1k labels + 59k unlabeled images; print test accuracy, latency "
        "and throughput. lm: train a tiny Llama teacher on the Python docs (cached), then a "
        "smaller student from scratch and with forward KL, reverse KL and JSD; print held-out "
        "perplexity, the share of the gap each closes, parameters and tokens/s.",
    )
    p.add_argument(
        "what",
        nargs="?",
        choices=_DEMOS,
        default="vision",
        help="vision (Fashion-MNIST, default) or lm (a tiny Llama on the Python docs)",
    )
    p.add_argument("--quick", action="store_true", help="about 3 minutes instead of 15")
    p.add_argument("--retrain", action="store_true", help="ignore the cached teacher")
    p.add_argument("--out", help="report directory (default: runs/demo, runs/demo-lm)")
    p.add_argument("--seed", type=int, help="seed of every run (0)")
    p.add_argument("--n-labeled", type=int, help="vision: labels the students get (1000)")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--scratch-epochs", type=int)
    p.add_argument("--kd-epochs", type=int)
    p.add_argument(
        "--temperature",
        type=float,
        help="soft-target temperature (default 1, chosen on a validation split)",
    )
    p.add_argument("--no-augment", action="store_true", help="no crop/flip views")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.run.recipes import RECIPES

    recipe = next(r for r in RECIPES.values() if r.demo_name == args.what)
    options = {k: v for k, v in vars(args).items() if k not in ("what", "func", "verbose")}
    options["augment"] = not options.pop("no_augment")
    options["progress"] = not options.pop("no_progress")
    print(recipe.demo(options).read_text())
    return 0
