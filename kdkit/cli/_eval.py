"""``kdkit eval RUN_DIR_OR_CHECKPOINT``: a trained student's scores, by its run's task
(images: top-1 / top-5 / loss; task: lm: perplexity, agreement with the teacher, KL)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kdkit.cli._checks import add_trust_code

    p = sub.add_parser(
        "eval",
        help="evaluate a run's student (and teacher) on its val data or other data",
        description="Rebuild the student from a run directory (best.pt, else last.pt) or a "
        "checkpoint and score it on the run's val data; --data KEY=VALUE changes the data "
        "section (keys as under data:, e.g. --data val.image_folder=data/test).",
    )
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data: key, e.g. val.fashion_mnist=test; repeatable")  # fmt: skip
    p.add_argument("--teacher", action="store_true", help="also evaluate the run's teacher")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    add_trust_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from kdkit.cli._checks import check_device
    from kdkit.load import load_checkpoint
    from kdkit.run.models import checkpoint_in
    from kdkit.run.predict import run_classes
    from kdkit.run.recipes import recipe_for

    path = checkpoint_in(args.run)
    meta = {k: v for k, v in load_checkpoint(path).items() if not isinstance(v, dict) or k in
            ("config", "teacher_spec")}  # fmt: skip
    if meta.get("classes") is None:  # older checkpoints: the run directory's classes.json
        meta["classes"] = run_classes(path)
    device = torch.device(
        check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    recipe = recipe_for(meta)  # the task the checkpoint's config records
    scores = recipe.evaluate(
        path, meta, device=device, data=args.data, teacher=args.teacher, trust_code=args.trust_code
    )
    if args.json:
        print(json.dumps({"checkpoint": str(path), **scores}, indent=1))
        return 0
    print(f"checkpoint: {path}")
    print("\n".join(recipe.score_lines(scores)))
    return 0
