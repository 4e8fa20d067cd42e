"""``kdkit lm generate CONFIG --prompts FILE --out DIR`` (and ``--score FILE``): a config's
teacher writes completions and, in the same pass, their top-k targets; or scores completions it
did not write. The config's recipe does it (:mod:`kdkit.run.lm_generate`)."""

from __future__ import annotations

import argparse

from kdkit.cli._checks import add_trust_code, check_device

__all__ = ["add_generate_parser"]

#: the flags the recipe reads
_OPTIONS = (
    "prompts", "score", "out", "n", "temperature", "top_p", "max_new_tokens", "seed", "topk",
    "encoding", "shard_rows", "batch_size", "keep_unfinished", "keep_duplicates", "device",
    "any_tokenization",
)  # fmt: skip


def add_generate_parser(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "generate",
        help="the teacher writes completions for prompts and, in the same pass, their top-k "
        "targets (a cache:DIR); --score FILE: only the targets of completions it did not write",
        description='Sample completions from the config\'s teacher (prompts JSONL: {"prompt"} '
        'for data.format prompt_completion, {"messages"} for chat) into OUT/data/*.jsonl and '
        "keep the teacher's top-k log-probs of every trained token at distill.temperature in OUT "
        "(a kdkit-lm-topk cache whose rows are those kdkit train builds from OUT/data). "
        "Resumable and safe under kill -9: run the same command again to continue.",
    )
    p.add_argument("config", help="the task: lm config training will use (teacher, data, distill)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE", help="prompts JSONL to complete")
    source.add_argument(
        "--score", metavar="FILE", help="completions JSONL (data.format) to score: cache only"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the output folder (a cache)")
    p.add_argument("--n", type=int, metavar="N", help="samples per prompt (1)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0: greedy (1)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (1: off)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="longest completion (256)")
    p.add_argument("--seed", type=int, help="sampling seed; sample j of prompt i is seeded (0)")
    p.add_argument("--topk", type=int, metavar="K", help="target entries per token (32)")
    p.add_argument("--encoding", choices=("q8", "f16"), help="log-probs on disk (q8)")
    p.add_argument("--shard-rows", type=int, metavar="N", help="rows per shard and part (256)")
    p.add_argument("--batch-size", type=int, metavar="N", help="sequences per teacher batch "
                   "(data.batch_size)")  # fmt: skip
    p.add_argument("--keep-unfinished", action="store_true",
                   help="keep completions that hit --max-new-tokens (dropped by default: the "
                   "data appends an end to every completion)")  # fmt: skip
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep a prompt's identical completions (dropped by default)")  # fmt: skip
    p.add_argument("--any-tokenization", action="store_true",
                   help="sample any token sequence; by default a token whose completion would "
                   "tokenize otherwise once written is drawn again (so its targets are kept)")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (train.device, else cuda if any)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.config import parse_config
    from kdkit.run.recipes import recipe_for

    check_device(args.device)
    options = {k: getattr(args, k) for k in _OPTIONS}
    options["progress"] = not args.no_progress
    options["trust_code"] = args.trust_code
    recipe = recipe_for(parse_config(args.config, args.overrides))
    print("\n".join(recipe.generate(args.config, args.overrides, options)))
    return 0
