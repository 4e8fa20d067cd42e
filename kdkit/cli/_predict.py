"""``kdkit predict RUN_OR_CHECKPOINT_OR_ONNX IMAGES_OR_FOLDERS...``: class names and
probabilities for your photos."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kdkit.cli._checks import add_trust_code

    p = sub.add_parser(
        "predict",
        help="label images with a trained student (run directory, checkpoint or .onnx)",
        description="Print the top classes and probabilities of each image, preprocessed as "
        "the run evaluated them (shorter side to the recorded input size, center crop, the "
        "run's mean/std). Folders are searched at any depth; unreadable files are skipped "
        "and named.",
    )
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT_OR_ONNX")
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS")
    p.add_argument("--topk", type=int, default=3, help="classes per image (default: 3)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list")
    fmt.add_argument("--csv", action="store_true", help="print CSV: path,rank,class,index,prob")
    p.add_argument("--device", help="cpu or cuda[:N] (checkpoints; default: cpu)")
    add_trust_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import csv
    import json
    import sys

    from kdkit.cli._checks import check_device
    from kdkit.run.predict import image_paths, predict_paths
    from kdkit.run.recipes import recipe_for_run

    options = {"trust_code": args.trust_code, "device": check_device(args.device) or "cpu"}
    predictor = recipe_for_run(args.model).predict(args.model, options)
    predictions = predict_paths(predictor, image_paths(args.images), args.topk)
    if args.json:
        rows = [
            {"path": p.path, "top": [{"class": c, "index": i, "prob": v} for c, i, v in p.top]}
            for p in predictions
        ]
        print(json.dumps(rows, indent=1))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "class", "index", "prob"])
        for p in predictions:
            for rank, (c, i, v) in enumerate(p.top, 1):
                writer.writerow([p.path, rank, c, i, f"{v:.6f}"])
    else:
        for p in predictions:
            print(p.path + "  " + "  ".join(f"{c} {v:.3f}" for c, _, v in p.top))
    if predictor.unreadable.count:
        print(f"kdkit: {predictor.unreadable.summary()}", file=sys.stderr)
    return 0
