"""Teacher-cache benchmarks: size on disk, random-read throughput, Fashion-MNIST replay.

    python benchmarks/bench_cache.py size     # bytes per sample: full fp16 vs top-k (1000 classes)
    python benchmarks/bench_cache.py read     # random batches of 256 from a ~1.1 GB cache
    python benchmarks/bench_cache.py fmnist   # online vs cached teacher: epoch time, accuracy
    python benchmarks/bench_cache.py all

Results are printed as markdown rows and written as JSON under ``--out``. The read benchmark
writes a synthetic cache under ``--work`` (default /tmp) and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from kdkit.cache import CachedTeacher, precompute, read_meta
from kdkit.data import ArrayDataset, ViewSampler, prepare_input

log = logging.getLogger("bench_cache")


def _device_line() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.python_version()}"


def _synthetic(n: int, num_classes: int, seed: int = 0) -> tuple[ArrayDataset, nn.Module]:
    """n tiny 1x4x4 images and a linear 'teacher' with ``num_classes`` outputs (cheap to run)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    torch.manual_seed(seed)
    return ArrayDataset(images, torch.zeros(n, dtype=torch.int64)), nn.Sequential(
        nn.Flatten(), nn.Linear(16, num_classes)
    )


# -- size ------------------------------------------------------------------------------------
def bytes_per_sample_view(num_classes: int, topk: int | None, dtype: str = "fp16") -> int:
    """From the format: values (fp16/fp32) plus, for top-k, int16 (<= 32768 classes) indices."""
    value_bytes = 2 if dtype == "fp16" else 4
    if topk is None:
        return num_classes * value_bytes
    return topk * (value_bytes + (2 if num_classes <= 32768 else 4))


def bench_size(work: Path) -> list[dict]:
    rows, n, classes = [], 4096, 1000
    ds, teacher = _synthetic(n, classes)
    for topk in (None, 5, 10):
        out = work / f"size-top{topk}"
        precompute(teacher, ds, out, topk=topk, progress=False)
        data_bytes = sum(
            e["bytes"] - 128  # a .npy header is 128 bytes
            for s in read_meta(out)["shards"]
            for e in s["files"].values()
        )
        per_sample = bytes_per_sample_view(classes, topk)
        rows.append(
            {
                "layout": "full fp16" if topk is None else f"top-{topk} fp16 + int16",
                "bytes_per_sample": per_sample,
                "measured_bytes_per_sample": data_bytes / n,
                "dir_bytes": sum(p.stat().st_size for p in out.iterdir()),
                "gb_per_1m_samples": per_sample * 1e6 / 1e9,
            }
        )
        shutil.rmtree(out)
    print(
        f"| layout (1000 classes, 1 view) | bytes/sample | measured (arrays) "
        f"| whole dir of {n} samples | per 1M samples |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['bytes_per_sample']} | {r['measured_bytes_per_sample']:.1f} "
            f"| {r['dir_bytes']:,} B | {r['gb_per_1m_samples']:.3f} GB |"
        )
    return rows


# -- read ------------------------------------------------------------------------------------
def _evict(cache_dir: Path) -> None:
    for path in cache_dir.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _page_cache_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _read_rate(cached: CachedTeacher, batches: int, batch: int = 256, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(batch, 1)
    start = time.perf_counter()
    for _ in range(batches):
        index = torch.randint(0, cached.num_samples, (batch,), generator=g)
        cached(x, index=index, view=torch.zeros(batch, dtype=torch.int64))
    return batches * batch / (time.perf_counter() - start)


def bench_read(work: Path, gigabytes: float = 1.1) -> dict:
    classes = 1000
    n = int(gigabytes * 1e9 / bytes_per_sample_view(classes, None))
    ds, teacher = _synthetic(n, classes)
    out = work / "read-full"
    try:
        start = time.perf_counter()
        precompute(teacher, ds, out, batch_size=4096, shard_size=65536, progress=False)
        write_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.iterdir())
        start = time.perf_counter()
        cached = CachedTeacher(out, verify=True)
        verify_s = time.perf_counter() - start
        warm = _read_rate(cached, 1000)
        del cached  # mapped pages cannot be evicted: close the memmaps first
        before = _page_cache_mb()
        _evict(out)
        evicted_mb = before - _page_cache_mb()
        cold = _read_rate(CachedTeacher(out, verify=False), 200, seed=1)
        topk_out = work / "read-top10"
        precompute(
            teacher, ds, topk_out, topk=10, batch_size=4096, shard_size=65536, progress=False
        )
        topk_warm = _read_rate(CachedTeacher(topk_out, verify=False), 1000)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "read-top10", ignore_errors=True)
    result = {
        "samples": n,
        "cache_bytes": size,
        "precompute_s": write_s,
        "verify_s": verify_s,
        "verify_gb_per_s": size / 1e9 / verify_s,
        "warm_samples_per_s": warm,
        "cold_samples_per_s": cold,
        "evicted_mb": evicted_mb,
        "top10_warm_samples_per_s": topk_warm,
    }
    print(f"cache {size / 1e9:.2f} GB, {n} samples x 1000 classes fp16; precompute {write_s:.1f} s")
    print(f"open with sha256 verify: {verify_s:.2f} s ({result['verify_gb_per_s']:.2f} GB/s)")
    print("| read (random batches of 256) | samples/s |")
    print("|---|---|")
    print(f"| full fp16, in page cache | {warm:,.0f} |")
    print(f"| full fp16, evicted first ({evicted_mb:,.0f} MB dropped) | {cold:,.0f} |")
    print(f"| top-10, in page cache | {topk_warm:,.0f} |")
    return result


# -- Fashion-MNIST ---------------------------------------------------------------------------
AUG = {"seed": 0, "crop": "pad", "pad": 2, "size": (28, 28), "flip_p": 0.5}


def _train_teacher(train, test, epochs: int, path: Path) -> nn.Module:
    """Supervised teacher, nanoGPT style: one loop, AdamW + one-cycle, pad-crop + flip views."""
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FastLoader
    from kdkit.models import fmnist_teacher

    torch.manual_seed(0)
    model = fmnist_teacher()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True)["student"])
        return model.eval()
    views = ViewSampler(**AUG)
    loader = FastLoader(train, 256, shuffle=True, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        for images, labels, index in loader:
            view = views.view_ids(index, epoch)
            x = prepare_input(
                images, index, view, views, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "cpu"
            )
            loss = nn.functional.cross_entropy(model(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"student": model.state_dict()}, path)
    return model.eval()


def _top1(model: nn.Module, test) -> float:
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    with torch.no_grad():
        x = prepare_input(
            test.images, None, None, None, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "cpu"
        )
        pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return 100.0 * float((pred == test.labels).float().mean())


def _distill(mode: str, teacher, views, train, test, seed: int, epochs: int) -> dict:
    from kdkit import Distiller, SoftTargetKL, Trainer
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FastLoader
    from kdkit.data.pipeline import InputPipeline
    from kdkit.models import fmnist_student

    torch.manual_seed(seed)
    student = fmnist_student()
    loader = FastLoader(train.without_labels(), 256, shuffle=True, seed=seed)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * len(loader))
    distiller = Distiller(student, teacher, SoftTargetKL(temperature=4.0))
    torch.manual_seed(seed)  # seeded again once the models are built, as in the recorded runs
    trainer = Trainer(
        distiller,
        loader,
        FastLoader(test, 1000, shuffle=False),
        optimizer=opt,
        scheduler=sched,
        scheduler_interval="step",
        epochs=epochs,
        inputs=InputPipeline(views, FASHION_MNIST_MEAN, FASHION_MNIST_STD, dataset=loader.dataset),
        device="cpu",
        progress=False,
    )
    # Wall time is what users see, but on a shared machine it mostly measures the neighbours;
    # CPU seconds of this process (all threads) per training epoch, evaluation subtracted, are
    # what the ratio between modes is computed from.
    cpu = time.process_time()
    history = trainer.fit()
    cpu = time.process_time() - cpu
    eval_cpu = time.process_time()
    trainer.evaluate()
    eval_cpu = time.process_time() - eval_cpu
    times = [row["epoch_time_s"] for row in history]
    return {
        "mode": mode,
        "seed": seed,
        "test_top1": history[-1]["val_top1"],
        "epoch_time_s": statistics.median(times),
        "epoch_times_s": times,
        "cpu_s_per_epoch": (cpu - epochs * eval_cpu) / epochs,
    }


def bench_fmnist(
    work: Path,
    train_size: int | None,
    seeds: list[int],
    epochs: int,
    teacher_epochs: int,
    teacher_path: Path | None,
    views_k: int,
) -> dict:
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if train_size is not None:  # a quick smoke run; subsets keep their original indices
        train = train.subset(torch.arange(train_size))
    start = time.perf_counter()
    teacher = _train_teacher(
        train,
        test,
        teacher_epochs,
        teacher_path or work / f"teacher-e{teacher_epochs}-n{len(train)}.pt",
    )
    teacher_s = time.perf_counter() - start
    norm = {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}
    replay_views = ViewSampler(num_views=views_k, **AUG)
    caches, precompute_s = {}, {}
    for name, views in (("replay", replay_views), ("plain", None)):
        start = time.perf_counter()
        caches[name] = precompute(
            teacher,
            train,
            work / f"fmnist-{name}",
            views=views,
            batch_size=512,
            overwrite=True,
            progress=False,
            **norm,
        )
        precompute_s[name] = time.perf_counter() - start
    modes = {
        "online": (lambda: teacher, ViewSampler(**AUG)),
        f"replay K={views_k}": (
            lambda: CachedTeacher(
                caches["replay"],
                expect_teacher=teacher,
                expect_dataset=train,
                expect_views=replay_views,
            ),
            replay_views,
        ),
        "precompute 1 view (no aug)": (
            lambda: CachedTeacher(
                caches["plain"], expect_teacher=teacher, expect_dataset=train, expect_views=False
            ),
            None,
        ),
    }
    runs = []
    for seed in seeds:
        for mode, (make_teacher, views) in modes.items():
            runs.append(_distill(mode, make_teacher(), views, train, test, seed, epochs))
            log.info("%s", runs[-1])
    summary = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        tops = [r["test_top1"] for r in rs]
        summary[mode] = {
            "top1_mean": statistics.mean(tops),
            "top1_std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
            "epoch_time_s": statistics.median(r["epoch_time_s"] for r in rs),
            "cpu_s_per_epoch": statistics.median(r["cpu_s_per_epoch"] for r in rs),
        }
    online_cpu = summary["online"]["cpu_s_per_epoch"]
    print(
        f"teacher: {_top1(teacher, test):.2f}% test top-1 ({teacher_s:.0f} s); precompute "
        f"K={views_k}: {precompute_s['replay']:.0f} s, 1 view: {precompute_s['plain']:.0f} s"
    )
    print(
        f"| mode | test top-1 (mean ± std, {len(seeds)} seeds) | epoch wall s (median) "
        "| epoch CPU s (median) | speed-up vs online (CPU s) |"
    )
    print("|---|---|---|---|---|")
    for mode, s in summary.items():
        print(
            f"| {mode} | {s['top1_mean']:.2f} ± {s['top1_std']:.2f} | {s['epoch_time_s']:.1f} "
            f"| {s['cpu_s_per_epoch']:.1f} | {online_cpu / s['cpu_s_per_epoch']:.2f}x |"
        )
    return {
        "teacher_top1": _top1(teacher, test),
        "teacher_train_s": teacher_s,
        "precompute_s": precompute_s,
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("size", "read", "fmnist", "all"))
    parser.add_argument("--work", default="/tmp/kdkit-bench-cache", help="scratch directory")
    parser.add_argument("--out", default="runs/bench_cache", help="JSON results directory")
    parser.add_argument("--gb", type=float, default=1.1, help="size of the read-test cache")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="student epochs per run")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--teacher", type=Path, help="teacher checkpoint ({'student': state})")
    parser.add_argument("--views", type=int, default=8, help="K views of the replay cache")
    parser.add_argument("--train-size", type=int, help="use the first N training images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"device: {_device_line()}")
    results = {"device": _device_line()}
    if args.what in ("size", "all"):
        results["size"] = bench_size(work)
    if args.what in ("read", "all"):
        results["read"] = bench_read(work, args.gb)
    if args.what in ("fmnist", "all"):
        results["fmnist"] = bench_fmnist(
            work,
            args.train_size,
            args.seeds,
            args.epochs,
            args.teacher_epochs,
            args.teacher,
            args.views,
        )
    path = out / f"{args.what}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
