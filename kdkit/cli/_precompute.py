"""``kdkit precompute``: store a teacher's outputs (K augmentation views per sample) on disk."""

from __future__ import annotations

import argparse
from typing import Any

from kdkit.cli._checks import add_trust_code, check_device, check_min, check_range
from kdkit.errors import KDError

DATASETS = ("fashion-mnist",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "precompute",
        help="precompute a teacher cache (full or top-k logits, K views per sample)",
        description="Run the teacher once over a dataset and store its logits for K "
        "augmentation views per sample, so training can replay them (kdkit.cache). With "
        "CONFIG (the kdkit train config): its teacher, training data, normalisation and "
        "data.views; then train with teacher: {model: cache:DIR}. Without: the older flags.",
    )
    p.add_argument("config", nargs="?", help="a kdkit train config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as for kdkit train; repeatable")  # fmt: skip
    add_teacher_args(p, required=False)
    p.add_argument("--data", default="fashion-mnist:train", help="fashion-mnist[:train|test]")
    p.add_argument("--out", help="cache directory (with CONFIG, default: RUN_DIR-teacher-cache)")
    p.add_argument(
        "--views",
        type=int,
        help="views per sample (0: no augmentation; with CONFIG: data.views.num_views)",
    )
    p.add_argument("--topk", type=int, help="store only the k largest logits")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=16384, help="samples per shard file")
    p.add_argument("--view-seed", type=int, default=0, help="seed of the view sampler")
    p.add_argument("--crop", choices=("pad", "resized", "none"), default="pad")
    p.add_argument("--pad", type=int, default=2, help="pixels of pad-and-crop (--crop pad)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.35, 1.0), metavar=("LO", "HI"))
    p.add_argument("--flip-p", type=float, default=0.5, help="horizontal flip probability")
    p.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        help="mixup Beta(a, a) with a partner image per view (0: off; the training run's "
        "data.views.mixup)",
    )
    p.add_argument(
        "--cutmix", type=float, default=0.0, help="CutMix Beta(a, a), as --mixup (0: off)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a different cache in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def add_teacher_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--teacher",
        required=required,
        help="an .onnx / .engine file or a kdkit checkpoint (.pt)"
        + ("" if required else "; not with CONFIG (its teacher: section)"),
    )
    p.add_argument(
        "--arch",
        default="kdkit:fmnist_teacher",
        help="registered model (kdkit:NAME, torchvision:NAME, ...) for a checkpoint that holds "
        "only weights (default: kdkit:fmnist_teacher)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_trust_code(p)


def load_teacher(path: str, arch: str, device: str | None, trust_code: bool = False) -> Any:
    """A Teacher for ``path``: ``.onnx`` / ``.engine`` files and checkpoints that name their
    model (``<role>_spec``) go through :func:`kdkit.teachers.teacher`; a file holding only
    weights (a kdkit checkpoint without a spec, or a plain state dict) is loaded into
    ``arch``, a registered model spec. Nothing a file names is imported without
    ``trust_code``."""
    import torch

    from kdkit.load import load_weights, spec_from_text
    from kdkit.registry import build_model
    from kdkit.teachers import TorchTeacher, teacher

    check_device(device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if path.endswith((".onnx", ".engine", ".plan")):
        return teacher(path)
    from kdkit.load import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except KDError as err:
        if "not a kdkit checkpoint" not in str(err):
            raise
        ckpt = None  # a plain state dict: weights for --arch
    if ckpt is not None and any(ckpt.get(f"{r}_spec") for r in ("student", "teacher")):
        return teacher(path, trust_code=trust_code).to(device)
    spec = spec_from_text(arch, where="--arch")
    model = build_model(spec, trust_code=trust_code, where="--arch")
    load_weights(model, path)
    return TorchTeacher(model.eval()).to(device)


def load_data(spec: str) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """``(dataset, mean, std)`` for ``name[:split]``."""
    name, _, split = spec.partition(":")
    if name not in DATASETS:
        raise KDError(f"unknown dataset {name!r}; available: {list(DATASETS)}")
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

    return load_fashion_mnist(split or "train"), FASHION_MNIST_MEAN, FASHION_MNIST_STD


def build_views(args: argparse.Namespace, image_size: tuple[int, int]) -> Any:
    """The flags' views through the same builder as ``kdkit train``'s ``data.views``."""
    if args.views <= 0:
        return None
    from kdkit.config import ViewsConfig
    from kdkit.run.data import build_views as views_from

    section = ViewsConfig(
        crop=args.crop,
        num_views=args.views,
        pad=args.pad,
        scale=tuple(args.scale),
        mixup=args.mixup,
        cutmix=args.cutmix,
    )
    return views_from(section, args.view_seed, image_size, flip_p=args.flip_p)


def config_of(args: argparse.Namespace):
    """CONFIG + ``--set`` -> the validated config with absolute paths (as kdkit train)."""
    from kdkit.config import LMRunConfig, load_resolved

    cfg = load_resolved(args.config, args.overrides)
    if isinstance(cfg, LMRunConfig):
        raise KDError("kdkit precompute CONFIG takes an image (task: classify) config")
    if args.teacher is not None:
        raise KDError("with CONFIG the teacher is its teacher: section; drop --teacher")
    return cfg


def _run_config(args: argparse.Namespace) -> int:
    """``kdkit precompute CONFIG``: the run's teacher, data and views (kdkit.run.cache_job)."""
    from kdkit._io import check_output_path
    from kdkit.cache import precompute, read_meta
    from kdkit.run.cache_job import cache_plan, default_cache_dir

    cfg = config_of(args)
    check_min(args.views, 1, "--views")
    check_min(args.topk, 1, "--topk")
    out = args.out or default_cache_dir(cfg)
    check_output_path(out, what="--out", directory=True)
    plan = cache_plan(cfg, num_views=args.views, trust_code=args.trust_code)
    device = check_device(args.device) or cfg.train.device
    precompute(
        plan.teacher, plan.dataset, out, views=plan.views, topk=args.topk,
        batch_size=args.batch_size, dtype=args.dtype, mean=plan.mean, std=plan.std,
        shard_size=args.shard_size, device=device, progress=not args.no_progress,
        overwrite=args.overwrite, source=plan.source, features=plan.features,
    )  # fmt: skip
    _report(out, read_meta(out), getattr(plan.dataset, "unreadable", None))
    print(f'train from it: teacher: {{model: "cache:{out}"}}')
    return 0


def _report(out, meta: dict, unreadable=None) -> None:
    print(
        f"wrote {out}: {meta['num_samples']} samples x {meta['num_views']} views, "
        f"{'top-' + str(meta['topk']) if meta['topk'] else 'full'} {meta['dtype']} logits, "
        f"{len(meta['shards'])} shards"
    )
    if meta.get("features"):
        shapes = ", ".join(f"{n} {tuple(f['shape'])}" for n, f in meta["features"].items())
        print(f"teacher features: {shapes} (for the config's feature pairs)")
    if unreadable is not None and unreadable.count:
        print(f"{unreadable.summary()} (placeholder rows, never read in training)")


def run(args: argparse.Namespace) -> int:
    from kdkit._io import check_output_path
    from kdkit.cache import precompute, read_meta

    if args.config is not None:
        return _run_config(args)
    if args.teacher is None or args.out is None:
        raise KDError("kdkit precompute needs CONFIG.yaml, or --teacher FILE and --out DIR")
    args.views = args.views or 0
    check_min(args.views, 0, "--views")
    check_min(args.topk, 1, "--topk")
    check_min(args.batch_size, 1, "--batch-size")
    check_min(args.shard_size, 1, "--shard-size")
    check_min(args.pad, 0, "--pad")
    check_range(args.flip_p, 0.0, 1.0, "--flip-p")
    check_min(args.mixup, 0.0, "--mixup")
    check_min(args.cutmix, 0.0, "--cutmix")
    if (args.mixup or args.cutmix) and args.views <= 0:
        raise KDError("--mixup/--cutmix mix views: give --views K (K >= 1) too")
    lo, hi = args.scale
    if not 0 < lo <= hi <= 1:
        raise KDError(f"--scale LO HI needs 0 < LO <= HI <= 1, got {lo:g} {hi:g}")
    check_output_path(args.out, what="--out", directory=True, inputs=[args.teacher])
    dataset, mean, std = load_data(args.data)
    teacher = load_teacher(args.teacher, args.arch, args.device, args.trust_code)
    views = build_views(args, tuple(dataset[0][0].shape[-2:]))
    out = precompute(
        teacher,
        dataset,
        args.out,
        views=views,
        topk=args.topk,
        batch_size=args.batch_size,
        dtype=args.dtype,
        mean=mean,
        std=std,
        shard_size=args.shard_size,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        source={"teacher": args.teacher, "data": args.data, "arch": args.arch},
    )
    _report(out, read_meta(out))
    return 0
