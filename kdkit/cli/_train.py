"""``kdkit train CONFIG.yaml``: one distillation job from one config file."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kdkit.cli._checks import add_trust_code

    p = sub.add_parser(
        "train",
        help="distill a teacher into a student as a YAML config describes",
        description="Validate CONFIG (every key, name and path) before building anything, then "
        "train into a run directory (default runs/NAME): config.yaml, metrics.csv, last.pt, "
        "best.pt, report.md, curves.png. Works the same under torchrun --nproc_per_node N. "
        "Start from a template: kdkit init.",
    )
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. --set train.epochs=1 --set distill.pairs.0.args.temperature=2 "
        "(the value is read as YAML); repeatable",
    )
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default: runs/NAME)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run directory exactly; its saved config is used, and a "
        "different CONFIG is refused with the differing keys listed, except a larger "
        "train.epochs (--set train.epochs=N extends a finished run)",
    )
    p.add_argument(
        "--init-from",
        metavar="RUN",
        help="start a new run from another run's best student (its best.pt, else last.pt, "
        "as student.weights)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved, validated config and exit (writes nothing)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (the same as --set train.progress=false)",
    )
    add_trust_code(p)
    p.set_defaults(func=run)


def resolved_config(args: argparse.Namespace):
    """CONFIG + --set + --run-dir -> validated config with absolute paths."""
    import dataclasses
    import os
    from pathlib import Path

    from kdkit.config import load_resolved, parse_config, read_yaml, resolve_paths, validate
    from kdkit.errors import KDError

    if getattr(args, "no_progress", False):
        args.overrides = [*args.overrides, "train.progress=false"]
    if args.init_from is not None:
        if args.resume:
            raise KDError("--init-from starts a new run; --resume continues one: pick one")
        from kdkit.run.models import checkpoint_in

        weights = os.path.abspath(checkpoint_in(args.init_from))
        args.overrides = [*args.overrides, f"student.weights={weights}"]
    if args.config is not None:  # relative paths: from the config file's folder
        return load_resolved(args.config, args.overrides, run_dir=args.run_dir)
    if not (args.resume and args.run_dir):
        raise KDError("kdkit train needs CONFIG.yaml (or --resume --run-dir DIR)")
    saved = Path(args.run_dir) / "config.yaml"
    if not saved.is_file():
        raise KDError(f"nothing to resume in {args.run_dir}: it has no config.yaml")
    cfg = parse_config(data=read_yaml(saved), overrides=args.overrides)
    cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
    return validate(resolve_paths(cfg))  # saved configs hold absolute paths


def run(args: argparse.Namespace) -> int:
    from kdkit.config import to_yaml
    from kdkit.config._machine import check_machine
    from kdkit.run import train_run

    cfg = resolved_config(args)
    check_machine(cfg)  # this machine: timm names, a CUDA device, fp16 on the CPU
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    result = train_run(cfg, resume=args.resume, trust_code=args.trust_code)
    from kdkit.run.recipes import recipe_for
    from kdkit.train import distributed

    if distributed.is_main():
        print("\n".join(recipe_for(cfg).summary(result)))
    return 0
