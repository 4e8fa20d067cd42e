"""Teacher inference throughput per backend, as ratios to eager PyTorch measured in the same run.

    python benchmarks/bench_teacher_backends.py             # CPU: resnet50 @224 b32, fmnist_teacher @28 b256
    python benchmarks/bench_teacher_backends.py --gpu       # CUDA: resnet152 @224 b256

CPU mode compares eager fp32, ``torch.compile`` and ONNX Runtime through kdkit's own teacher
backends (``kdkit.bench.bench_model``). GPU mode compares eager fp32, bf16 weights +
channels_last, and bf16 + channels_last + ``torch.compile`` (plus TensorRT fp16 where
tensorrt is installed); it refuses to run without a CUDA device. Models have random weights:
speed does not depend on them. Rows are printed as Markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision

from kdkit.bench import bench_model, describe_device
from kdkit.models import fmnist_teacher
from kdkit.teachers import TorchTeacher


def _cpu_rows(name: str, model: torch.nn.Module, shape, batch: int, args) -> list[str]:
    backends = ["eager", "ort"] + ([] if args.no_compile else ["compiled"])
    t0 = time.perf_counter()
    results = bench_model(
        model,
        shape,
        batch_sizes=(batch,),
        backends=backends,
        repeats=args.repeats,
        warmup=1,
        threads=args.threads,
    )
    eager = next(r for r in results if r.backend == "eager").img_per_s
    rows = []
    for r in results:
        rows.append(
            f"| {name} | {shape[-1]} px | {batch} | {r.backend} | {r.img_per_s:,.1f} "
            f"| {r.img_per_s / eager:.2f}x | {r.peak_mem_mb or 0:,.0f} |"
        )
    print(f"({name}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return rows


def run_cpu(args: argparse.Namespace) -> None:
    threads, load = args.threads or torch.get_num_threads(), os.getloadavg()[0]
    print(
        f"device: {describe_device('cpu')}, torch {torch.__version__}, {threads} threads, "
        f"load average {load:.2f}"
    )
    print("\n| model | input | batch | backend | img/s | vs eager | peak mem (MB) |")
    print("|---|---|---:|---|---:|---:|---:|")
    jobs = [("fmnist_teacher", fmnist_teacher(), (1, 28, 28), 256)]
    if not args.skip_resnet50:
        jobs.append(("resnet50", torchvision.models.resnet50(), (3, 224, 224), 32))
    for name, model, shape, batch in jobs:
        for row in _cpu_rows(name, model.eval(), shape, batch, args):
            print(row, flush=True)


def _cuda_img_per_s(run, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            run(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return x.shape[0] / statistics.median(times)


def run_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device; none is visible here (run the CPU mode instead)")
    batch, shape = 256, (3, 224, 224)
    model = torchvision.models.resnet152().eval().cuda()
    x = torch.randn((batch, *shape), device="cuda")
    variants = {
        "eager fp32": TorchTeacher(model),
        "bf16 + channels_last": TorchTeacher(model, precision="bf16", channels_last=True),
        "bf16 + channels_last + compile": TorchTeacher(
            model, precision="bf16", channels_last=True, compile=True
        ),
    }
    try:
        import tensorrt  # noqa: F401

        from kdkit.export import export_onnx
        from kdkit.teachers import TensorRTTeacher

        onnx_path = os.path.join(args.work, "resnet152.onnx")
        export_onnx(model, onnx_path, shape, verify=False)
        variants["TensorRT fp16"] = TensorRTTeacher(onnx_path, precision="fp16", max_batch=batch)
    except ImportError:
        print("(tensorrt not installed: no TensorRT row)", file=sys.stderr)
    print(f"device: {describe_device('cuda')}, torch {torch.__version__}")
    print("\n| model | input | batch | variant | img/s | vs eager fp32 |")
    print("|---|---|---:|---|---:|---:|")
    base = None
    for name, teacher in variants.items():
        speed = _cuda_img_per_s(lambda t, tch=teacher: tch(t), x, args.repeats)
        base = base or speed
        print(f"| resnet152 | 224 px | {batch} | {name} | {speed:,.0f} | {speed / base:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="resnet152 on CUDA instead of the CPU runs")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (default 3)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow on CPUs)")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--skip-resnet50", action="store_true", help="CPU: fmnist_teacher only")
    p.add_argument("--work", default="/tmp", help="GPU: where the ONNX/engine files go")
    args = p.parse_args()
    run_gpu(args) if args.gpu else run_cpu(args)


if __name__ == "__main__":
    main()
