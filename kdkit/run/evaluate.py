"""``kdkit eval`` of an image run: top-1 / top-5 / cross-entropy of its student (and teacher)
on the run's val data, or on data ``--data KEY=VALUE`` names.

The counting is :func:`kdkit.metrics.classification_metrics`, the Trainer's own, so
``kdkit eval RUN`` reproduces the val top-1 stored in the run's ``best.pt`` exactly. The data
section comes from the checkpoint (it holds the run's resolved config), evaluated at the
input size it was trained at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdkit.config import DataConfig, TeacherConfig, apply_overrides, build_section
from kdkit.data.pipeline import InputPipeline
from kdkit.errors import KDError
from kdkit.metrics import classification_metrics
from kdkit.run.data import build_data
from kdkit.run.models import build_teacher, live_teacher, load_model_file
from kdkit.train.precision import Precision

__all__ = ["eval_data_section", "evaluate_image_run", "evaluate_logits"]

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_logits(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """``logits_of(normalised batch)`` scored on ``loader``'s labeled rows (-1 rows skipped)."""
    inputs = InputPipeline(None, mean, std, device=device)
    batches = ((b.x, b.labels) for b in (inputs(batch, augment=False) for batch in loader))
    return classification_metrics(batches, logits_of, Precision(precision, device).autocast)


def _recorded_size(meta: dict, raw: dict, overrides: list[str]) -> None:
    """Evaluate at the input size the checkpoint was trained at; ``--data image_size=``
    overrides it, with a warning when the two differ."""
    shape = meta.get("input_shape")
    if not shape:
        return
    trained = int(shape[-1])
    if any(o.partition("=")[0].strip() == "image_size" for o in overrides):
        if raw.get("image_size") not in (None, trained):
            log.warning(
                "evaluating at %s px, but the checkpoint was trained at %d px",
                raw["image_size"],
                trained,
            )
        return
    raw["image_size"] = trained


def _moved(raw: dict) -> bool:
    """The run's training folder is not where the config says (a moved or copied run
    directory): its val source, with the checkpoint's class names, stands in for it."""
    folder = (raw.get("train") or {}).get("image_folder")
    return bool(folder) and not Path(folder).is_dir()


#: the keys of data.val that name where its images come from: one replaces the others
_VAL_SOURCES = ("image_folder", "fashion_mnist", "stl10", "split", "root")


def _override_val(raw: dict, overrides: list[str]) -> dict:
    """``--data val.image_folder=DIR`` (or another val source) replaces the recorded val
    source, a ``split`` included: the run is scored on DIR, not on its carved split."""
    given = {o.partition("=")[0].strip() for o in overrides}
    if not any(f"val.{k}" in given for k in _VAL_SOURCES) or not isinstance(raw.get("val"), dict):
        return raw
    val = {k: v for k, v in raw["val"].items() if k not in _VAL_SOURCES}
    return {**raw, "val": val}


def eval_data_section(meta: dict, overrides: list[str]):
    """The checkpoint's data section (or an empty one) with ``--data`` applied, the run's
    seed and its ``train:`` section as plain data: what ``kdkit eval`` and ``kdkit export
    --int8`` score and calibrate on."""
    config = meta.get("config") or {}
    for key in ("data", "train"):
        if not isinstance(config.get(key) or {}, Mapping):
            raise KDError(
                f"the checkpoint's recorded config is malformed: '{key}' is "
                f"{type(config[key]).__name__}, not a section; score it with --data KEY=VALUE "
                "on a checkpoint written by kdkit train"
            )
    raw = dict(config.get("data") or {})
    if "train" in raw:  # the recorded values' types, named, before any of them is used
        try:
            build_section(DataConfig, raw, "data")
        except KDError as err:
            raise KDError(f"the checkpoint's recorded config is malformed: {err}") from None
    raw = _override_val(raw, overrides)
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
    if not recorded or not given or list(recorded) == list(given):
        return
    what = "channels" if recorded[0] != given[0] else "size"
    if what == "size":
        return  # asked for with --data image_size=N (else the recorded size is used)
    raise KDError(
        f"{path} was trained on inputs of shape {list(recorded)}, but this data gives "
        f"{list(given)} (other {what}); score it on data like its training data (--data ...)"
    )


def evaluate_image_run(
    path: Path,
    meta: Mapping[str, Any],
    *,
    device: torch.device,
    data: Sequence[str] = (),
    teacher: bool = False,
    trust_code: bool = False,
) -> dict[str, dict[str, float]]:
    """The student of the checkpoint ``path`` (``meta``: its plain values, config and
    teacher section) scored on the run's val data with ``data`` (``--data KEY=VALUE``)
    applied; with ``teacher``, the teacher on the same batches."""
    data_cfg, seed, train_cfg = eval_data_section(dict(meta), list(data))
    keys = {o.partition("=")[0].strip().partition(".")[0] for o in data}
    recorded = data_cfg.val.split is not None and not keys & {"train", "val"}  # as trained
    members = meta.get("val_files") if recorded else None
    run_data = build_data(data_cfg, seed=seed, classes=meta.get("classes"), val_files=members)
    student, smeta = load_model_file(path, trust_code=trust_code)
    _check_input(path, smeta.get("input_shape"), run_data.input_shape)
    student.to(device).eval()
    mean = tuple(smeta.get("mean") or run_data.mean)
    std = tuple(smeta.get("std") or run_data.std)
    precision = train_cfg.get("precision", "fp32")
    if precision == "fp16" and device.type != "cuda":
        precision = "fp32"
    loader = run_data.val_loader
    scores = {"student": evaluate_logits(student, loader, mean, std, device, precision)}
    if teacher:
        if not meta.get("teacher_spec"):
            raise KDError(f"{path} records no teacher (it was not written by kdkit train)")
        tc = build_section(TeacherConfig, meta["teacher_spec"], "teacher")
        tc = live_teacher(tc)  # a cache: teacher -> the model it was precomputed with
        model = build_teacher(tc, trust_code=trust_code, input_shape=run_data.input_shape,
                              mean=mean, std=std, calibration=run_data.train_dataset)  # fmt: skip
        model.to(device)
        scores["teacher"] = evaluate_logits(lambda x: model(x).logits, loader, mean, std, device)
    return scores
