"""Checkpoint files as data: their format, their checksum, and the model they rebuild.

A kdkit checkpoint is a ``torch.save`` dict read back with ``weights_only=True``::

    {"format": "kdkit-checkpoint", "version": 2, "role": "student",
     "checksum": "<sha256 over every tensor and value>",
     "student": state_dict, "student_spec": {"model": "kdkit:fmnist_student", "kwargs": {}},
     "input_shape": [1, 28, 28], ...}

``role`` says what the file holds ("student" for trainer checkpoints, "teacher" for a trained
teacher); the weights sit under that key and the model spec under ``<role>_spec``. The spec is
data (:class:`~kdkit.registry.ModelSpec`): only registered builders load unless the caller
passes ``trust_code=True``, so a file naming ``subprocess:call`` is refused before anything is
imported. ``weights_only=True`` alone does not give that: it stops pickled objects, not a file
that names the function to call.

The checksum covers every tensor's bytes, dtype and shape and every plain value, so a flipped
exponent bit in a weight (weights off by 1e37 that would load, resume and export) is refused.
Version 1 files (no role, no checksum, ``{"factory": "pkg.mod:fn"}`` specs) still load.

It also reads plain weights files (:func:`read_state_dict`, :func:`load_weights`: a
``.safetensors`` file, another trainer's ``{"state_dict": ...}``, or a kdkit checkpoint,
checksummed like any load of it).

This module sits on the ground floor (torch, registry, capture, _io): the teacher factory,
export, bench and the trainer all read checkpoints through it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit._io import atomic_torch_save, state_checksum
from kdkit.capture import strip_prefixes
from kdkit.errors import KDError
from kdkit.registry import ModelSpec, build_model, import_optional

__all__ = [
    "FORMAT",
    "VERSION",
    "ROLES",
    "checksum",
    "load_checkpoint",
    "load_model",
    "load_student",
    "load_weights",
    "read_state_dict",
    "restore_part",
    "save_checkpoint",
    "spec_from_text",
    "strip_wrapper_prefixes",
]

FORMAT = "kdkit-checkpoint"
VERSION = 2
ROLES = ("student", "teacher")
_HEADER = ("format", "version", "checksum")


def checksum(state: Mapping[str, Any]) -> str:
    """sha256 over every entry of ``state`` except the header (format, version, checksum)."""
    return state_checksum(state, exclude=_HEADER)


def save_checkpoint(
    path: str | os.PathLike, state: Mapping[str, Any], *, role: str | None = None
) -> Path:
    """Atomically write ``state`` with format, version, role and checksum to ``path``.

    ``role`` defaults to ``state["role"]``, else ``"student"``.
    """
    role = role or state.get("role") or "student"
    if role not in ROLES:
        raise KDError(f"checkpoint role must be one of {list(ROLES)}, got {role!r}")
    body = {**state, "role": role}
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):  # kdkit 0.1's temp names
        stale.unlink(missing_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "checksum": checksum(body), **body}
    try:
        return atomic_torch_save(payload, path)
    except OSError as err:
        raise KDError(
            f"cannot write the checkpoint {path} ({err.strerror or err}); the previous file "
            f"there, if any, is intact. Free disk space or choose another directory"
        ) from None


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Read a kdkit checkpoint, refusing files that are not one or fail their checksum."""
    path = Path(path)
    if not path.is_file():
        hint = "" if not path.is_dir() else " (this is a directory; give a .pt file in it)"
        raise KDError(f"no checkpoint at {path}{hint}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torn, foreign or pickled-code file
        # torch's own message here suggests weights_only=False, the one thing not to do
        raise KDError(
            f"{path} is not a readable checkpoint: not a torch file, truncated, or holding "
            "objects other than tensors and plain values (kdkit loads weights_only=True and "
            "never unpickles code); use a checkpoint written by kdkit"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise KDError(f"{path} is not a kdkit checkpoint (no format={FORMAT!r} key)")
    version = state.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise KDError(
            f"{path} was written by a newer kdkit (format version {version!r} > {VERSION}); "
            "upgrade kdkit"
        )
    if version >= 2 and verify:
        want = state.get("checksum")
        if not isinstance(want, str) or checksum(state) != want:
            raise KDError(
                f"{path} fails its checksum: its weights or values were modified or corrupted "
                "after it was written; use another checkpoint (best.pt / an earlier copy)"
            )
    check_plain_fields(state, path)
    return state


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_FIELD_RULES: dict[str, tuple[Any, str]] = {
    "input_shape": (
        lambda v: (
            isinstance(v, (list, tuple))
            and 1 <= len(v) <= 4
            and all(_is_int(d) and 1 <= d <= 1_000_000 for d in v)
        ),
        "a list of 1 to 4 positive sizes (C, H, W)",
    ),
    "mean": (
        lambda v: isinstance(v, (list, tuple)) and len(v) in (1, 3) and all(map(_is_number, v)),
        "1 or 3 finite numbers",
    ),
    "std": (
        lambda v: (
            isinstance(v, (list, tuple))
            and len(v) in (1, 3)
            and all(_is_number(x) and x > 0 for x in v)
        ),
        "1 or 3 numbers > 0",
    ),
    "config": (lambda v: isinstance(v, Mapping), "a mapping (the run's config)"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "step": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


def check_plain_fields(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """The plain values beside the weights are checked like a spec is: a checkpoint whose
    checksum holds but whose ``input_shape`` is ``[0, -3]`` (or ``std`` holds a zero, or
    ``config`` is a string) is a :class:`KDError`, not a traceback from eval or export."""
    for key, (ok, expected) in _FIELD_RULES.items():
        value = state.get(key)
        if value is not None and not ok(value):
            raise KDError(
                f"{path}: its {key!r} is {value!r}, not {expected}; the file is damaged or was "
                "not written by kdkit: use another checkpoint"
            )


def spec_from_text(text: str, *, where: str = "model") -> ModelSpec:
    """A spec from a command-line string: ``"kdkit:fmnist_teacher"``,
    ``"torchvision:resnet18"``, or kdkit 0.1's ``"kdkit.models:fmnist_teacher"`` (a dotted
    module before the colon is read as a legacy factory, so it needs trust unless it is
    ``kdkit.models``)."""
    prefix = text.partition(":")[0]
    if "." in prefix:
        return ModelSpec.parse({"factory": text}, where=where)
    return ModelSpec.parse(text, where=where)


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    return False


def _role_of(path: Path, ckpt: Mapping[str, Any], role: str | None) -> str:
    held = ckpt.get("role")
    if role is not None and role not in ROLES:
        raise KDError(f"role must be one of {list(ROLES)} or None, got {role!r}")
    if held is None:  # version 1: weights always under "student", whatever they were
        return "student"
    if held not in ROLES:
        raise KDError(f"{path}: unknown role {held!r} (expected one of {list(ROLES)})")
    if role is not None and role != held:
        raise KDError(
            f"{path} holds a {held}, not a {role}; load it with kdkit.load_model(path) "
            f"(or role={held!r})"
        )
    return held


def load_model(
    path: str | os.PathLike,
    *,
    role: str | None = None,
    trust_code: bool = False,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint holds: ``(module in eval mode, meta)``.

    ``role``: ``"student"`` / ``"teacher"`` to insist on what the file holds (a mismatch is a
    :class:`KDError`), ``None`` to take whichever it holds. The spec must name a registered
    builder (``kdkit:``, ``torchvision:``, ``timm:``, ``open_clip:``); ``python:`` specs need
    ``trust_code=True``. Weights load strictly (``module.`` / ``_orig_mod.`` prefixes are
    stripped). ``meta`` holds the file's plain values (``role``, ``input_shape``, ``mean``,
    ``std``, ``epoch``, the spec as a dict...), not its state dicts.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location=map_location)
    held = _role_of(path, ckpt, role)
    weights, spec_key = ckpt.get(held), f"{held}_spec"
    missing = [k for k, v in ((held, weights), (spec_key, ckpt.get(spec_key))) if v is None]
    if missing:
        raise KDError(
            f"{path} has no {' / '.join(missing)}; it was not written by a Trainer that knows "
            "how to rebuild the model (pass student_spec= to the Trainer)"
        )
    if not isinstance(weights, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise KDError(f"{path}: {held!r} is {type(weights).__name__}, not a state dict")
    where = f"{path}: {spec_key}"
    spec = ModelSpec.parse(ckpt[spec_key], where=where)
    module = build_model(spec, trust_code=trust_code, where=where)
    try:
        result = module.load_state_dict(strip_wrapper_prefixes(weights), strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise KDError(f"{path}: the weights do not fit {spec.model}: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise KDError(
            f"{path}: the weights do not fit {spec.model}: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    meta = {k: v for k, v in ckpt.items() if k != held and not _holds_tensors(v)}
    meta["role"] = held
    meta[spec_key] = spec.to_dict()
    return module.eval(), meta


def load_student(
    checkpoint_path: str | os.PathLike, *, trust_code: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_model` with ``role="student"`` (the trained student of a Trainer run)."""
    return load_model(checkpoint_path, role="student", trust_code=trust_code)


# -- weights files (any state dict: a kdkit checkpoint, safetensors, other trainers') --


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) from state-dict keys."""
    return {strip_prefixes(key): value for key, value in state.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``).

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` (common trainer
    layouts) or a kdkit checkpoint (``"student"`` or ``"teacher"``) is unwrapped to the state
    dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise KDError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        st = import_optional("safetensors.torch", "safetensors")
        try:
            return dict(st.load_file(str(path)))
        except Exception as err:
            raise KDError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's message suggests weights_only=False: the one thing not to do with a file
        # that holds pickled objects (it would run whatever code they name)
        text = str(err)
        if "GLOBAL" in text or "Unsupported global" in text:
            raise KDError(
                f"{path} holds pickled Python objects, not only tensors: kdkit loads weights "
                "with weights_only=True and never unpickles code; save a state dict "
                "(torch.save(model.state_dict(), path)) or a .safetensors file"
            ) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "weights_only" not in ln), type(err).__name__)
        raise KDError(
            f"{path} is not a readable torch weights file ({detail[:200]}): not a torch file, "
            "or truncated"
        ) from None
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        _verify_kdkit_checkpoint(obj, path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "student", "teacher"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KDError(f"{path} does not hold a state dict (name -> tensor)")
    return dict(obj)


def _verify_kdkit_checkpoint(obj: Mapping[str, Any], path: Path) -> None:
    """A kdkit checkpoint used as a weights file is checked like any other load of it."""
    if obj.get("version", 0) >= 2 and obj.get("checksum") != checksum(obj):
        raise KDError(
            f"{path} fails its checksum: its weights were modified or corrupted after it was "
            "written; use another checkpoint"
        )


def load_weights(module: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a weights file into ``module``; a mismatch names the missing/unexpected keys."""
    state = strip_wrapper_prefixes(read_state_dict(path))
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise KDError(f"{path}: the weights do not fit {type(module).__name__}: {err}") from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise KDError(
            f"{path}: the weights do not fit {type(module).__name__}: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return module


def restore_part(path: Path | str, part: str, target: Any, state: Any) -> None:
    """``target.load_state_dict(state)``; a checkpoint of another architecture or optimizer
    is a KDError naming the part, not a raw size-mismatch traceback."""
    if state is None:
        raise KDError(f"{path} has no {part!r} state; it is not a Trainer checkpoint")
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines() or [type(err).__name__]
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise KDError(
            f"cannot resume from {path}: its {part} does not fit this run's ({detail}); resume "
            "with the same model, losses and optimizer, or use another checkpoint_dir"
        ) from None
