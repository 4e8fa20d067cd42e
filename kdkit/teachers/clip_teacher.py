"""An image-text model (OpenCLIP) as a teacher: zero-shot from class names, or a linear probe.

The Jetson tutorial's teacher. An image encoder maps a picture to an embedding; the class
logits come from one of two heads on the L2-normalised embedding ``z``:

- **zero-shot**: each class's prompts ("a photo of a {}.") go through the text encoder, are
  normalised, averaged and normalised again into a weight ``w_c``; logits =
  ``model.logit_scale.exp() * z @ W.T`` (Radford et al. 2021, arXiv:2103.00020). The text
  side runs once, at construction.
- **linear probe**: a ``Linear(D, C)`` on ``z``, fitted on the teacher's embeddings of a few
  labeled images (:func:`kdkit.run.clip_probe.fit_probe`; the file format is
  :mod:`kdkit.teachers.clip_probe`). On a zero-shot teacher it starts from the
  zero-shot weights, so it can only move away from them where labels say so.

Either way the :class:`~kdkit.teachers.TeacherOutput` carries the logits and the raw image
embedding (``encode_image``'s output, before normalisation) as the feature ``"embedding"``:
``("", "")`` distils logits, ``("fc", "embedding")`` distils embeddings.

The teacher sees the student's own augmented view: :class:`ClipInput` undoes the student's
normalisation, resizes to the teacher's resolution and applies the teacher's, on the device.
Any object with ``encode_image`` (and, for zero-shot, ``encode_text`` and ``logit_scale``)
works; ``open_clip`` itself is imported only by :meth:`ClipTeacher.from_pretrained`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdkit._fingerprint import module_fingerprint
from kdkit.errors import KDError, closest_names
from kdkit.teachers import clip_probe
from kdkit.teachers._clip import (
    DEFAULT_TEMPLATES,
    EMBEDDING,
    ClipInput,
    Template,
    build_open_clip,
    check_classes,
    zero_shot_weights,
)
from kdkit.teachers.base import Teacher, TeacherOutput
from kdkit.teachers.clip_probe import PROBE_FORMAT, PROBE_VERSION  # noqa: F401  (re-exported)
from kdkit.teachers.torch_teacher import PRECISIONS

__all__ = [
    "ClipInput",
    "ClipTeacher",
    "DEFAULT_TEMPLATES",
    "EMBEDDING",
    "clip_teacher_from_config",
    "zero_shot_weights",
]

log = logging.getLogger(__name__)


class ClipTeacher(Teacher):
    """A frozen image encoder with a zero-shot or linear-probe head (see the module doc).

    Build it with :meth:`zero_shot`, :meth:`from_pretrained` or :meth:`linear_probe`.
    ``preprocess`` runs on the student's batch inside :meth:`forward` (None: the input
    already has the model's size and normalisation).
    """

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        *,
        class_weights: torch.Tensor | None = None,
        probe: nn.Linear | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        if not callable(getattr(model, "encode_image", None)):
            raise KDError(f"{type(model).__name__} has no encode_image(); not a CLIP-like model")
        if precision not in PRECISIONS:
            raise KDError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if preprocess is not None and not callable(preprocess):
            raise KDError("preprocess must be a callable on image tensors, e.g. ClipInput(...)")
        if type(preprocess).__module__.startswith("torchvision.transforms"):
            raise KDError(
                "preprocess runs on the student's float batch on the device, not on PIL images; "
                "use ClipInput.from_model(model, student_mean, student_std)"
            )
        self.class_names = check_classes(class_names)
        self.dtype = PRECISIONS[precision]
        self.precision = precision
        self.model = model.eval().requires_grad_(False)
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = torch.as_tensor(1.0 if scale is None else scale).detach().float().exp()
        self.class_weights = None if class_weights is None else class_weights.detach().float()
        if self.class_weights is not None and self.class_weights.shape[0] != len(self.class_names):
            raise KDError(
                f"{self.class_weights.shape[0]} class weights for {len(class_names)} names"
            )
        self.probe = probe
        self.preprocess = preprocess
        self._encoder_fp: str | None = None
        if self.dtype != torch.float32:  # a cast copy: the caller's model keeps its dtype
            # the encoder is named by the weights it was given, so a probe fitted with the
            # fp32 encoder is accepted for this bf16 / fp16 copy of the same weights
            self._encoder_fp = module_fingerprint(getattr(model, "visual", model))
            self.model = copy.deepcopy(self.model).to(self.dtype)
        self.device = next(iter(model.parameters()), torch.empty(0)).device

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def zero_shot(
        cls,
        model: nn.Module,
        tokenizer: Callable,
        class_names: Sequence[str],
        templates: Sequence[Template] | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> ClipTeacher:
        """Zero-shot classifier from an open_clip model you built and its tokenizer."""
        names = check_classes(class_names)
        model.eval()
        weights = zero_shot_weights(model, tokenizer, names, templates or DEFAULT_TEMPLATES)
        return cls(model, names, class_weights=weights, preprocess=preprocess, **kwargs)

    @classmethod
    def from_pretrained(  # open_clip, not transformers: it takes no trust_remote_code
        cls,
        model_name: str,
        pretrained: str | os.PathLike | None,
        class_names: Sequence[str],
        templates: Sequence[Template] | None = None,
        *,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> ClipTeacher:
        """Zero-shot teacher from an open_clip name and ``pretrained`` (an open_clip tag,
        downloaded by open_clip, or a local weights file). ``student_mean``/``student_std``
        are the normalisation of the student's input (None: the input is in [0, 1])."""
        model, tokenizer = build_open_clip(model_name, pretrained, model_kwargs or {})
        preprocess = ClipInput.from_model(model, student_mean, student_std)
        return cls.zero_shot(model, tokenizer, class_names, templates, preprocess, **kwargs)

    @classmethod
    def linear_probe(
        cls,
        model: nn.Module,
        class_names: Sequence[str] | None = None,
        *,
        probe: str | os.PathLike | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> ClipTeacher:
        """A probe teacher: with ``probe=PATH`` the head saved by :meth:`save_probe` (class
        names from the file), else an unfitted head: fit it with
        :func:`kdkit.run.clip_probe.fit_probe` before use."""
        if probe is None:
            if class_names is None:
                raise KDError("linear_probe needs class_names (or probe=PATH to load a head)")
            return cls(model, class_names, preprocess=preprocess, **kwargs)
        teacher = cls(model, ["_"], preprocess=preprocess, **kwargs)
        teacher.load_probe(probe, class_names)
        return teacher

    # -- the Teacher protocol -----------------------------------------------------------
    def request_features(self, names: Sequence[str]) -> None:
        wanted = tuple(n for n in dict.fromkeys(names) if n != "")
        bad = [n for n in wanted if n != EMBEDDING]
        if bad:
            raise KDError(
                f"a ClipTeacher exposes the final logits ('') and {EMBEDDING!r} only; "
                f"got {bad} (did you mean {EMBEDDING!r}?)"
            )
        self.feature_names = wanted

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding (N, D) float32 of a student-normalised batch (before the head)."""
        if self.preprocess is not None:
            x = self.preprocess(x)
        self.model.eval()
        return self.model.encode_image(x.to(self.dtype)).float()

    def head(self, embedding: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C) from raw embeddings (N, D): probe if fitted, else zero-shot."""
        z = F.normalize(embedding.float(), dim=-1)
        if self.probe is not None:
            return self.probe(z)
        if self.class_weights is not None:
            return self.logit_scale * z @ self.class_weights.T
        raise KDError(
            "this ClipTeacher has no classifier yet: call fit_probe(labeled_dataset) or "
            "load_probe(path) first"
        )

    def forward(self, x, *, index=None, view=None) -> TeacherOutput:
        emb = self.encode(x)
        return TeacherOutput(logits=self.head(emb), features={EMBEDDING: emb})

    def to(self, device: torch.device | str) -> ClipTeacher:
        device = torch.device(device)
        self.model.to(device)
        self.logit_scale = self.logit_scale.to(device)
        if self.class_weights is not None:
            self.class_weights = self.class_weights.to(device)
        if self.probe is not None:
            self.probe.to(device)
        self.device = device
        return self

    def eval(self) -> ClipTeacher:
        return self

    @property
    def embedding_dim(self) -> int | None:
        """D of the embeddings the head takes (None when there is no head yet)."""
        if self.probe is not None:
            return int(self.probe.in_features)
        return None if self.class_weights is None else int(self.class_weights.shape[1])

    def encoder_fingerprint(self) -> str:
        """sha256 of the image encoder's weights as given (before a bf16 / fp16 cast): a
        probe file is tied to it."""
        if self._encoder_fp is None:
            self._encoder_fp = module_fingerprint(getattr(self.model, "visual", self.model))
        return self._encoder_fp

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"clip-teacher:{self.encoder_fingerprint()}:{self.precision}".encode())
        h.update(repr(self.preprocess).encode())
        heads = [self.logit_scale, self.class_weights]
        heads += [] if self.probe is None else [self.probe.weight, self.probe.bias]
        for t in heads:
            if t is not None:
                h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    # -- the linear probe ---------------------------------------------------------------
    def embed(self, dataset: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Deprecated: :func:`kdkit.run.clip_probe.embed` (``embed(teacher, dataset)``)."""
        raise _moved("embed")

    def fit_probe(self, labeled: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """Deprecated: :func:`kdkit.run.clip_probe.fit_probe` (``fit_probe(teacher, data)``),
        which fits the linear head with kdkit's Trainer and returns its history."""
        raise _moved("fit_probe")

    def save_probe(self, path: str | os.PathLike) -> Path:
        """Write the fitted head, the class names and the encoder fingerprint atomically."""
        if self.probe is None:
            raise KDError("no probe to save: call fit_probe(labeled_dataset) first")
        return clip_probe.save_probe(path, self.probe, self.class_names, self.encoder_fingerprint())

    def load_probe(self, path: str | os.PathLike, class_names: Sequence[str] | None = None) -> None:
        """Load a head written by :meth:`save_probe`; a head fitted on another encoder, or
        for other classes than ``class_names``, is refused."""
        probe, names = clip_probe.load_probe(path, self.encoder_fingerprint(), class_names)
        self.class_names = names
        if self.class_weights is not None and self.class_weights.shape[0] != len(names):
            self.class_weights = None
        self.probe = probe.to(self.device).eval().requires_grad_(False)


# Fitting a probe trains with the Trainer, a floor above the teachers: it lives in
# kdkit.run.clip_probe. The old names say where they went (importing them from here would
# run an import back up a floor).
_MOVED = {"embed", "fit_probe", "_initial_probe", "_Embeddings"}


def _moved(name: str) -> KDError:
    return KDError(
        f"kdkit.teachers.clip_teacher.{name} moved to kdkit.run.clip_probe.{name}: "
        f"from kdkit.run.clip_probe import {name}; {name}(teacher, ...)"
    )


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        raise _moved(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_ZERO_SHOT_KEYS = ("classes", "templates")


def clip_teacher_from_config(
    model: str,
    pretrained: str | None,
    zero_shot: Mapping[str, Any] | None,
    probe: str | None,
    kwargs: Mapping[str, Any] | None,
    *,
    student_mean: Sequence[float] | None = None,
    student_std: Sequence[float] | None = None,
    precision: str = "fp32",
) -> ClipTeacher:
    """The teacher of a config section ``{model: "open_clip:NAME", pretrained, zero_shot:
    {classes, templates}, probe: PATH, kwargs}``. ``kwargs`` go to ``open_clip.create_model``;
    ``student_mean``/``student_std`` are the data's normalisation (the student's input)."""
    prefix, _, name = model.partition(":")
    if prefix != "open_clip" or not name:
        raise KDError(f"a CLIP teacher's model must be 'open_clip:NAME', got {model!r}")
    if zero_shot is None and probe is None:
        raise KDError("an open_clip teacher needs zero_shot: {classes: [...]} or probe: PATH")
    classes = templates = None
    if zero_shot is not None:
        if not isinstance(zero_shot, Mapping):
            raise KDError(f"teacher.zero_shot must be a mapping, got {type(zero_shot).__name__}")
        for key in zero_shot:
            if key not in _ZERO_SHOT_KEYS:
                raise KDError(
                    f"teacher.zero_shot: unknown key {key!r}; did you mean "
                    f"{closest_names(key, _ZERO_SHOT_KEYS, 1)[0]!r}?"
                )
        if "classes" not in zero_shot:
            raise KDError("teacher.zero_shot needs classes: [name, ...]")
        classes, templates = zero_shot["classes"], zero_shot.get("templates")
    clip, tokenizer = build_open_clip(name, pretrained, kwargs or {})
    preprocess = ClipInput.from_model(clip, student_mean, student_std)
    if probe is not None:  # zero_shot.classes, if given, must be the probe's classes
        return ClipTeacher.linear_probe(
            clip, classes, probe=probe, preprocess=preprocess, precision=precision
        )
    return ClipTeacher.zero_shot(
        clip, tokenizer, classes, templates, preprocess, precision=precision
    )
