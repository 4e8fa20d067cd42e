"""``kdkit lm capture CONFIG --out DIR`` and ``kdkit lm cache info | verify | check DIR``.

Aliases kept from the release where the language-model verbs had their own tree: ``kdkit lm
capture`` is ``kdkit precompute CONFIG`` and ``kdkit lm cache`` is ``kdkit cache`` (each
dispatches through the config's or the cache's recipe).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kdkit.cli._cache import add_lm_check_args, run_check, run_info, run_verify
    from kdkit.cli._checks import add_trust_code
    from kdkit.cli._generate import add_generate_parser
    from kdkit.cli._precompute import add_lm_capture_args, run_config

    p = sub.add_parser(
        "lm", help="language-model tools (aliases): capture a top-k teacher cache, inspect it"
    )
    cmds = p.add_subparsers(dest="lm_command", required=True, metavar="ACTION")
    cap = cmds.add_parser(
        "capture",
        help="kdkit precompute CONFIG: run a config's teacher over its corpus; write a top-k cache",
        description="The same as kdkit precompute CONFIG. Resumable and safe under kill -9: "
        "run the same command again to finish. Train from it with teacher: {model: 'cache:DIR'}.",
    )
    cap.add_argument("config", help="a task: lm YAML config (its teacher and data sections)")
    cap.add_argument("--out", required=True, metavar="DIR", help="the cache folder")
    cap.add_argument("--topk", type=int, metavar="K", help="entries per token (32)")
    add_lm_capture_args(cap)
    cap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust_code(cap)
    cap.set_defaults(func=run_config)
    add_generate_parser(cmds)

    cache = cmds.add_parser("cache", help="kdkit cache: describe, verify or check a cache")
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
        add_lm_check_args(a)
        add_trust_code(a)
        a.set_defaults(func=run_verify if name == "verify" else run_check)
