"""The linear-probe file of a :class:`~kdkit.teachers.clip_teacher.ClipTeacher`.

A probe file holds the head's weight and bias, the class names, and the sha256 of the image
encoder it was fitted on: a head is only meaningful on the embeddings it was trained on, so
loading it onto another encoder (or for other classes) is refused instead of silently giving
wrong logits. Written atomically; read with ``weights_only=True`` (no code runs).
Fitting a probe is :mod:`kdkit.run.clip_probe` (it trains with the Trainer, a floor above).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kdkit._io import atomic_torch_save
from kdkit.errors import KDError
from kdkit.teachers._clip import check_classes

__all__ = ["PROBE_FORMAT", "PROBE_VERSION", "load_probe", "save_probe"]

log = logging.getLogger(__name__)

PROBE_FORMAT = "kdkit-clip-probe"
PROBE_VERSION = 1


def save_probe(
    path: str | os.PathLike,
    probe: nn.Linear,
    class_names: Sequence[str],
    encoder_fingerprint: str,
) -> Path:
    """Write the head, the class names and the encoder fingerprint atomically."""
    payload = {
        "format": PROBE_FORMAT,
        "version": PROBE_VERSION,
        "class_names": list(class_names),
        "encoder_fingerprint": encoder_fingerprint,
        "weight": probe.weight.detach().cpu(),
        "bias": probe.bias.detach().cpu(),
    }
    return atomic_torch_save(payload, path)


def load_probe(
    path: str | os.PathLike,
    encoder_fingerprint: str,
    class_names: Sequence[str] | None = None,
) -> tuple[nn.Linear, tuple[str, ...]]:
    """``(head on the CPU, its class names)`` from a file written by :func:`save_probe`; a
    head fitted on another encoder, or for other classes than ``class_names``, is refused."""
    path = Path(path)
    if not path.is_file():
        raise KDError(f"no probe file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise KDError(f"{path} is not a readable probe file ({err})") from None
    if not isinstance(state, dict) or state.get("format") != PROBE_FORMAT:
        raise KDError(f"{path} is not a kdkit probe file (save one with save_probe)")
    if state.get("version") != PROBE_VERSION:
        raise KDError(f"{path}: probe format version {state.get('version')} is not supported")
    names = check_classes(state["class_names"])
    if class_names is not None and tuple(class_names) != names:
        raise KDError(f"{path} was fitted for classes {list(names)}, not {list(class_names)}")
    if state["encoder_fingerprint"] != encoder_fingerprint:
        raise KDError(
            f"{path} was fitted on another image encoder (fingerprint "
            f"{state['encoder_fingerprint'][:12]}, this one {encoder_fingerprint[:12]})"
        )
    weight, bias = state["weight"], state["bias"]
    probe = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        probe.weight.copy_(weight)
        probe.bias.copy_(bias)
    return probe, names
