"""``kdkit demo``: teacher -> student from scratch -> distilled student, with a report."""

from __future__ import annotations

import argparse


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
        choices=("vision", "lm"),
        default="vision",
        help="vision (Fashion-MNIST, default) or lm (a tiny Llama on the Python docs)",
    )
    p.add_argument("--quick", action="store_true", help="about 3 minutes instead of 15")
    p.add_argument("--retrain", action="store_true", help="ignore the cached teacher")
    p.add_argument("--out", help="report directory (default: runs/demo, runs/demo-lm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-labeled", type=int, default=1000, help="labels the students get")
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
    if args.what == "lm":
        return _run_lm(args)
    from kdkit.demo import DemoConfig, run_demo

    overrides = {
        "out_dir": args.out or "runs/demo",
        "seed": args.seed,
        "n_labeled": args.n_labeled,
        "retrain": args.retrain,
        "augment": not args.no_augment,
        "progress": not args.no_progress,
    }
    for name in ("teacher_epochs", "scratch_epochs", "kd_epochs", "temperature"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    report = run_demo(cfg)
    print(report.read_text())
    return 0


def _run_lm(args: argparse.Namespace) -> int:
    from kdkit.run.lm_demo import LMDemoConfig, run_lm_demo

    overrides = {
        "out_dir": args.out or "runs/demo-lm",
        "seed": args.seed,
        "retrain": args.retrain,
        "progress": not args.no_progress,
    }
    cfg = LMDemoConfig.quick(**overrides) if args.quick else LMDemoConfig(**overrides)
    report = run_lm_demo(cfg)
    print(report.read_text())
    return 0
