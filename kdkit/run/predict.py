"""``kdkit predict``: class names and probabilities for photos, from a run, a checkpoint or an
ONNX file, with the preprocessing the run evaluated with.

What a trained student needs to label a new photo is recorded where it ships: a checkpoint
(and so a run directory) holds ``classes``, ``input_shape``, ``mean`` and ``std``; an ONNX
file written by ``kdkit export`` holds them as ``metadata_props`` (``kdkit.classes``, a JSON
list, ``kdkit.input_shape``, ``kdkit.mean``, ``kdkit.std``). A photo goes through
:func:`kdkit.run.data.eval_transform` (shorter side to the input size, center crop, the
model's channels), then ``(x / 255 - mean) / std``: the validation path of ``kdkit train``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdkit.data.unreadable import Unreadable, UnreadableLog
from kdkit.errors import KDError

__all__ = [
    "Prediction",
    "Predictor",
    "load_predictor",
    "predict_paths",
    "image_paths",
    "run_classes",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One photo's top-k: ``(class name, class index, probability)``, most likely first."""

    path: str
    top: list[tuple[str, int, float]]


@dataclass
class Predictor:
    """A model as ``logits_of(normalised float batch)`` plus what its inputs must look like."""

    logits_of: Callable[[torch.Tensor], torch.Tensor]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None = None
    source: str = ""
    unreadable: UnreadableLog = field(default_factory=UnreadableLog)

    def class_name(self, i: int) -> str:
        return self.classes[i] if self.classes and i < len(self.classes) else str(i)


def _onnx_predictor(path: Path) -> Predictor:
    from kdkit._ort import import_onnxruntime

    ort = import_onnxruntime()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KDError(f"ONNX Runtime cannot load {path}: {first[:200]}") from None
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in ("kdkit.input_shape", "kdkit.mean", "kdkit.std") if k not in props]
    if missing:
        raise KDError(
            f"{path} carries no {', '.join(missing)} metadata (not written by kdkit export); "
            "export it with kdkit export RUN --onnx PATH, or predict from the run directory"
        )
    try:  # metadata is text anyone can write into an ONNX file: typed before use
        shape = tuple(int(v) for v in props["kdkit.input_shape"].split(","))
        classes = json.loads(props["kdkit.classes"]) if "kdkit.classes" in props else None
        mean, std = json.loads(props["kdkit.mean"]), json.loads(props["kdkit.std"])
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if classes is not None and not all(isinstance(c, str) for c in classes):
            raise TypeError("class names must be strings")
    except (ValueError, TypeError, RecursionError) as err:
        raise KDError(f"{path}: its kdkit metadata is malformed ({err}); export it again") from None
    input_name = session.get_inputs()[0].name

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])

    return Predictor(logits_of, shape, tuple(mean), tuple(std), classes, str(path))  # type: ignore[arg-type]


def run_classes(path: Path) -> list[str] | None:
    """``classes.json`` of the run directory a checkpoint sits in (older checkpoints)."""
    from kdkit._io import read_json

    run_dir = path if path.is_dir() else path.parent
    file = run_dir / "classes.json"
    if not file.is_file():
        return None
    classes = read_json(file, "it lists the run's class names")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise KDError(f"{file} is not a list of class names (strings)")
    return classes


def load_predictor(
    source: str | os.PathLike, *, trust_code: bool = False, device: str | torch.device = "cpu"
) -> Predictor:
    """A :class:`Predictor` from a run directory, a kdkit checkpoint or an ``.onnx`` file."""
    from kdkit.run.models import checkpoint_in, load_model_file

    path = Path(source)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise KDError(f"no ONNX file at {path}")
        return _onnx_predictor(path)
    module, meta = load_model_file(path, trust_code=trust_code)
    shape, mean, std = meta.get("input_shape"), meta.get("mean"), meta.get("std")
    if not shape or not mean or not std:
        raise KDError(
            f"{checkpoint_in(path)} records no input_shape / mean / std (not written by "
            "kdkit train or a Trainer with an input pipeline)"
        )
    device = torch.device(device)
    module.to(device).eval()

    @torch.no_grad()
    def logits_of(x: torch.Tensor) -> torch.Tensor:
        out = module(x.to(device))
        return (out[0] if isinstance(out, (tuple, list)) else out).float().cpu()

    classes = meta.get("classes") or run_classes(path)
    return Predictor(logits_of, tuple(shape), tuple(mean), tuple(std), classes, str(path))


def image_paths(items: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to every image under them (any depth, sorted)."""
    from kdkit.data.folder import find_images

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += find_images(p)
        elif p.is_file():
            out.append(p)
        else:
            raise KDError(f"no image or folder at {p}")
    if not out:
        raise KDError("no images to predict: pass image files or folders")
    return out


def predict_paths(
    predictor: Predictor, paths: Sequence[Path], topk: int = 5, batch_size: int = 32
) -> list[Prediction]:
    """Top-``topk`` classes of every readable image in ``paths`` (unreadable ones are skipped,
    counted in ``predictor.unreadable`` and the first few named)."""
    from kdkit.data.folder import ImageFolderDataset
    from kdkit.data.pipeline import prepare_input
    from kdkit.run.data import eval_transform

    if topk < 1:
        raise KDError(f"--topk must be >= 1, got {topk}")
    channels, size = predictor.input_shape[0], predictor.input_shape[-1]
    # the very dataset class (JPEG draft decoding included) kdkit train reads folders with
    files = ImageFolderDataset(
        [(p, -1) for p in paths],
        predictor.classes or [],
        eval_transform(size, channels),
        draft_size=(size, size),
        skip_unreadable=True,
    )
    out: list[Prediction] = []
    for b0 in range(0, len(paths), batch_size):
        loaded = [files[i] for i in range(b0, min(b0 + batch_size, len(paths)))]
        good = [(paths[item[2]], item[0]) for item in loaded if not isinstance(item, Unreadable)]
        predictor.unreadable.record([x for x in loaded if isinstance(x, Unreadable)], len(good))
        if not good:
            continue
        x = torch.stack([x for _, x in good])
        x = prepare_input(x, None, None, None, predictor.mean, predictor.std, "cpu")
        probs = torch.softmax(predictor.logits_of(x).float(), dim=1)
        k = min(topk, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for (path, _), v, i in zip(good, values.tolist(), indices.tolist(), strict=True):
            top = [(predictor.class_name(c), c, p) for c, p in zip(i, v, strict=True)]
            out.append(Prediction(str(path), top))
    predictor.unreadable.end_pass(len(out), predictor.unreadable.count)
    return out
