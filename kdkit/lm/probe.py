"""The logits probe: kdkit's view of a model checked against the model's own logits, once.

kdkit never asks a model for its logits during training: it takes the final hidden states and
the head and applies what the family does after the head itself
(:func:`kdkit.lm.logits.output_transform`), chunk by chunk. That is right only if kdkit knows
the family. So before the first step, for the student and the teacher, the probe runs a few
real tokens (the first document of the first training row, at most :data:`PROBE_TOKENS`)
through the model's own ``forward(...).logits`` and through kdkit's view (hidden, head,
transform) and compares them. A difference above the tolerance is a one-line
:class:`~kdkit.errors.KDError` naming the family and what differs ("its logits are kdkit's
x 4: an output scale kdkit does not know"), before any weight moves.

With packed rows it also builds a row of two documents from the same real tokens and checks
that the second one's hidden states equal those of the document alone: a family whose decoder
attends across documents is refused with ``data.pack: false`` as the fix. The documents are
short, so a sliding window longer than them is not exercised here; that every family keeps its
window in packed rows is what ``tests/test_lm_families.py`` checks, with windows of 4 tokens.

Cost: two or three forwards of at most 32 tokens per model, once per run, in eval mode (no
dropout, no RNG drawn, so an exact resume is not disturbed). The results go into the run's
``report.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm.logits import OutputTransform, family_of, output_transform, project_logits
from kdkit.lm.models import decoder_outputs
from kdkit.lm.packing import check_packing, packing_path

__all__ = ["PROBE_TOKENS", "ProbeResult", "probe_model", "probe_tolerance"]

log = logging.getLogger(__name__)

#: tokens of the first document the probe compares (and of each document of its packed row)
PROBE_TOKENS = 32


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found for one model: the largest ``|kdkit view - own logits|``
    (None when the model has no logits of its own: an ONNX graph, a protocol module), and
    the packed row's largest ``|d hidden|`` (None when not checked)."""

    role: str
    family: str
    transform: str
    tokens: int
    max_abs_diff: float | None
    tolerance: float
    packing: str
    packed_diff: float | None = None

    def line(self) -> str:
        """One line for logs and ``report.md``."""
        if self.max_abs_diff is None:
            own = "no logits of its own to compare"
        else:
            own = f"max |kdkit - own logits| {self.max_abs_diff:.2g} (tol {self.tolerance:.2g})"
        packed = (
            "" if self.packed_diff is None else f", packed row max |d h| {self.packed_diff:.2g}"
        )
        return (
            f"{self.role} {self.family}: after-head transform {self.transform}; {own} on "
            f"{self.tokens} tokens; packing {self.packing}{packed}"
        )


def probe_tolerance(dtype: torch.dtype, scale: float) -> float:
    """Allowed ``|d logit|`` for logits of magnitude ``scale`` computed in ``dtype`` (the
    model's own head and transform round in its dtype; kdkit's in float32)."""
    rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return rtol * max(1.0, scale)


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _own_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """The model's own ``forward(input_ids).logits`` [n, V] (None for a non-HF module)."""
    if not callable(getattr(model, "get_decoder", None)):
        return None
    out = model(input_ids=ids[None], use_cache=False)
    logits = getattr(out, "logits", None)
    return None if logits is None else logits[0].float()


def _what_differs(own: torch.Tensor, view: torch.Tensor, tol: float) -> str:
    diff = float((own - view).abs().max())
    o, v = own.double().flatten(), view.double().flatten()
    ratio = float(o @ v / (v @ v).clamp(min=1e-30))
    if float((o - ratio * v).abs().max()) <= tol and abs(ratio - 1) > 1e-3:
        return f"its logits are kdkit's x {ratio:.4g} (an output scale kdkit does not know)"
    capped = float(o.abs().max())
    if float(v.abs().max()) > 1.2 * capped:
        return (
            f"its logits stay within +-{capped:.3g} where kdkit's reach "
            f"{float(v.abs().max()):.3g} (a soft-cap kdkit does not know)"
        )
    return f"its logits differ from kdkit's by up to {diff:.3g} (tolerance {tol:.2g})"


@torch.no_grad()
def probe_model(
    model: nn.Module,
    row_ids: torch.Tensor,
    *,
    role: str,
    transform: OutputTransform | None = None,
    packing: bool = False,
    tokens: int = PROBE_TOKENS,
) -> ProbeResult:
    """Compare kdkit's view of ``model`` with its own logits on ``row_ids`` (1D token ids of
    the first document, real text); with ``packing``, check a packed row of two documents too.
    Raises a one-line KDError above the tolerance."""
    transform = output_transform(model) if transform is None else transform
    family = family_of(model)
    if packing:
        check_packing(model, role)
    ids = row_ids.reshape(-1)[:tokens].to(_device(model))
    was = model.training
    model.eval()
    try:
        out = decoder_outputs(model, ids[None])
        view = project_logits(out.hidden[0], out.head, transform)
        own = _own_logits(model, ids)
        dtype = out.head.weight.dtype
        tol = probe_tolerance(dtype, 0.0 if own is None else float(own.abs().max()))
        diff = None if own is None else float((own - view).abs().max())
        if own is not None and not diff <= tol:  # NaN included
            raise KDError(
                f"the {role} ({family}, {type(model).__name__}) transforms its logits in a way "
                f"kdkit does not know: {_what_differs(own, view, tol)}; kdkit would distill "
                "another distribution than the model's (families kdkit knows: docs/lm-families.md)"
            )
        # an exported graph's packing was checked against PyTorch at export (a packed row),
        # and its int8 twin's activation ranges differ per input: not compared here
        exported = getattr(model, "packs_with_position_ids", False)
        packed = _packed_diff(model, ids, role, family, dtype) if packing and not exported else None
    finally:
        model.train(was)
    result = ProbeResult(
        role, family, transform.describe(), int(ids.numel()), diff, tol, packing_path(model), packed
    )
    log.info("logits probe: %s", result.line())
    return result


def _packed_diff(
    model: nn.Module, ids: torch.Tensor, role: str, family: str, dtype: torch.dtype
) -> float | None:
    """Largest ``|d hidden|`` of a document in a packed row against the document alone."""
    m = ids.numel() // 2
    if m < 2:
        return None
    row = ids[: 2 * m]
    positions = torch.arange(m, device=ids.device).repeat(2)
    packed = decoder_outputs(model, row[None], positions[None]).hidden[0, m:]
    alone = decoder_outputs(model, row[None, m:]).hidden[0]
    diff = float((packed.float() - alone.float()).abs().max())
    tol = probe_tolerance(dtype, float(alone.float().abs().max()))
    if not diff <= tol:
        raise KDError(
            f"data.pack: true cannot be used with the {role} ({family}): a document in a packed "
            f"row attends outside itself (hidden states differ from the document alone by "
            f"{diff:.3g}, tolerance {tol:.2g}); set data.pack: false"
        )
    return diff
