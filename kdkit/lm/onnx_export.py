"""Export of a causal LM teacher's decoder to ONNX, up to its final hidden states, keyed by
its weights: the file :class:`~kdkit.lm.onnx_teacher.OnnxLMTeacher` runs (the graph's inputs,
the mask convention and the cache folder are described there).

The sidecar ``<file>.json`` holds the weights' fingerprint, the export settings and the file's
own sha256, checked on every load: a stale or corrupted export is exported again, never reused.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit._fingerprint import module_fingerprint
from kdkit._io import atomic_path, atomic_write_json, sha256_file
from kdkit._ort import import_onnxruntime
from kdkit.capture import unwrap
from kdkit.errors import KDError
from kdkit.export import DEFAULT_OPSET, check_opset_atol, stamp_metadata
from kdkit.lm.models import hidden_and_head, output_head
from kdkit.teachers import quantize
from kdkit.teachers.onnx_teacher import load_session

__all__ = [
    "ONNX_LM_FORMAT_VERSION",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "causal_mask",
    "LMExport",
    "export_lm_onnx",
    "lm_onnx_path",
    "ensure_lm_onnx",
    "run_session",
]

log = logging.getLogger(__name__)

#: written into the sidecar and the file's metadata; a change re-exports every cached file
ONNX_LM_FORMAT_VERSION = 1
INPUT_NAMES = ("input_ids", "position_ids", "attention_mask")
OUTPUT_NAME = "hidden"


def run_session(
    session: Any, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    feed = {
        "input_ids": ids.detach().cpu().long().contiguous().numpy(),
        "position_ids": pos.detach().cpu().long().contiguous().numpy(),
        "attention_mask": mask.detach().cpu().contiguous().numpy(),
    }
    return torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])


# -- export --------------------------------------------------------------------------------------
class _DecoderGraph(nn.Module):
    """What is exported: the model up to its final hidden states, with a bool 4D mask."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return hidden_and_head(self.model, input_ids, position_ids, attention_mask).hidden


def causal_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The graph's ``[B, 1, L, L]`` bool mask (True = may attend) from what a caller has:
    ``None`` (every row full: causal), ``[B, L]`` padding (1 = token), or a ``[B, 1, L, L]``
    bool or additive float mask (0 = attend, a large negative number = masked)."""
    b, n = input_ids.shape
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
    if attention_mask is None:
        return causal.expand(b, 1, n, n)
    if attention_mask.shape != input_ids.shape:
        raise KDError(
            f"attention_mask of shape {tuple(attention_mask.shape)} for input_ids "
            f"{tuple(input_ids.shape)}: expected [B, L] or [B, 1, L, L]"
        )
    return causal & attention_mask.bool()[:, None, None, :]


def _example(batch: int, length: int, vocab: int, padded: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    pos = torch.arange(length).expand(batch, length).contiguous()
    pad = torch.ones(batch, length, dtype=torch.long)
    if padded and batch > 1:
        pad[-1, length // 2 :] = 0  # one right-padded row, as the Aligner pads
    return ids, pos, causal_mask(ids, pad).contiguous(), pad


@dataclass(frozen=True)
class LMExport:
    """An exported LM decoder: ``path``, its sidecar record, and whether it was built now."""

    path: Path
    record: dict[str, Any]
    built: bool


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def export_lm_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    atol: float = 1e-4,
    fingerprint: str | None = None,
) -> LMExport:
    """Export ``model``'s decoder to ``path`` (final hidden states; inputs in the module
    docstring), dynamic batch and length, written atomically with its sidecar.

    TorchScript exporter at opset 17 (as :func:`kdkit.export_onnx`, which says why). With
    ``verify``, a batch of 3 rows (one right-padded) at another length than the traced one goes
    through ONNX Runtime and PyTorch; a max abs difference above ``atol`` on the real tokens
    raises :class:`KDError` and nothing replaces ``path``. ``fingerprint``: the weights'
    :func:`~kdkit._fingerprint.module_fingerprint` when the caller has it already.
    """
    check_opset_atol(opset, atol)
    model = unwrap(model)
    head = output_head(model)
    if head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        raise KDError(
            f"the ONNX LM teacher is exported from float32 weights on the CPU, got "
            f"{head.weight.dtype} on {head.weight.device}; load the teacher in float32 "
            "(drop teacher.dtype) for backend: onnx"
        )
    path = Path(path)
    fingerprint = fingerprint or module_fingerprint(model)
    vocab = head.out_features
    modes = {m: m.training for m in model.modules()}
    model.eval()
    graph = _DecoderGraph(model)
    diff = None
    try:
        with atomic_path(path) as tmp:
            ids, pos, mask, _ = _example(2, 8, vocab, padded=False)
            with torch.no_grad(), warnings.catch_warnings():
                # the TorchScript exporter announces its deprecation, HF its tracer checks
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(
                        graph,
                        (ids, pos, mask),
                        str(tmp),
                        dynamo=False,
                        input_names=list(INPUT_NAMES),
                        output_names=[OUTPUT_NAME],
                        dynamic_axes={
                            "input_ids": {0: "batch", 1: "length"},
                            "position_ids": {0: "batch", 1: "length"},
                            "attention_mask": {0: "batch", 2: "length", 3: "length"},
                            OUTPUT_NAME: {0: "batch", 1: "length"},
                        },
                        opset_version=opset,
                        do_constant_folding=True,
                    )
                except Exception as err:
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    raise KDError(
                        f"ONNX export of the LM {type(model).__name__} failed at opset {opset} "
                        f"({first[:300]}); {path} was left as it was"
                    ) from None
            stamp_metadata(
                tmp,
                {
                    "kdkit.format_version": str(ONNX_LM_FORMAT_VERSION),
                    "kdkit.model_fingerprint": fingerprint,
                    "kdkit.model_class": type(model).__qualname__,
                    "kdkit.output": "final hidden states [B, L, H]",
                },
            )
            if verify:
                diff = _verify(graph, tmp, vocab)
                if diff > atol:
                    raise KDError(
                        f"{path}: ONNX Runtime's hidden states differ from PyTorch's by "
                        f"{diff:.3g} (> atol={atol:g}); the export is not faithful, run the "
                        "teacher with backend: torch"
                    )
    finally:
        for m, mode in modes.items():
            m.training = mode
    record = {
        "format_version": ONNX_LM_FORMAT_VERSION,
        "model_fingerprint": fingerprint,
        "model_class": type(model).__qualname__,
        "opset": opset,
        "torch": torch.__version__,
        "max_abs_diff": diff,
        "sha256": sha256_file(path),
    }
    atomic_write_json(_sidecar(path), record)
    log.info("exported the LM teacher's decoder to %s (max abs diff %s)", path, diff)
    return LMExport(path, record, built=True)


def _verify(graph: nn.Module, path: Path, vocab: int) -> float:
    """Max abs difference of the hidden states on the real tokens, at batch 3 and length 11."""
    ort = import_onnxruntime()
    session = load_session(path, ["CPUExecutionProvider"], ort, threads=1)
    ids, pos, mask, pad = _example(3, 11, vocab, padded=True)
    with torch.no_grad():
        want = graph(ids, pos, mask)
    got = run_session(session, ids, pos, mask)
    if got.shape != want.shape:
        raise KDError(
            f"{path}: ONNX Runtime returned hidden states of shape {tuple(got.shape)}, PyTorch "
            f"{tuple(want.shape)}; a dynamic axis was traced as a constant"
        )
    keep = pad.bool()
    return float((got[keep] - want[keep]).abs().max())


def lm_onnx_path(
    model: nn.Module, cache_dir: str | os.PathLike | None = None, fingerprint: str | None = None
) -> Path:
    """``<cache_dir>/<Class>-<weights hash>.lm.onnx`` (default ``~/.cache/kdkit/onnx``)."""
    fingerprint = fingerprint or module_fingerprint(model)
    name = type(unwrap(model)).__name__
    return Path(cache_dir or quantize.default_cache_dir()) / f"{name}-{fingerprint[:16]}.lm.onnx"


def _export_ok(path: Path, fingerprint: str) -> bool:
    """Is the file at ``path`` the export of these weights, byte for byte?"""
    import json

    if not path.is_file():
        return False
    try:
        record = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("format_version") != ONNX_LM_FORMAT_VERSION:
        log.warning("%s has no matching sidecar; exporting the teacher again", path)
        return False
    if record.get("model_fingerprint") != fingerprint:
        log.warning("%s was exported from other weights (stale); exporting again", path)
        return False
    if record.get("sha256") != sha256_file(path):
        log.warning("%s does not match its checksum (corrupted); exporting again", path)
        return False
    return True


def ensure_lm_onnx(
    model: nn.Module,
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
) -> LMExport:
    """The export of ``model``'s current weights at ``path`` (default :func:`lm_onnx_path`):
    reused when its sidecar names these weights and its checksum holds, else exported now."""
    import json

    fingerprint = module_fingerprint(model)
    path = Path(path) if path is not None else lm_onnx_path(model, cache_dir, fingerprint)
    if _export_ok(path, fingerprint):
        log.info("using the cached ONNX export %s", path)
        return LMExport(path, json.loads(_sidecar(path).read_text()), built=False)
    try:
        return export_lm_onnx(model, path, opset=opset, fingerprint=fingerprint)
    except OSError as err:
        raise KDError(
            f"could not write the ONNX export {path} ({err}); pass cache_dir= a writable folder"
        ) from None
