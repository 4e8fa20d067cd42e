"""``kdkit export CHECKPOINT --onnx out.onnx``: the trained student as a verified ONNX file."""

from __future__ import annotations

import argparse

from kdkit.cli._checks import add_trust_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained student checkpoint to ONNX (verified with ONNX Runtime)",
        description="Rebuild the student from a kdkit checkpoint, export it with a dynamic "
        "batch axis and check ONNX Runtime against PyTorch on a random batch.",
    )
    p.add_argument(
        "checkpoint",
        help="a kdkit checkpoint (e.g. best.pt from a Trainer, or a teacher.pt) or a kdkit "
        "train run directory (its best.pt, else last.pt)",
    )
    p.add_argument("--onnx", metavar="PATH", help="where to write the .onnx file")
    p.add_argument(
        "--hf",
        metavar="DIR",
        help="task: lm runs: write the student as a save_pretrained folder (safetensors)",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="with --hf, a LoRA student (student.peft): save the adapter alone instead of "
        "the model with the adapter merged into it",
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: 17)")
    p.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        metavar="D",
        help="one sample's shape, e.g. 1 28 28 (default: the checkpoint's input_shape)",
    )
    p.add_argument("--atol", type=float, default=1e-4, help="refuse a larger max abs difference")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check")
    p.add_argument(
        "--int8",
        action="store_true",
        help="write the ONNX Runtime int8 student (what kdkit bench's ort-int8 measures), "
        "calibrated on the run's training images and kept only if it agrees with fp32 on "
        "its val images (--min-agreement)",
    )
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="--int8: least top-1 agreement with fp32 (default: 0.99)")  # fmt: skip
    p.add_argument("--calibration-samples", type=int, default=512,
                   help="--int8: training images that calibrate (default: 512)")  # fmt: skip
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="--int8: override a data: key, as for kdkit eval")  # fmt: skip
    add_trust_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit._io import check_output_path
    from kdkit.errors import KDError
    from kdkit.run.recipes import recipe_for_run
    from kdkit.train.rundir import protected_files

    if (args.onnx is None) == (args.hf is None):
        raise KDError("kdkit export needs one of --onnx PATH or --hf DIR")
    if args.adapter and args.hf is None:
        raise KDError("--adapter goes with --hf DIR (a task: lm run's LoRA student)")
    inputs = protected_files(args.checkpoint)  # never written over, whatever the output
    if args.hf is not None:
        check_output_path(args.hf, what="--hf", directory=True, inputs=inputs)
    else:
        check_output_path(args.onnx, what="--onnx", inputs=inputs)
    options = dict(vars(args))
    print("\n".join(recipe_for_run(args.checkpoint).export(args.checkpoint, options)))
    return 0
