"""``kdkit bench --teacher X --student Y``: deploy-time speed and memory, side by side."""

from __future__ import annotations

import argparse

from kdkit.cli._checks import add_trust_code, check_device, check_min, check_shape


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="compare teacher and student: params, FLOPs, throughput, latency, memory",
        description="Benchmark a teacher and a student on each backend and batch size; write "
        "bench.md and bench.png (and bench.json with --json) to --out. X and Y may be kdkit "
        "checkpoints, .onnx files, TensorRT engines or model specs (random weights), e.g. "
        "kdkit:fmnist_teacher or torchvision:resnet18.",
    )
    p.add_argument("run", nargs="?", metavar="RUN_DIR",
                   help="a kdkit train run: its teacher and student (instead of --teacher/--student)")  # fmt: skip
    p.add_argument("--teacher", metavar="X")
    p.add_argument("--student", metavar="Y")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="D", help="e.g. 1 28 28")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], metavar="N")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["eager", "ort"],
        choices=["eager", "compiled", "ort", "ort-int8", "tensorrt"],
        help="default: eager ort (compiled is slow to start on CPUs; ort-int8 is ort "
        "statically quantized to int8)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per batch size")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--json", action="store_true", help="also write bench.json and print JSON")
    p.add_argument(
        "--out",
        help="output directory (default: RUN_DIR/bench for a run, else "
        "runs/bench/TEACHER-vs-STUDENT: each comparison in a folder of its own)",
    )
    add_trust_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from kdkit._io import atomic_write_text, check_output_path
    from kdkit.bench import (
        bench_model,
        compare,
        describe_device,
        plot_comparison,
        resolve_model,
        results_to_json,
    )
    from kdkit.errors import KDError

    if args.run is not None:  # a run directory names both models
        from kdkit.run.recipes import recipe_for_run

        recipe = recipe_for_run(args.run)
        args.teacher, args.student, shape = recipe.bench_models(
            args.run, trust_code=args.trust_code
        )
        args.input_shape = args.input_shape or shape
    elif args.teacher is None or args.student is None:
        raise KDError("kdkit bench needs RUN_DIR, or --teacher X and --student Y")
    teacher_label = args.teacher if isinstance(args.teacher, str) else f"{args.run} (teacher)"
    check_shape(args.input_shape)
    check_device(args.device)
    check_min(args.repeats, 1, "--repeats")
    check_min(args.threads, 1, "--threads")
    check_min(min(args.batch_sizes), 1, "--batch-sizes")
    out_dir = args.out or default_out(args.run, args.teacher, args.student)
    out = check_output_path(out_dir, what="--out", directory=True)  # before the measurements
    common = {
        "input_shape": args.input_shape,
        "batch_sizes": args.batch_sizes,
        "backends": args.backends,
        "device": args.device,
        "repeats": args.repeats,
        "threads": args.threads,
        "trust_code": args.trust_code,
    }
    # both models load (and are refused) before either is measured
    sources = [
        resolve_model(m, n, trust_code=args.trust_code)
        for m, n in ((args.teacher, "teacher"), (args.student, "student"))
    ]
    for src in sources:
        if args.input_shape is None and not src.input_shape:
            raise KDError(f"{src.name} records no input shape; pass --input-shape C H W")
    teacher = bench_model(sources[0], **common)
    student = bench_model(sources[1], **common)
    device = describe_device(args.device)
    table = compare(teacher, student)
    md = out / "bench.md"
    atomic_write_text(
        md,
        f"# teacher vs student\n\nteacher: `{teacher_label}`  \nstudent: `{args.student}`  \n"
        f"device: {device}, {args.repeats} timed calls per row\n\n{table}\n\n![bench](bench.png)\n",
    )
    plot_comparison(teacher, student, out / "bench.png", title=f"teacher vs student, {device}")
    if args.json:
        data = {"device": device, **results_to_json(teacher, student)}
        atomic_write_text(out / "bench.json", json.dumps(data, indent=1))
        print(json.dumps(data, indent=1))
    else:
        print(table)
        print(f"\nwrote {md} and {out / 'bench.png'}")
    return 0


def default_out(run: str | None, teacher: object, student: object) -> str:
    """``RUN_DIR/bench``, or ``runs/bench/TEACHER-vs-STUDENT`` from the two names (a file's
    stem, a spec's model name), so one comparison never overwrites another's files."""
    from pathlib import Path

    if run is not None:
        return str(Path(run) / "bench")

    def label(model: object) -> str:
        text = str(model).rstrip("/")
        stem = Path(text).stem if ("/" in text or "." in Path(text).name) else text
        name = stem.rpartition(":")[2] or "model"
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)

    return str(Path("runs") / "bench" / f"{label(teacher)}-vs-{label(student)}")
