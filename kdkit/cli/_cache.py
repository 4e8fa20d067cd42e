"""``kdkit cache info | verify | check DIR``: inspect a teacher cache of any task.

The cache's format (read from its manifest file) names its task's recipe, which does the
job: an image cache (``meta.json`` of ``kdkit precompute``) or a ``task: lm`` top-k cache
(``manifest.json``). ``kdkit lm cache ...`` is the same verb.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.errors import KDError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kdkit.cli._checks import add_trust_code
    from kdkit.cli._precompute import add_teacher_args

    p = sub.add_parser("cache", help="verify, check or describe a teacher cache (any task)")
    cmds = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    info = cmds.add_parser("info", help="print what the cache holds")
    info.add_argument("dir")
    info.set_defaults(func=run_info)
    verify = cmds.add_parser(
        "verify",
        help="check the manifest, shard sizes and sha256 checksums (task: lm: also row hashes; "
        "with --teacher MODEL also recompute rows)",
    )
    verify.add_argument("dir")
    verify.add_argument("--teacher", metavar="MODEL", help="task: lm: hf:DIR to recompute rows")
    add_lm_check_args(verify)
    add_trust_code(verify)
    verify.set_defaults(func=run_verify)
    check = cmds.add_parser(
        "check",
        help="compare the cache with the live teacher on a probe",
        description="Images: DIR --teacher FILE (the older form), or CONFIG.yaml (a kdkit "
        "train config): its live teacher (or, for teacher cache:DIR, the one the cache was "
        "precomputed with), training data, views and normalisation against the cache "
        "(--cache DIR, else the config's cache:DIR, else RUN_DIR-teacher-cache). task: lm "
        "caches: DIR, recomputing --rows rows with the teacher the cache records (or "
        "--teacher hf:DIR); exit 1 above the thresholds.",
    )
    check.add_argument("dir", metavar="DIR_OR_CONFIG")
    check.add_argument("--cache", metavar="DIR", help="with CONFIG: the cache to check")
    check.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="with CONFIG: override a key")  # fmt: skip
    add_teacher_args(check, required=False)
    check.add_argument("--data", help="dataset (default: the one recorded at precompute)")
    check.add_argument("--n-probe", type=int, help="images: (index, view) pairs probed (256)")
    check.add_argument(
        "--max-disagreement", type=float, help="images: top-1 disagreement allowed (0.01)"
    )
    add_lm_check_args(check)
    check.set_defaults(func=run_check)


def add_lm_check_args(p: argparse.ArgumentParser) -> None:
    """The thresholds of a check (``--max-kl`` for both formats; the rest task: lm's)."""
    p.add_argument("--rows", type=int, help="task: lm: rows to recompute (16)")
    p.add_argument("--max-dlogp", type=float, help="task: lm: threshold on max |d logp| (0.1)")
    p.add_argument(
        "--max-kl", type=float, help="threshold on the mean KL (images 0.01, task: lm 1e-3)"
    )


def _options(args: argparse.Namespace) -> dict:
    keys = ("teacher", "arch", "device", "trust_code", "data", "cache", "n_probe")
    keys += ("max_disagreement", "max_kl", "rows", "max_dlogp")
    return {k: getattr(args, k, None) for k in keys}


def run_info(args: argparse.Namespace) -> int:
    from kdkit.run.recipes import recipe_for_cache

    print("\n".join(recipe_for_cache(args.dir).cache_info(Path(args.dir))))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from kdkit.run.recipes import recipe_for_cache

    lines, code = recipe_for_cache(args.dir).cache_verify(Path(args.dir), _options(args))
    print("\n".join(lines))
    return code


def run_check(args: argparse.Namespace) -> int:
    from kdkit._args import check_min
    from kdkit.run.recipes import recipe_for, recipe_for_cache

    check_min(args.rows, 1, "--rows")
    options = _options(args)
    if Path(args.dir).suffix in (".yaml", ".yml"):  # the run's own views, data and cache
        from kdkit.config import load_resolved

        if args.teacher is not None:
            raise KDError("with CONFIG the teacher is its teacher: section; drop --teacher")
        cfg = load_resolved(args.dir, getattr(args, "overrides", ()))
        recipe, target, options["config"] = recipe_for(cfg), Path(args.dir), cfg
    else:
        recipe, target = recipe_for_cache(args.dir), Path(args.dir)
    lines, code = recipe.cache_check(target, options)
    print("\n".join(lines))
    return code
