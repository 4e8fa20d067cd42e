"""Deploy comparison of the demo's teacher and student through ``kdkit.bench``.

    python benchmarks/bench_deploy.py [--out runs/bench-deploy] [--repeats 30]

fmnist_teacher (ResNet-style, 1.2M parameters) vs fmnist_student (plain CNN, 99k) on
28x28 input, eager PyTorch and ONNX Runtime, batch 1 / 8 / 64. Prints the Markdown table
of :func:`kdkit.bench.compare` and writes it with a bar chart to ``--out``. Random weights:
speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from kdkit.bench import bench_model, compare, describe_device, plot_comparison
from kdkit.models import fmnist_student, fmnist_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/bench-deploy")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--backends", nargs="+", default=["eager", "ort"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    args = p.parse_args()
    common = {
        "input_shape": (1, 28, 28),
        "batch_sizes": args.batch_sizes,
        "backends": args.backends,
        "device": args.device,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    torch.manual_seed(0)
    teacher = bench_model(fmnist_teacher(), name="fmnist_teacher", **common)
    student = bench_model(fmnist_student(), name="fmnist_student", **common)
    device = describe_device(args.device)
    header = (
        f"device: {device}, torch {torch.__version__}, {args.threads or torch.get_num_threads()} "
        "threads, "
        f"load average {os.getloadavg()[0]:.2f}, {args.repeats} timed calls per row"
    )
    table = compare(teacher, student)
    print(header + "\n\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(header + "\n\n" + table + "\n")
    plot_comparison(
        teacher, student, out / "bench.png", title=f"fmnist teacher vs student, {device}"
    )


if __name__ == "__main__":
    main()
