"""``kdkit precompute``: run a teacher once over a run's data and keep its outputs on disk.

With CONFIG (a ``kdkit train`` config), the config's task's recipe does it: an image cache (K
augmentation views per sample, full or top-k logits) for ``task: classify``, a top-k token
cache for ``task: lm`` (``kdkit lm capture`` is the same verb). Without CONFIG, the older
flags describe an image teacher and dataset.
"""

from __future__ import annotations

import argparse
from typing import Any

from kdkit.cli._checks import add_trust_code, check_device, check_min, check_range
from kdkit.errors import KDError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "precompute",
        help="precompute a teacher cache (images: K views per sample; task: lm: top-k tokens)",
        description="Run the teacher once over a dataset and store its outputs, so training "
        "can replay them. With CONFIG (the kdkit train config): its teacher and training data "
        "(images: normalisation and data.views, full or top-k logits; task: lm: the top-k "
        "log-probs of every trained token, resumable); then train with teacher: "
        "{model: cache:DIR}. Without CONFIG: the older flags (images).",
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
    p.add_argument(
        "--topk", type=int, help="store only the k largest logits (task: lm: entries per token, 32)"
    )
    p.add_argument("--dtype", choices=("fp16", "fp32"), help="image logits (default fp16)")
    p.add_argument("--batch-size", type=int, help="images per teacher batch (256)")
    p.add_argument("--shard-size", type=int, help="samples per shard file (16384)")
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
    add_lm_capture_args(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def add_lm_capture_args(p: argparse.ArgumentParser) -> None:
    """The flags only a ``task: lm`` cache takes (``kdkit precompute`` and ``kdkit lm
    capture``)."""
    p.add_argument(
        "--encoding",
        choices=("q8", "f16"),
        help="task: lm log-probs: q8 (8-bit offsets below the top, per-token scale) or f16 "
        "(default q8)",
    )
    p.add_argument("--temperature", type=float, help="task: lm capture temperature (1)")
    p.add_argument("--shard-rows", type=int, metavar="N", help="task: lm rows per shard (256)")


#: the flags a recipe's precompute reads (the rest describe the older flags' teacher and data)
_CONFIG_OPTIONS = (
    "views", "topk", "dtype", "batch_size", "shard_size", "device", "overwrite", "encoding",
    "temperature", "shard_rows",
)  # fmt: skip


def run_config(args: argparse.Namespace) -> int:
    """``kdkit precompute CONFIG`` (and ``kdkit lm capture CONFIG``): the config's recipe."""
    from kdkit.config import load_resolved
    from kdkit.run.recipes import recipe_for

    if getattr(args, "teacher", None) is not None:
        raise KDError("with CONFIG the teacher is its teacher: section; drop --teacher")
    cfg = load_resolved(args.config, args.overrides)
    check_device(getattr(args, "device", None))
    options = {k: getattr(args, k, None) for k in _CONFIG_OPTIONS}
    options["progress"] = not args.no_progress
    options["trust_code"] = getattr(args, "trust_code", False)
    print("\n".join(recipe_for(cfg).precompute(cfg, args.out, options)))
    return 0


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


def run(args: argparse.Namespace) -> int:
    from kdkit._cache_meta import written_lines
    from kdkit._io import check_output_path
    from kdkit.cache import precompute
    from kdkit.run.cache_job import load_teacher_file, named_dataset
    from kdkit.run.recipes.base import refuse_options

    if args.config is not None:
        return run_config(args)
    refuse_options(vars(args), ("encoding", "temperature", "shard_rows"), "the older flags")
    defaults = {"dtype": "fp16", "batch_size": 256, "shard_size": 16384}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
    check_output_path(
        args.out, what="--out", directory=True, inputs=[args.teacher], makes="teacher cache"
    )
    dataset, mean, std = named_dataset(args.data)
    teacher = load_teacher_file(args.teacher, args.arch, args.device, args.trust_code)
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
    print("\n".join(written_lines(out)))
    return 0
