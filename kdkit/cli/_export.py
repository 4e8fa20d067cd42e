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
    from kdkit.export import export_onnx
    from kdkit.load import load_model

    if (args.onnx is None) == (args.hf is None):
        raise KDError("kdkit export needs one of --onnx PATH or --hf DIR")
    from kdkit.train.rundir import protected_files

    inputs = protected_files(args.checkpoint)  # never written over, whatever the output
    if args.hf is not None:
        from kdkit.run.lm_tools import export_hf

        check_output_path(args.hf, what="--hf", directory=True, inputs=inputs)

        out = export_hf(args.checkpoint, args.hf, trust_code=args.trust_code)
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
    if args.int8:
        return _run_int8(args, module, meta, shape)
    report = export_onnx(
        module,
        args.onnx,
        shape,
        opset=args.opset,
        verify=not args.no_verify,
        atol=args.atol,
        metadata=onnx_metadata(meta),
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


def onnx_metadata(meta: dict) -> dict[str, str]:
    """What a checkpoint knows that the ONNX file should carry: class names (``kdkit.classes``,
    a JSON list) and the input normalisation (``kdkit.mean`` / ``kdkit.std``, JSON lists)."""
    import json

    return {
        f"kdkit.{key}": json.dumps(list(meta[key]))
        for key in ("classes", "mean", "std")
        if meta.get(key)
    }


def _run_int8(args: argparse.Namespace, module, meta: dict, shape) -> int:
    from kdkit.cli._checks import check_range
    from kdkit.cli._eval import _data_section
    from kdkit.run.data import build_data
    from kdkit.run.int8 import export_int8

    check_range(args.min_agreement, 0.0, 1.0, "--min-agreement")
    check_min(args.calibration_samples, 1, "--calibration-samples")
    full = {**meta, "input_shape": list(shape)}  # meta holds the run config
    data_cfg, seed, _ = _data_section(full, args.data)
    data = build_data(data_cfg, seed=seed, classes=meta.get("classes"))
    result = export_int8(
        module,
        args.onnx,
        tuple(shape),
        data,
        metadata=onnx_metadata(meta),
        samples=args.calibration_samples,
        min_agreement=args.min_agreement,
        opset=args.opset,
    )
    size = result.path.stat().st_size / 2**20
    print(
        f"path:         {result.path} (int8, {size:.2f} MiB; fp32 {result.fp32.size_bytes / 2**20:.2f} MiB)"
    )
    print(f"fidelity:     {result.fidelity} (gate: top-1 agreement >= {args.min_agreement:.2%})")
    return 0
