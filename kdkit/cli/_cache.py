"""``kdkit cache verify | check | info DIR``: inspect a teacher cache."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kdkit.cli._precompute import add_teacher_args

    p = sub.add_parser("cache", help="verify, check or describe a teacher cache")
    cmds = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    verify = cmds.add_parser("verify", help="check meta, shard sizes and sha256 checksums")
    verify.add_argument("dir")
    verify.set_defaults(func=run_verify)
    info = cmds.add_parser("info", help="print what the cache holds")
    info.add_argument("dir")
    info.set_defaults(func=run_info)
    check = cmds.add_parser(
        "check",
        help="compare the cache with the live teacher on a probe of (index, view)",
        description="DIR --teacher FILE: the older form. CONFIG.yaml (a kdkit train config): "
        "its live teacher (or, for teacher cache:DIR, the one the cache was precomputed "
        "with), training data, views and normalisation against the cache (--cache DIR, "
        "else the config's cache:DIR, else RUN_DIR-teacher-cache).",
    )
    check.add_argument("dir", metavar="DIR_OR_CONFIG")
    check.add_argument("--cache", metavar="DIR", help="with CONFIG: the cache to check")
    check.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="with CONFIG: override a key")  # fmt: skip
    add_teacher_args(check, required=False)
    check.add_argument("--data", help="dataset (default: the one recorded at precompute)")
    check.add_argument("--n-probe", type=int, default=256)
    check.add_argument("--max-disagreement", type=float, default=0.01)
    check.add_argument("--max-kl", type=float, default=0.01)
    check.set_defaults(func=run_check)


def run_verify(args: argparse.Namespace) -> int:
    from kdkit.cache import verify

    meta = verify(args.dir)
    print(f"ok: {args.dir}: {len(meta['shards'])} shards, {meta['num_samples']} samples")
    return 0


def _size_bytes(directory: str) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def run_info(args: argparse.Namespace) -> int:
    from kdkit._cache_meta import read_meta  # the standard library only: no torch to import

    meta = read_meta(args.dir)
    size = _size_bytes(args.dir)
    rows = meta["num_samples"] * meta["num_views"]
    kind = f"top-{meta['topk']} ({meta['index_dtype']} indices)" if meta["topk"] else "full"
    lines = [
        f"cache           {args.dir} (format version {meta['format_version']})",
        f"samples         {meta['num_samples']} x {meta['num_views']} views",
        f"logits          {kind}, {meta['dtype']} values, {meta['num_classes']} classes",
        f"views           {meta['views']}",
        f"normalization   {meta.get('normalization')}",
        f"features        {meta.get('features') or 'none (logits only)'}",
        f"teacher         {meta['teacher_fingerprint'][:16]}...",
        f"dataset         {meta['dataset_fingerprint'][:16]}...",
        f"shards          {len(meta['shards'])} of <= {meta['shard_size']} samples",
        f"size on disk    {size / 2**20:.1f} MiB ({size / rows:.1f} bytes per sample-view)",
        f"source          {meta.get('source')}",
    ]
    print("\n".join(lines))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from kdkit.cache import check, read_meta
    from kdkit.cli._checks import check_min, check_range
    from kdkit.cli._precompute import load_data, load_teacher
    from kdkit.errors import KDError

    check_min(args.n_probe, 1, "--n-probe")
    check_range(args.max_disagreement, 0.0, 1.0, "--max-disagreement")
    check_min(args.max_kl, 0.0, "--max-kl")
    if Path(args.dir).suffix in (".yaml", ".yml"):
        return _check_config(args)
    if args.teacher is None:
        raise KDError("kdkit cache check DIR needs --teacher FILE (or give a CONFIG.yaml)")
    meta = read_meta(args.dir)
    data = args.data or (meta.get("source") or {}).get("data")
    if not data:
        raise KDError("the cache records no dataset; pass --data")
    dataset, _, _ = load_data(data)
    teacher = load_teacher(args.teacher, args.arch, args.device, args.trust_code)
    report = check(
        args.dir,
        teacher,
        dataset,
        n_probe=args.n_probe,
        max_disagreement=args.max_disagreement,
        max_kl=args.max_kl,
        device=args.device,
    )
    print(f"ok: {report}")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    """``kdkit cache check CONFIG``: the run's own views, normalisation and data."""
    from kdkit.cache import check
    from kdkit.cache.match import check_expectations
    from kdkit.cli._precompute import config_of
    from kdkit.run.cache_job import cache_plan, default_cache_dir

    args.config = args.dir
    cfg = config_of(args)
    prefix, _, cache_dir = cfg.teacher.model.partition(":") if cfg.teacher else ("", "", "")
    out = args.cache or (cache_dir if prefix == "cache" else str(default_cache_dir(cfg)))
    plan = cache_plan(cfg, trust_code=args.trust_code)
    from kdkit.cache import read_meta

    check_expectations(read_meta(out), expect_views=plan.views or False)  # one line of keys
    report = check(
        out, plan.teacher, plan.dataset, n_probe=args.n_probe, views=plan.views,
        mean=plan.mean, std=plan.std, max_disagreement=args.max_disagreement,
        max_kl=args.max_kl, device=args.device or cfg.train.device,
    )  # fmt: skip
    print(f"ok: {out}: {report}")
    return 0
