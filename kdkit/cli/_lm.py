"""``kdkit lm capture CONFIG --out DIR`` and ``kdkit lm cache info | verify | check DIR``."""

from __future__ import annotations

import argparse

from kdkit.cli._checks import add_trust_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lm", help="language-model tools: capture a top-k teacher cache, inspect it")
    cmds = p.add_subparsers(dest="lm_command", required=True, metavar="ACTION")
    cap = cmds.add_parser(
        "capture",
        help="run the teacher of a task: lm config over its corpus once; write a top-k cache",
        description="Resumable and safe under kill -9: run the same command again to finish. "
        "Train from it with teacher: {model: 'cache:DIR'}.",
    )
    cap.add_argument("config", help="a task: lm YAML config (its teacher and data sections)")
    cap.add_argument("--out", required=True, metavar="DIR", help="the cache folder")
    cap.add_argument("--topk", type=int, default=32, metavar="K", help="entries per token (32)")
    cap.add_argument(
        "--encoding",
        choices=("q8", "f16"),
        default="q8",
        help="log-probs: q8 (8-bit offsets below the top, per-token scale) or f16 (default q8)",
    )
    cap.add_argument("--temperature", type=float, default=1.0, help="capture temperature (1)")
    cap.add_argument("--shard-rows", type=int, default=256, metavar="N", help="rows per shard")
    cap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust_code(cap)
    cap.set_defaults(func=run_capture)

    cache = cmds.add_parser("cache", help="describe, verify or check a top-k teacher cache")
    actions = cache.add_subparsers(dest="cache_action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="bytes per token, settings, top-k mass histogram")
    info.add_argument("dir")
    info.set_defaults(func=run_info)
    for name, text in (
        ("verify", "checksums and row hashes; with --teacher also recompute rows"),
        ("check", "recompute sampled rows with the live teacher; non-zero exit above threshold"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("dir")
        a.add_argument(
            "--teacher",
            metavar="MODEL",
            help="hf:DIR of the live teacher (check: default the one the cache records)",
        )
        a.add_argument("--rows", type=int, default=16, help="rows to recompute (16)")
        a.add_argument("--max-dlogp", type=float, default=0.1, help="threshold on max |d logp|")
        a.add_argument("--max-kl", type=float, default=1e-3, help="threshold on the mean KL")
        add_trust_code(a)
        a.set_defaults(func=run_verify if name == "verify" else run_check)


def run_capture(args: argparse.Namespace) -> int:
    from kdkit.config import LMRunConfig, load_config, resolve_paths, validate
    from kdkit.errors import KDError
    from kdkit.lm.cache import capture

    cfg = validate(resolve_paths(load_config(args.config, args.overrides)))
    if not isinstance(cfg, LMRunConfig):
        raise KDError("kdkit lm capture takes a task: lm config (kdkit precompute for images)")
    m = capture(
        cfg,
        args.out,
        topk=args.topk,
        encoding=args.encoding,
        temperature=args.temperature,
        shard_rows=args.shard_rows,
        progress=not args.no_progress,
        trust_code=args.trust_code,
    )
    print(
        f"captured {m['num_rows']} rows ({m['entries']} tokens) into {args.out}: "
        f"{m['bytes_per_token']:.1f} bytes per token; train with teacher: "
        f"{{model: 'cache:{args.out}'}}"
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from kdkit.lm.cache.inspect import info_lines

    print("\n".join(info_lines(args.dir)))
    return 0


def _check(args: argparse.Namespace, model: str) -> int:
    from kdkit.lm.cache.inspect import check
    from kdkit.lm.models import freeze_teacher, load_lm

    teacher, tok = load_lm(model, trust_code=args.trust_code)
    pad = 0 if tok is None else (tok.pad_token_id or tok.eos_token_id or 0)
    r = check(args.dir, freeze_teacher(teacher), rows=args.rows, pad_id=int(pad))
    ok = r["max_abs_dlogp"] <= args.max_dlogp and r["mean_kl"] <= args.max_kl
    weights = "same weights as captured" if r["same_weights"] else "OTHER weights than captured"
    print(
        f"{'ok' if ok else 'MISMATCH'}: {r['rows']} rows, {r['tokens']} tokens recomputed with "
        f"{model} ({weights}): max |d logp| {r['max_abs_dlogp']:.4g} (<= {args.max_dlogp:g}), "
        f"mean KL {r['mean_kl']:.3g} (<= {args.max_kl:g})"
    )
    return 0 if ok else 1


def run_verify(args: argparse.Namespace) -> int:
    from kdkit.lm.cache.inspect import verify

    cache = verify(args.dir)
    print(f"ok: {args.dir}: {len(cache.shards)} shards, {len(cache)} rows, checksums and hashes")
    return _check(args, args.teacher) if args.teacher else 0


def run_check(args: argparse.Namespace) -> int:
    from kdkit.lm.cache.reader import TopKCache

    return _check(args, args.teacher or TopKCache(args.dir).manifest["teacher"]["model"])
