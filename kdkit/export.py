"""Ship the student: ONNX export verified against ONNX Runtime before it replaces anything.

``export_onnx`` writes a model with a dynamic batch axis and checks it right away: the same
random batch goes through PyTorch and ONNX Runtime and the largest absolute difference is
reported (and refused above ``atol`` for fp32 models).

Exporter and opset: we use PyTorch's TorchScript-based exporter (``dynamo=False``) at opset
17. Measured on torch 2.14 + onnxruntime 1.32 for fmnist_teacher/student, resnet18 and
mobilenet_v3 (convs, BN, residuals, hardswish), both exporters gave the same outputs (max abs
difference <= 5e-6 at batch 1 and 3), but the dynamo exporter needs the extra ``onnxscript``
package, took 3-10 s per model instead of 0.03-0.4 s, and implements opset 18 and up only
(its down-conversion to 17 failed). Opset 17 is read by every ONNX Runtime and TensorRT 8.6+
release and already has LayerNormalization. ``dynamo=True`` selects the new exporter (opset
18 by default) for models the TorchScript exporter cannot trace.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit._fingerprint import module_fingerprint
from kdkit._io import atomic_path, check_output_path, sha256_file
from kdkit._ort import import_onnxruntime
from kdkit.capture import unwrap
from kdkit.errors import KDError
from kdkit.load import load_model, load_student

__all__ = [
    "ExportReport",
    "export_onnx",
    "load_model",
    "load_student",
    "DEFAULT_OPSET",
    "ONNX_FORMAT_VERSION",
    "check_opset_atol",
    "stamp_metadata",
]

log = logging.getLogger(__name__)

#: opset of the TorchScript exporter (see the module docstring for the measurements)
DEFAULT_OPSET = 17
_DYNAMO_DEFAULT_OPSET = 18
#: opsets the exporters accept (the TorchScript exporter refuses < 7; ONNX 1.17 stops at 23)
_MIN_OPSET, _MAX_OPSET = 7, 23
#: written into the ONNX file's metadata as ``kdkit.format_version``
ONNX_FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how closely ONNX Runtime matches PyTorch.

    ``max_abs_diff`` is ``None`` when verification was skipped; ``verify_batch`` is the batch
    size used for it (not the export batch, to exercise the dynamic axis).
    """

    path: Path
    opset: int
    max_abs_diff: float | None
    input_shape: tuple[int, ...]
    size_bytes: int
    exporter: str
    sha256: str
    verify_batch: int
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME

    def summary(self) -> str:
        diff = "not verified" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        return (
            f"wrote {self.path} ({self.size_bytes / 2**20:.2f} MiB, opset {self.opset}, "
            f"{self.exporter} exporter, input (N, {', '.join(map(str, self.input_shape))})); "
            f"max abs diff vs PyTorch at batch {self.verify_batch}: {diff}"
        )


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise KDError(
            f"input_shape must be the per-sample shape without the batch axis, e.g. (1, 28, 28); "
            f"got {tuple(input_shape)}"
        )
    return shape


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise KDError(f"the model returned {type(out).__name__}; export needs a tensor output")
    return out


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def _torch_export(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamo: bool) -> None:
    with warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation on every call
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        if dynamo:
            if importlib.util.find_spec("onnxscript") is None:
                raise KDError("the dynamo ONNX exporter needs onnxscript: pip install onnxscript")
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                external_data=False,
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )


def stamp_metadata(path: Path, props: dict[str, str]) -> None:
    """Record kdkit's format version and the source model's fingerprint in the ONNX file."""
    try:
        import onnx
    except ImportError:  # onnxruntime alone can still run the file
        log.debug("onnx not installed; %s written without kdkit metadata", path)
        return
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def check_opset_atol(opset: int, atol: float) -> None:
    if not isinstance(opset, int) or not _MIN_OPSET <= opset <= _MAX_OPSET:
        raise KDError(
            f"opset must be an integer in [{_MIN_OPSET}, {_MAX_OPSET}] (default "
            f"{DEFAULT_OPSET}), got {opset!r}"
        )
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise KDError(f"atol must be a finite number >= 0, got {atol!r}")


def _verify(model: nn.Module, path: Path, shape: tuple[int, ...], batch: int, label: Path) -> float:
    """Max abs difference between ONNX Runtime (the file at ``path``) and PyTorch."""
    ort = import_onnxruntime()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KDError(
            f"ONNX Runtime cannot load the exported {label.name} ({first[:300]}); {label} was "
            "left as it was"
        ) from None
    device, dtype = _model_device_dtype(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen).to(dtype)
    with torch.no_grad():
        ref = _first_tensor(model(x.to(device))).float().cpu()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    got = torch.from_numpy(got).float()
    if got.shape != ref.shape:
        raise KDError(
            f"{label}: ONNX Runtime returned shape {tuple(got.shape)} at batch {batch}, PyTorch "
            f"{tuple(ref.shape)}; the batch axis may have been traced as a constant"
        )
    return float((got - ref).abs().max())


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    *,
    dynamo: bool = False,
    metadata: dict[str, str] | None = None,
) -> ExportReport:
    """Export ``model`` to ``path`` with a dynamic batch axis, then check it with ONNX Runtime.

    ``input_shape`` is one sample's shape, ``(C, H, W)``; the file takes ``(N, C, H, W)``
    float input named ``"input"`` and returns ``"logits"``. The model is put in eval mode for
    the export and every submodule's train/eval flag is restored afterwards. The file is
    written atomically and carries ``kdkit.format_version`` and ``kdkit.model_fingerprint``
    metadata. With ``verify`` (fp32 models), a batch of 3 (the export traces batch 2) goes
    through both runtimes; a max abs difference above ``atol`` raises :class:`KDError`.
    ``metadata``: more ``metadata_props`` (``kdkit export`` adds ``kdkit.classes``, a JSON
    list of class names, and ``kdkit.mean`` / ``kdkit.std``: what ``kdkit predict`` reads).
    """
    shape = _check_shape(input_shape)
    opset = opset or (_DYNAMO_DEFAULT_OPSET if dynamo else DEFAULT_OPSET)
    check_opset_atol(opset, atol)
    model = unwrap(model)
    path = check_output_path(path, what="the ONNX file")
    device, dtype = _model_device_dtype(model)
    if verify and dtype != torch.float32:
        log.warning(
            "%s: %s weights; ONNX Runtime verification runs for fp32 models only", path, dtype
        )
    verify = verify and dtype == torch.float32
    modes = {m: m.training for m in model.modules()}
    model.eval()
    diff = None
    try:
        # the file replaces ``path`` only after it was written, stamped and verified
        with atomic_path(path) as tmp:
            x = torch.randn((2, *shape), device=device, dtype=dtype)
            with torch.no_grad():
                try:
                    _torch_export(model, x, tmp, opset, dynamo)
                except KDError:
                    raise
                except Exception as err:
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    raise KDError(
                        f"ONNX export of {type(model).__name__} failed at opset {opset} "
                        f"({first[:300]}); {path} was left as it was"
                    ) from err
            stamp_metadata(
                tmp,
                {
                    "kdkit.format_version": str(ONNX_FORMAT_VERSION),
                    "kdkit.model_fingerprint": module_fingerprint(model),
                    "kdkit.model_class": type(model).__qualname__,
                    "kdkit.input_shape": ",".join(map(str, shape)),
                    **(metadata or {}),
                },
            )
            if verify:
                diff = _verify(model, tmp, shape, batch=3, label=path)
                if diff > atol:
                    raise KDError(
                        f"{path}: ONNX Runtime differs from PyTorch by {diff:.3g} (> atol="
                        f"{atol:g}); the export is not faithful (try another opset, or "
                        f"dynamo=True); {path} was left as it was"
                    )
    finally:
        for m, mode in modes.items():
            m.training = mode
    report = ExportReport(
        path=path,
        opset=opset,
        max_abs_diff=diff,
        input_shape=shape,
        size_bytes=path.stat().st_size,
        exporter="dynamo" if dynamo else "torchscript",
        sha256=sha256_file(path),
        verify_batch=3,
    )
    log.debug("%s", report.summary())  # the caller shows the report (kdkit export prints it)
    return report
