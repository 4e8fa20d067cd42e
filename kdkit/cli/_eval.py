"""``kdkit eval RUN_DIR_OR_CHECKPOINT``: top-1 / top-5 / loss of a trained student."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kdkit.cli._checks import add_trust_code

    p = sub.add_parser(
        "eval",
        help="evaluate a run's student (and teacher) on its val data or other data",
        description="Rebuild the student from a run directory (best.pt, else last.pt) or a "
        "checkpoint and score it on the run's val data; --data KEY=VALUE changes the data "
        "section (keys as under data:, e.g. --data val.image_folder=data/test).",
    )
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data: key, e.g. val.fashion_mnist=test; repeatable")  # fmt: skip
    p.add_argument("--teacher", action="store_true", help="also evaluate the run's teacher")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    add_trust_code(p)
    p.set_defaults(func=run)


def _recorded_size(meta: dict, raw: dict, overrides: list[str]) -> None:
    """Evaluate at the input size the checkpoint was trained at; ``--data image_size=``
    overrides it, with a warning when the two differ."""
    import logging

    shape = meta.get("input_shape")
    if not shape:
        return
    trained = int(shape[-1])
    if any(o.partition("=")[0].strip() == "image_size" for o in overrides):
        if raw.get("image_size") not in (None, trained):
            logging.getLogger(__name__).warning(
                "evaluating at %s px, but the checkpoint was trained at %d px",
                raw["image_size"],
                trained,
            )
        return
    raw["image_size"] = trained


def _moved(raw: dict) -> bool:
    """The run's training folder is not where the config says (a moved or copied run
    directory): its val source, with the checkpoint's class names, stands in for it."""
    from pathlib import Path

    folder = (raw.get("train") or {}).get("image_folder")
    return bool(folder) and not Path(folder).is_dir()


def _data_section(meta: dict, overrides: list[str]):
    """The checkpoint's data section (or an empty one) with ``--data`` applied."""
    from kdkit.config import DataConfig, apply_overrides, build_section
    from kdkit.errors import KDError

    config = meta.get("config") or {}
    raw = dict(config.get("data") or {})
    raw = apply_overrides(raw, overrides)
    _recorded_size(meta, raw, overrides)
    if _moved(raw) and meta.get("classes"):
        val = raw.get("val") or {}
        if _moved({"train": val}) or not val.get("image_folder"):
            raise KDError(
                f"the run's data is not at {raw['train']['image_folder']} any more (a moved "
                "run directory?): point at it with --data val.image_folder=DIR"
            )
        raw = {**raw, "train": val, "unlabeled": [], "labeled": None}
    if "train" not in raw:  # a bare checkpoint: the val source stands in for train
        val = raw.get("val")
        if not isinstance(val, dict) or "split" in val:
            raise KDError(
                "this checkpoint holds no run config: say which data to score with "
                "--data val.image_folder=DIR or --data val.fashion_mnist=test"
            )
        raw["train"] = val
    data = build_section(DataConfig, raw, "data")
    if data.val is None:
        raise KDError("the run has no val data: pass --data val.image_folder=DIR (or similar)")
    return data, (config.get("train") or {}).get("seed", 0), (config.get("train") or {})


def _check_input(path, recorded, given) -> None:
    """The data eval is given must have the channels the checkpoint was trained on: a
    3-channel student scored on 1-channel images would fail deep inside its first conv. The
    size may differ when ``--data image_size=N`` asked for it (``_recorded_size`` warns)."""
    from kdkit.errors import KDError

    if not recorded or not given or list(recorded) == list(given):
        return
    what = "channels" if recorded[0] != given[0] else "size"
    if what == "size":
        return  # asked for with --data image_size=N (else the recorded size is used)
    raise KDError(
        f"{path} was trained on inputs of shape {list(recorded)}, but this data gives "
        f"{list(given)} (other {what}); score it on data like its training data (--data ...)"
    )


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from kdkit.cli._checks import check_device
    from kdkit.config import TeacherConfig, build_section
    from kdkit.errors import KDError
    from kdkit.load import load_checkpoint
    from kdkit.run.data import build_data
    from kdkit.run.evaluate import evaluate_logits
    from kdkit.run.models import build_teacher, checkpoint_in, load_model_file

    path = checkpoint_in(args.run)
    meta = {k: v for k, v in load_checkpoint(path).items() if not isinstance(v, dict) or k in
            ("config", "teacher_spec")}  # fmt: skip
    if meta.get("classes") is None:  # older checkpoints: the run directory's classes.json
        from kdkit.run.predict import run_classes

        meta["classes"] = run_classes(path)
    if (meta.get("config") or {}).get("task") == "lm":
        return _run_lm(args, path)
    data_cfg, seed, train_cfg = _data_section(meta, args.data)
    device = torch.device(
        check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    data = build_data(data_cfg, seed=seed, classes=meta.get("classes"))
    student, smeta = load_model_file(path, trust_code=args.trust_code)
    _check_input(path, smeta.get("input_shape"), data.input_shape)
    student.to(device).eval()
    mean = tuple(smeta.get("mean") or data.mean)
    std = tuple(smeta.get("std") or data.std)
    precision = train_cfg.get("precision", "fp32")
    if precision == "fp16" and device.type != "cuda":
        precision = "fp32"
    scores = {"student": evaluate_logits(student, data.val_loader, mean, std, device, precision)}
    if args.teacher:
        if not meta.get("teacher_spec"):
            raise KDError(f"{path} records no teacher (it was not written by kdkit train)")
        tc = build_section(TeacherConfig, meta["teacher_spec"], "teacher")
        from kdkit.run.cache_job import live_teacher

        tc = live_teacher(tc)  # a cache: teacher -> the model it was precomputed with
        teacher = build_teacher(tc, trust_code=args.trust_code, input_shape=data.input_shape,
                                mean=mean, std=std, calibration=data.train_dataset)  # fmt: skip
        teacher.to(device)
        scores["teacher"] = evaluate_logits(
            lambda x: teacher(x).logits, data.val_loader, mean, std, device
        )
    if args.json:
        print(json.dumps({"checkpoint": str(path), **scores}, indent=1))
        return 0
    print(f"checkpoint: {path}")
    for who, s in scores.items():
        print(f"{who + ':':9} top-1 {s['top1']:.2f}%  top-5 {s['top5']:.2f}%  "
              f"loss {s['loss']:.4f}  ({s['images']:,} images)")  # fmt: skip
    return 0


def _run_lm(args: argparse.Namespace, path) -> int:
    """``task: lm`` runs: perplexity, top-1 agreement with the teacher, mean KL."""
    import json

    import torch

    from kdkit.cli._checks import check_device
    from kdkit.errors import KDError
    from kdkit.run.lm_tools import evaluate_lm_run

    files = []
    for item in args.data:
        key, _, value = item.partition("=")
        if key not in ("text_files", "val.text_files") or not value:
            raise KDError(f"--data for a task: lm run takes text_files=GLOB, got {item!r}")
        files.append(value)
    device = torch.device(
        check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    scores = evaluate_lm_run(path, device, teacher=True, data=files, trust_code=args.trust_code)
    if args.json:
        print(json.dumps({"checkpoint": str(path), **scores}, indent=1))
        return 0
    print(f"checkpoint: {path}")
    for who, s in scores.items():
        extra = ""
        if "kl" in s:
            extra = f"  agreement {s['agree']:.2f}%  KL {s['kl']:.4f}"
        print(f"{who + ':':9} perplexity {s['ppl']:.3f}{extra}  ({int(s['tokens']):,} tokens)")
    return 0
