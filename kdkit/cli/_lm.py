"""``kdkit lm capture CONFIG --out DIR``, ``kdkit lm cache info | verify | check DIR``,
``kdkit lm serve CONFIG|MODEL --port P`` and ``kdkit lm vocab-map TEACHER STUDENT``.

Aliases kept from the release where the language-model verbs had their own tree: ``kdkit lm
capture`` is ``kdkit precompute CONFIG`` and ``kdkit lm cache`` is ``kdkit cache`` (each
dispatches through the config's or the cache's recipe). ``kdkit lm serve`` serves a teacher
over HTTP (:mod:`kdkit.run.lm_serve`; docs/lm-serve.md): a teacher source of ``task: lm``, not
a task of its own.
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
    _add_serve(cmds, add_trust_code)
    _add_vocab_map(cmds, add_trust_code)


def _add_vocab_map(cmds: argparse._SubParsersAction, add_trust_code) -> None:
    p = cmds.add_parser(
        "vocab-map",
        help="how a teacher's vocabulary maps onto a student's (cross-tokenizer KD coverage)",
        description="The share of the teacher's probability mass that maps onto the student's "
        "vocabulary exactly, through decomposition and not at all, over a sample of --data "
        "(weighted by the teacher model's predictions when TEACHER has weights, else by token "
        "counts), and the tokens that lose the most. docs/lm-xtok.md.",
    )
    p.add_argument("teacher", metavar="TEACHER", help="hf:DIR or a tokenizer folder")
    p.add_argument("student", metavar="STUDENT", help="hf:DIR or a tokenizer folder")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE", help="text files or globs")
    p.add_argument("--rows", type=int, default=64, help="rows of the sample (64)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per row (256)")
    add_trust_code(p)
    p.set_defaults(func=_run_vocab_map)


def _run_vocab_map(args: argparse.Namespace) -> int:
    from kdkit.errors import KDError
    from kdkit.run.lm_xtok import vocab_map_report

    if args.rows < 1 or args.max_length < 2:
        raise KDError("--rows must be >= 1 and --max-length >= 2")
    lines = vocab_map_report(
        args.teacher,
        args.student,
        data=args.data,
        rows=args.rows,
        max_length=args.max_length,
        trust_code=args.trust_code,
    )
    print("\n".join(lines))
    return 0


def _add_serve(cmds: argparse._SubParsersAction, add_trust_code) -> None:
    p = cmds.add_parser(
        "serve",
        help="serve a teacher over HTTP (kdkit's top-k protocol and vLLM's /v1/completions)",
        description="Serve a teacher to trainers on other machines or processes (teacher: "
        "{model: 'http://HOST:PORT'}). Binds 127.0.0.1 unless --host says otherwise; beyond "
        "loopback a shared token in $KDKIT_TEACHER_TOKEN (--token-env) is required.",
    )
    p.add_argument("teacher", metavar="CONFIG|MODEL",
                   help="a task: lm CONFIG.yaml (its teacher: section) or hf:DIR")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="TCP port (8000; 0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="MODEL only")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="MODEL only")
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="int8: a CONFIG's teacher (its rows gate it)",
    )
    p.add_argument("--token-env", default="KDKIT_TEACHER_TOKEN", metavar="VAR",
                   help="environment variable holding the shared token")  # fmt: skip
    p.add_argument("--name", help="the model name /v1/models reports (the folder's name)")
    p.add_argument("--max-logprobs", type=int, default=20, metavar="K",
                   help="the most prompt_logprobs /v1/completions gives (20, as vLLM)")  # fmt: skip
    p.add_argument("--max-topk", type=int, metavar="K", help="the most top-k /kdkit/v1/topk gives")
    p.add_argument("--max-batch-tokens", type=int, default=1 << 16, metavar="N",
                   help="tokens per request and per merged teacher batch (65536)")  # fmt: skip
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_trust_code(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from kdkit._device import check_device
    from kdkit.errors import KDError

    numbers = {
        "--max-logprobs": args.max_logprobs,
        "--max-topk": args.max_topk,
        "--max-batch-tokens": args.max_batch_tokens,
        "--threads": args.threads,
    }
    for flag, value in numbers.items():
        if value is not None and value < 1:
            raise KDError(f"{flag} must be >= 1, got {value}")
    check_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from kdkit.run.lm_serve import serve_teacher

    serve_teacher(
        args.teacher,
        host=args.host,
        port=args.port,
        token_env=args.token_env,
        name=args.name,
        max_logprobs=args.max_logprobs,
        ready=lambda line: print(line, flush=True),
        overrides=args.overrides,
        dtype=args.dtype,
        backend=args.backend,
        precision=args.precision,
        device=args.device,
        max_topk=args.max_topk,
        max_batch_tokens=args.max_batch_tokens,
        trust_code=args.trust_code,
    )
    return 0
