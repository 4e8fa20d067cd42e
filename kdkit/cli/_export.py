"""``kdkit export CHECKPOINT --onnx out.onnx``: the trained student as a verified ONNX file."""

from __future__ import annotations

import argparse

from kdkit.cli._checks import add_trust_code, check_min, check_shape


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
    add_trust_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit._io import check_output_path
    from kdkit.errors import KDError
    from kdkit.export import export_onnx
    from kdkit.load import load_model

    if (args.onnx is None) == (args.hf is None):
        raise KDError("kdkit export needs one of --onnx PATH or --hf DIR")
    from kdkit.train.rundir import protected_files

    inputs = protected_files(args.checkpoint)  # never written over, whatever the output
    if args.hf is not None:
        from kdkit.run.lm_tools import export_hf

        check_output_path(args.hf, what="--hf", directory=True, inputs=inputs)

        out = export_hf(args.checkpoint, args.hf)
        print(f"wrote {out} (AutoModelForCausalLM.from_pretrained loads it without kdkit)")
        return 0
    check_shape(args.input_shape)
    check_min(args.atol, 0.0, "--atol")
    check_output_path(args.onnx, what="--onnx", inputs=inputs)
    from kdkit.run.models import checkpoint_in  # a run directory -> its best.pt / last.pt

    module, meta = load_model(checkpoint_in(args.checkpoint), trust_code=args.trust_code)
    shape = args.input_shape or meta.get("input_shape")
    if not shape:
        raise KDError(f"{args.checkpoint} records no input_shape; pass --input-shape C H W")
    report = export_onnx(
        module, args.onnx, shape, opset=args.opset, verify=not args.no_verify, atol=args.atol
    )
    diff = "skipped" if report.max_abs_diff is None else f"{report.max_abs_diff:.3g}"
    print(f"path:         {report.path}")
    print(f"size:         {report.size_bytes / 2**20:.2f} MiB")
    print(f"opset:        {report.opset} ({report.exporter} exporter)")
    print(f"input:        {report.input_name} (N, {', '.join(map(str, report.input_shape))})")
    print(f"max abs diff: {diff} (ONNX Runtime vs PyTorch, batch {report.verify_batch})")
    if meta.get("mean") and meta.get("std"):
        print(
            f"note: the model expects input normalised with mean={meta['mean']} std={meta['std']}"
        )
    return 0
