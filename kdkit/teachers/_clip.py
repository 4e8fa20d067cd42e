"""The pieces of a CLIP teacher that do not depend on the teacher class: class-name checks,
zero-shot class weights, the on-device input transform and the lazy open_clip import."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.registry import build_model

__all__ = [
    "ClipInput",
    "DEFAULT_TEMPLATES",
    "EMBEDDING",
    "zero_shot_weights",
    "check_classes",
    "build_open_clip",
]

EMBEDDING = "embedding"
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
# open_clip.constants.OPENAI_DATASET_MEAN / _STD (copied so zero-shot use needs no open_clip)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INSTALL_HINT = "pip install 'kdkit[clip]'"

Template = str | Callable[[str], str]


def check_classes(class_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise KDError(f"class_names must be a list of strings, got {type(class_names).__name__}")
    names = tuple(class_names)
    if not names:
        raise KDError("class_names is empty: a classifier needs at least one class")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise KDError(f"class names must be non-empty strings, got {bad[:5]}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KDError(f"class_names has duplicates {dupes}: two classes cannot share a name")
    return names


def _prompts(name: str, templates: Sequence[Template]) -> list[str]:
    out = []
    for t in templates:
        if callable(t):
            out.append(t(name))
        elif isinstance(t, str) and "{}" in t:
            out.append(t.format(name))
        else:
            raise KDError(f"a template must hold '{{}}' for the class name, got {t!r}")
    return out


@torch.no_grad()
def zero_shot_weights(
    model: Any, tokenizer: Callable, class_names: Sequence[str], templates: Sequence[Template]
) -> torch.Tensor:
    """Class weights (C, D) float32: per class, normalise each prompt's text embedding,
    average, normalise again."""
    if not templates:
        raise KDError("templates is empty; use None for the default 'a photo of a {}.'")
    device = next(iter(model.parameters()), torch.empty(0)).device
    weights = []
    for name in class_names:
        tokens = tokenizer(_prompts(name, templates))
        emb = model.encode_text(tokens.to(device)).float()
        emb = F.normalize(emb, dim=-1).mean(dim=0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights)


@dataclass(frozen=True)
class ClipInput:
    """Student view -> teacher input, on the device: undo the student's normalisation
    (``student_mean``/``student_std``; None = the view is in [0, 1]), resize the shorter side
    to ``size`` and centre-crop (open_clip's "shortest" mode; antialiased when shrinking),
    clamp to [0, 1], then normalise with the teacher's ``mean``/``std``. One-channel views
    are repeated to three channels."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    student_mean: tuple[float, ...] | None = None
    student_std: tuple[float, ...] | None = None
    interpolation: str = "bicubic"

    @classmethod
    def from_model(
        cls,
        model: Any,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
    ) -> ClipInput:
        """Read size, mean, std and interpolation from open_clip's ``visual.preprocess_cfg``."""
        visual = getattr(model, "visual", model)
        cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
        size = cfg.get("size", getattr(visual, "image_size", 224))
        size = (size, size) if isinstance(size, int) else tuple(size)
        interp = cfg.get("interpolation", "bicubic")
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(cfg.get("mean", getattr(visual, "image_mean", None) or OPENAI_MEAN)),
            std=tuple(cfg.get("std", getattr(visual, "image_std", None) or OPENAI_STD)),
            student_mean=None if student_mean is None else tuple(student_mean),
            student_std=None if student_std is None else tuple(student_std),
            interpolation=interp if interp in ("bilinear", "bicubic") else "bilinear",
        )

    @staticmethod
    def _stat(v: Sequence[float], x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise KDError(f"ClipInput needs float images (N, C, H, W), got {x.dtype} {x.shape}")
        x = x.float()
        if self.student_std is not None:
            x = x * self._stat(self.student_std, x)
        if self.student_mean is not None:
            x = x + self._stat(self.student_mean, x)
        if x.shape[1] == 1 and len(self.mean) == 3:
            x = x.expand(-1, 3, -1, -1)
        (h, w), (th, tw) = x.shape[-2:], self.size
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
            x = F.interpolate(
                x, size=(rh, rw), mode=self.interpolation, align_corners=False, antialias=scale < 1
            )
            top, left = (rh - th) // 2, (rw - tw) // 2
            x = x[..., top : top + th, left : left + tw]
        x = x.clamp(0.0, 1.0)
        return (x - self._stat(self.mean, x)) / self._stat(self.std, x)


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise KDError(
            f"a CLIP teacher needs the optional package open_clip: {INSTALL_HINT}"
        ) from None
    return open_clip


def build_open_clip(name: str, pretrained: Any, kwargs: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """An open_clip model (through kdkit's ``open_clip:`` registry builder) and its tokenizer."""
    open_clip = _open_clip()
    if isinstance(pretrained, bool):
        raise KDError(
            f"pretrained for open_clip:{name} is an open_clip tag (e.g. laion2b_s34b_b79k) or a "
            f"weights file, not {pretrained}"
        )
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
        looks_like_file = os.sep in pretrained or Path(pretrained).suffix in (
            ".pt",
            ".pth",
            ".bin",
            ".safetensors",
        )
        if looks_like_file and not Path(pretrained).is_file():
            raise KDError(f"no CLIP weights file at {pretrained}")
    spec = {"model": f"open_clip:{name}", "kwargs": {**kwargs, "pretrained": pretrained}}
    try:
        model = build_model(spec, where="teacher")
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError) as err:
        if isinstance(err, KDError):
            raise
        raise KDError(
            f"open_clip could not build {name!r} with pretrained={pretrained!r}: {err}"
        ) from None
    return model, tokenizer
