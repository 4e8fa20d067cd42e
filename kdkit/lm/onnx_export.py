"""Export of a causal LM teacher's decoder to ONNX, up to its final hidden states, keyed by
its weights: the file :class:`~kdkit.lm.onnx_teacher.OnnxLMTeacher` runs (the graph's inputs
and the cache folder are described there).

The graph takes ``input_ids`` and ``position_ids`` only, and the model's own mask code is traced
into it: transformers finds the documents of a packed row from ``position_ids`` and builds each
layer type's mask (sliding windows, chunked layers) as it does in PyTorch. Format 1 took a
``[B, 1, L, L]`` bool mask instead, which the model used as given: every sliding window was
lost (a Mistral or Gemma 2 row longer than its window attended outside it), and a layer type
needing another mask could not get one. Two ops of that code have no TorchScript-exporter
symbolic at opset 17 (``aten::diff``; ``aten::cumsum`` of a bool tensor); :func:`_mask_ops`
registers both for the export only (``torch.onnx.register_custom_op_symbolic``, removed after).

The sidecar ``<file>.json`` holds the weights' fingerprint, the export settings and the file's
own sha256, checked on every load: a stale or corrupted export is exported again, never reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
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
from kdkit.lm.packing import positions_from_mask
from kdkit.teachers import quantize
from kdkit.teachers.onnx_teacher import load_session

__all__ = [
    "ONNX_LM_FORMAT_VERSION",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "causal_mask",
    "graph_positions",
    "LMExport",
    "export_lm_onnx",
    "lm_onnx_path",
    "ensure_lm_onnx",
    "run_session",
]

log = logging.getLogger(__name__)

#: written into the sidecar and the file's metadata; a change re-exports every cached file
ONNX_LM_FORMAT_VERSION = 2
INPUT_NAMES = ("input_ids", "position_ids")
OUTPUT_NAME = "hidden"


def run_session(
    session: Any, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The graph's hidden states for ``ids`` and per-document positions ``pos``. ``mask`` (the
    format-1 graph's input) is not read: the documents are in ``pos`` (:func:`graph_positions`
    makes them from a mask)."""
    feed = {
        "input_ids": ids.detach().cpu().long().contiguous().numpy(),
        "position_ids": pos.detach().cpu().long().contiguous().numpy(),
    }
    return torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])


def graph_positions(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The graph's ``position_ids`` from what a caller has: per-document positions (a packed
    row restarts at 0), with padding at position 0 (each padding token then stands alone, so
    no token attends to it). ``attention_mask``: ``[B, L]`` padding (1 = token) or a
    ``[B, 1, L, L]`` block-causal mask (bool, or additive float)."""
    b, n = input_ids.shape
    if attention_mask is not None and attention_mask.dim() == 4:
        return position_ids if position_ids is not None else positions_from_mask(attention_mask)
    if attention_mask is None:
        if position_ids is not None:
            return position_ids
        return torch.arange(n, device=input_ids.device).expand(b, n)
    if attention_mask.shape != input_ids.shape:
        raise KDError(
            f"attention_mask of shape {tuple(attention_mask.shape)} for input_ids "
            f"{tuple(input_ids.shape)}: expected [B, L] or [B, 1, L, L]"
        )
    pad = attention_mask.long()
    if position_ids is None:
        position_ids = (pad.cumsum(-1) - 1).clamp(min=0)
    return position_ids * pad


def causal_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """A ``[B, 1, L, L]`` bool mask (True = may attend) from what a caller has: ``None`` (every
    row full: causal), ``[B, L]`` padding (1 = token), or a ``[B, 1, L, L]`` bool or additive
    float mask. The format-1 graph's input; kept for callers (the graph now takes positions)."""
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


@contextlib.contextmanager
def _mask_ops(opset: int) -> Iterator[None]:
    """ONNX symbolics for the two ops of transformers' mask code the exporter lacks, registered
    for one export and removed after (no global change outlives it)."""
    from torch.onnx import (
        register_custom_op_symbolic,
        symbolic_opset11,
        unregister_custom_op_symbolic,
    )
    from torch.onnx import symbolic_helper as sh

    @sh.parse_args("v", "i", "i", "v", "v")
    def diff(g: Any, x: Any, n: int, axis: int, prepend: Any, append: Any) -> Any:
        if n != 1 or not append.node().mustBeNone():
            raise KDError("the LM export supports torch.diff(n=1, prepend=...) only")
        full = x if prepend.node().mustBeNone() else g.op("Concat", prepend, x, axis_i=axis)

        def cut(start: int, end: int) -> Any:
            return g.op(
                "Slice",
                full,
                g.op("Constant", value_t=torch.tensor([start])),
                g.op("Constant", value_t=torch.tensor([end])),
                g.op("Constant", value_t=torch.tensor([axis])),
            )

        return g.op("Sub", cut(1, 2**62), cut(0, -1))

    def cumsum(g: Any, x: Any, dim: Any, dtype: Any) -> Any:
        if x.type().scalarType() == "Bool":  # ONNX CumSum takes numbers: count in int64
            x = g.op("Cast", x, to_i=7)  # TensorProto.INT64
        return symbolic_opset11.cumsum(g, x, dim, dtype)

    register_custom_op_symbolic("aten::diff", diff, opset)
    register_custom_op_symbolic("aten::cumsum", cumsum, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::diff", opset)
        unregister_custom_op_symbolic("aten::cumsum", opset)


# -- export --------------------------------------------------------------------------------------
class _DecoderGraph(nn.Module):
    """What is exported: the model up to its final hidden states; the documents of a packed
    row come from ``position_ids`` and the model builds its own masks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return hidden_and_head(self.model, input_ids, position_ids, None).hidden


def _example(batch: int, length: int, vocab: int, varied: bool) -> tuple[torch.Tensor, ...]:
    """``(ids, positions, real)``; ``varied``: the rows are one full row, one packed row of two
    documents and one right-padded row, as the Aligner makes them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    pos = torch.arange(length).expand(batch, length).contiguous()
    real = torch.ones(batch, length, dtype=torch.bool)
    if varied and batch >= 3:
        half = length // 2
        pos[1, half:] = torch.arange(length - half)  # a second document starts at `half`
        pos[2, half:] = 0  # padding
        real[2, half:] = False
    return ids, pos, real


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
            ids, pos, _ = _example(2, 8, vocab, varied=False)
            with torch.no_grad(), warnings.catch_warnings(), _mask_ops(opset):
                # the TorchScript exporter announces its deprecation, HF its tracer checks
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(
                        graph,
                        (ids, pos),
                        str(tmp),
                        dynamo=False,
                        input_names=list(INPUT_NAMES),
                        output_names=[OUTPUT_NAME],
                        dynamic_axes={
                            "input_ids": {0: "batch", 1: "length"},
                            "position_ids": {0: "batch", 1: "length"},
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
    """Max abs difference of the hidden states on the real tokens, at batch 3 and length 11
    (a full row, a packed row, a padded row)."""
    ort = import_onnxruntime()
    session = load_session(path, ["CPUExecutionProvider"], ort, threads=1)
    ids, pos, keep = _example(3, 11, vocab, varied=True)
    with torch.no_grad():
        want = graph(ids, pos)
    got = run_session(session, ids, pos)
    if got.shape != want.shape:
        raise KDError(
            f"{path}: ONNX Runtime returned hidden states of shape {tuple(got.shape)}, PyTorch "
            f"{tuple(want.shape)}; a dynamic axis was traced as a constant"
        )
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
