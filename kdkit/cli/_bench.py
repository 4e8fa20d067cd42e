"""``kdkit bench --teacher X --student Y``: deploy-time speed and memory, side by side."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="compare teacher and student: params, FLOPs, throughput, latency, memory",
        description="Benchmark a teacher and a student on each backend and batch size; write "
        "bench.md and bench.png (and bench.json with --json) to --out. X and Y may be kdkit "
        "checkpoints, .onnx files, TensorRT engines or 'package.module:factory' (random "
        "weights), e.g. kdkit.models:fmnist_teacher.",
    )
    p.add_argument("--teacher", required=True, metavar="X")
    p.add_argument("--student", required=True, metavar="Y")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="D", help="e.g. 1 28 28")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], metavar="N")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["eager", "ort"],
        choices=["eager", "compiled", "ort", "tensorrt"],
        help="default: eager ort (compiled is slow to start on CPUs)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per batch size")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--json", action="store_true", help="also write bench.json and print JSON")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from kdkit.bench import bench_model, compare, describe_device, plot_comparison, results_to_json

    common = {
        "input_shape": args.input_shape,
        "batch_sizes": args.batch_sizes,
        "backends": args.backends,
        "device": args.device,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    teacher = bench_model(args.teacher, name="teacher", **common)
    student = bench_model(args.student, name="student", **common)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = describe_device(args.device)
    table = compare(teacher, student)
    md = out / "bench.md"
    md.write_text(
        f"# teacher vs student\n\nteacher: `{args.teacher}`  \nstudent: `{args.student}`  \n"
        f"device: {device}, {args.repeats} timed calls per row\n\n{table}\n\n![bench](bench.png)\n"
    )
    plot_comparison(teacher, student, out / "bench.png", title=f"teacher vs student, {device}")
    if args.json:
        data = {"device": device, **results_to_json(teacher, student)}
        (out / "bench.json").write_text(json.dumps(data, indent=1))
        print(json.dumps(data, indent=1))
    else:
        print(table)
        print(f"\nwrote {md} and {out / 'bench.png'}")
    return 0
