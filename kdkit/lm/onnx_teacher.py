"""A causal LM teacher run by ONNX Runtime on the CPU (fp32, or int8 behind a fidelity gate).

The teacher of an LM distillation only runs inference, so, as for vision teachers
(:class:`kdkit.teachers.OnnxTeacher`, darklight's idea), it can run in a cheaper engine than
the student's training step. :func:`export_lm_onnx` writes the decoder up to its **final,
normed hidden states** (never the logits: the fused loss projects token chunks through the
head itself, :mod:`kdkit.lm.fused`); :class:`OnnxLMTeacher` runs that file and follows the
:func:`~kdkit.lm.models.hidden_and_head` protocol (``forward(input_ids, position_ids,
attention_mask) -> hidden`` and an ``lm_head`` ``nn.Linear`` holding the teacher's head), so
:class:`~kdkit.lm.task.LMTask`, capture and evaluation take it where they take the torch model.

The graph's inputs, both ``[B, L]`` int64 with dynamic batch ``B`` and length ``L``:
``input_ids`` and ``position_ids`` (restarting at 0 at each document of a packed row; 0 on
padding). There is no mask input: the model's own mask code is in the graph
(:mod:`kdkit.lm.onnx_export`), so each document of a packed row gets the attention it would get
alone, sliding windows included, and no ``[B, 1, L, L]`` tensor crosses into ONNX Runtime.
:meth:`OnnxLMTeacher.forward` makes the positions from whatever the caller has: nothing,
``[B, L]`` padding, per-document ``position_ids``, or a ``[B, 1, L, L]`` block mask.
What the model does after its head (:func:`~kdkit.lm.logits.output_transform`) is taken from
the exported model and kept as :attr:`OnnxLMTeacher.output_transform`.

The exported file is keyed by the teacher's weights: its sidecar ``<file>.json`` holds the
weights' fingerprint (:func:`kdkit._fingerprint.module_fingerprint`, sha256), the export
settings and the file's own sha256, checked on every load; a stale or corrupted export is
exported again, never reused. Modules are exported, as vision int8 teachers are, to
``~/.cache/kdkit/onnx/<Class>-<weights hash>.lm.onnx`` (:func:`kdkit.teachers.quantize.
default_cache_dir`; ``cache_dir=`` elsewhere): the file outlives a run, so capture and every
student distilled from the same teacher share one export.

int8: ONNX Runtime's dynamic quantization (``quantize_dynamic``: int8 MatMul weights,
activation ranges measured per batch at run time, so no calibration set is needed), cached
next to the fp32 file as vision int8 models are (:mod:`kdkit.teachers.quantize`: same key,
sidecar and checksum). It is used only if it passes :func:`check_lm_fidelity` on a few real
rows (token top-1 agreement and mean KL against the fp32 teacher); below the gate it is a
one-line :class:`~kdkit.errors.KDError`, the vision convention (an int8 teacher is never used
silently when it says something else).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from kdkit._io import atomic_path, atomic_write_json, sha256_file
from kdkit._ort import import_onnxruntime
from kdkit._precision import ONNX_PRECISIONS
from kdkit.capture import unwrap
from kdkit.errors import KDError
from kdkit.lm.logits import OutputTransform, output_transform, project_logits
from kdkit.lm.models import hidden_and_head, output_head
from kdkit.lm.onnx_export import (  # the export's public names stay importable from here
    INPUT_NAMES,
    ONNX_LM_FORMAT_VERSION,
    LMExport,
    causal_mask,  # noqa: F401  (importable from here, as before)
    ensure_lm_onnx,
    export_lm_onnx,
    graph_positions,
    lm_onnx_path,
    run_session,
)
from kdkit.teachers import quantize
from kdkit.teachers.fidelity import FidelityReport, FidelityTally
from kdkit.teachers.onnx_teacher import load_session

__all__ = [
    "LMExport",
    "OnnxLMTeacher",
    "MIN_TOP1_AGREEMENT",
    "MAX_MEAN_KL",
    "ONNX_LM_FORMAT_VERSION",
    "check_lm_fidelity",
    "ensure_lm_onnx",
    "export_lm_onnx",
    "lm_onnx_path",
    "quantize_lm_int8",
]

log = logging.getLogger(__name__)


#: The int8 gate's bounds, on the trained tokens of a few real rows, against the fp32 teacher.
#: Why these: the KD loss *is* the KL to the teacher's distribution, so the int8 teacher's own
#: KL from fp32 is noise added to every target. At the end of the LM demo's training the
#: students sit at 0.3-1 nats/token from the teacher, so 0.01 nats/token of noise is about 1-3%
#: of the signal they learn from. Top-1 agreement is looser than the vision gate's 99%: a
#: language model's next token is often a near tie between two continuations, whose order any
#: rounding flips at no cost in KL (a random-init tiny Llama, whose distributions are nearly
#: uniform, scores 98.4% agreement at KL 4e-7); 95% still catches a quantized model that moves
#: real mass (one with 10x weights: 93% at KL 2e-3; 30x: 85% at KL 0.055). Measured on the LM
#: demo's teacher shape fitted to its corpus: 97.9% at KL 7e-4 (docs/benchmarks.md).
MIN_TOP1_AGREEMENT = 0.95
MAX_MEAN_KL = 0.01
#: how many probe rows the gate reads, and the tokens per head projection (bounds its memory)
GATE_ROWS = 16
_GATE_CHUNK = 256


# -- running it ----------------------------------------------------------------------------------
def _frozen_head(head: nn.Linear | torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` sharing the teacher's head weights (no copy), frozen."""
    weight = head.weight if isinstance(head, nn.Linear) else head
    bias = head.bias if isinstance(head, nn.Linear) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise KDError("OnnxLMTeacher head must be an nn.Linear or its [V, H] weight")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _head_config(config: Any) -> SimpleNamespace:
    """What is read of a teacher's config beyond its decoder: its positions (the transform
    after the head is kept whole, as :attr:`OnnxLMTeacher.output_transform`). Not the whole
    config: the graph has its own attention."""
    return SimpleNamespace(max_position_embeddings=getattr(config, "max_position_embeddings", None))


class OnnxLMTeacher(nn.Module):
    """A causal LM teacher whose decoder runs in ONNX Runtime (CPU execution provider).

    ``path``: a file from :func:`export_lm_onnx`; ``head``: the teacher's output head (an
    ``nn.Linear`` or its ``[V, H]`` weight), held as a frozen :attr:`lm_head` so the fused loss
    projects hidden states itself. ``threads``: ONNX Runtime's intra-op threads, default
    ``torch.get_num_threads()`` (the thread count the run gave PyTorch). ``config``: the
    teacher's Hugging Face config, of which ``max_position_embeddings`` and the logit transform
    are kept (:attr:`config`) so they are read as from the torch model. Hidden states come back as float32 on the input's device.

    Build one from a model with :meth:`from_model` (export cached by weights, int8 gate).
    ``output_transform``: what the exported model does after its head
    (:func:`kdkit.lm.logits.output_transform` of it; :meth:`from_model` passes it).
    """

    #: packed rows are given as per-document ``position_ids`` (the graph builds its own masks)
    packs_with_position_ids = True

    def __init__(
        self,
        path: str | os.PathLike,
        head: nn.Linear | torch.Tensor,
        *,
        threads: int | None = None,
        config: Any = None,
        precision: str = "fp32",
        fidelity: FidelityReport | None = None,
        output_transform: OutputTransform | None = None,
    ) -> None:
        super().__init__()
        self._ort = import_onnxruntime()
        self.path = Path(path)
        self.threads = int(threads or torch.get_num_threads())
        self.session = load_session(self.path, ["CPUExecutionProvider"], self._ort, self.threads)
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES:
            raise KDError(
                f"{self.path} takes inputs {list(names)}, not {list(INPUT_NAMES)}: "
                "not an LM decoder exported by kdkit.lm.export_lm_onnx"
            )
        self.lm_head = _frozen_head(head)
        if config is not None:
            self.config = _head_config(config)
        self.precision = precision
        self.fidelity = fidelity
        self.output_transform = output_transform or OutputTransform(family="onnx")

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        precision: str = "fp32",
        probe: Iterable[Any] | None = None,
        temperature: float = 1.0,
        cache_dir: str | os.PathLike | None = None,
        path: str | os.PathLike | None = None,
        threads: int | None = None,
        min_agreement: float = MIN_TOP1_AGREEMENT,
        max_kl: float = MAX_MEAN_KL,
    ) -> OnnxLMTeacher:
        """Export ``model`` (or reuse the export of these weights, :func:`ensure_lm_onnx`)
        and run it; ``precision="int8"`` quantizes it (:func:`quantize_lm_int8`) and gates it
        on ``probe`` (real :class:`~kdkit.lm.align.TokenBatch` es, their trained tokens) at the
        run's KD ``temperature``."""
        if precision not in ONNX_PRECISIONS:
            raise KDError(f"the ONNX LM teacher's precision is fp32 or int8, got {precision!r}")
        model = unwrap(model)
        head = output_head(model)
        config = getattr(model, "config", None)
        after = output_transform(model)
        exported = ensure_lm_onnx(model, path, cache_dir=cache_dir)
        fp32 = cls(exported.path, head, threads=threads, config=config, output_transform=after)
        if precision == "fp32":
            return fp32
        if probe is None:
            raise KDError("precision int8 needs probe rows for its fidelity gate (probe=...)")
        int8_path = quantize_lm_int8(exported.path)
        int8 = cls(
            int8_path,
            head,
            threads=threads,
            config=config,
            precision="int8",
            output_transform=after,
        )
        int8.fidelity = check_lm_fidelity(
            fp32, int8, probe, temperature=temperature, min_agreement=min_agreement, max_kl=max_kl
        )
        return int8

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, L, H]`` (the :func:`~kdkit.lm.models.hidden_and_head`
        protocol); the documents and padding as :func:`graph_positions` reads them."""
        positions = graph_positions(input_ids, position_ids, attention_mask)
        return run_session(self.session, input_ids, positions).to(input_ids.device)

    def train(self, mode: bool = True) -> OnnxLMTeacher:
        """A frozen teacher: always in eval mode (nothing in ONNX Runtime trains)."""
        return super().train(False)

    def __repr__(self) -> str:
        return f"OnnxLMTeacher({str(self.path)!r}, precision={self.precision!r})"


# -- int8 ----------------------------------------------------------------------------------------
_INT8_SETTINGS = {
    "method": "dynamic",
    "ops": ["MatMul"],
    "weights": "int8 per-tensor",
    "activations": "uint8, ranges per batch",
}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    was, root.disabled = root.disabled, True
    try:
        yield
    finally:
        root.disabled = was


def quantize_lm_int8(fp32_path: str | os.PathLike) -> Path:
    """The int8 model of an exported LM decoder: ONNX Runtime's ``quantize_dynamic`` of its
    MatMul weights, cached next to the fp32 file under the same key, sidecar and checksum as
    vision int8 models (:mod:`kdkit.teachers.quantize`)."""
    from onnxruntime import __version__ as ort_version

    fp32 = Path(fp32_path)
    key = {
        "format_version": quantize.INT8_FORMAT_VERSION,
        "fp32_sha256": sha256_file(fp32),
        "target": "cpu-lm",
        "settings": _INT8_SETTINGS,
        "onnxruntime": ort_version,
    }
    path, sidecar = quantize._cache_paths(fp32, key, None)
    if quantize._cached_ok(path, sidecar, key):
        log.info("using cached int8 model %s", path)
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantizing %s to int8 (dynamic, MatMul weights)", fp32)
    try:
        with atomic_path(path) as tmp, tempfile.TemporaryDirectory(prefix="kdkit-int8-") as work:
            with _quiet_root_logger():  # ORT logs a pre-processing hint on every call
                quantize_dynamic(
                    str(fp32),
                    str(Path(work) / "q.onnx"),
                    op_types_to_quantize=["MatMul"],
                    weight_type=QuantType.QInt8,
                )
            os.replace(Path(work) / "q.onnx", tmp)
            load_session(tmp, ["CPUExecutionProvider"], import_onnxruntime(), threads=1)
        atomic_write_json(
            sidecar,
            {
                "format_version": quantize.INT8_FORMAT_VERSION,
                "key": key,
                "sha256": sha256_file(path),
            },
        )
    except OSError as err:
        raise KDError(
            f"could not write the int8 model next to {fp32} ({err}); pass cache_dir= a "
            "writable folder"
        ) from None
    return path


def check_lm_fidelity(
    reference: nn.Module,
    candidate: nn.Module,
    probe: Iterable[Any],
    *,
    temperature: float = 1.0,
    min_agreement: float = MIN_TOP1_AGREEMENT,
    max_kl: float | None = MAX_MEAN_KL,
    rows: int = GATE_ROWS,
) -> FidelityReport:
    """Token top-1 agreement and mean KL(reference || candidate) at ``temperature`` on the
    trained tokens of the first ``rows`` rows of ``probe`` (TokenBatches); raises a one-line
    :class:`KDError` below the bounds (:meth:`FidelityReport.refuse_below`). Both models go
    through :func:`~kdkit.lm.models.hidden_and_head`; logits are projected ``_GATE_CHUNK``
    tokens at a time, never ``[tokens, V]`` at once."""
    tally = FidelityTally(temperature)
    seen = 0
    with torch.no_grad():
        for batch in probe:
            if seen >= rows:
                break
            batch = _first_rows(batch, rows - seen)
            seen += batch.input_ids.shape[0]
            inputs = batch.model_inputs()
            ref, cand = hidden_and_head(reference, **inputs), hidden_and_head(candidate, **inputs)
            h_ref, h_cand = ref.hidden[batch.mask], cand.hidden[batch.mask]
            t_ref, t_cand = output_transform(reference), output_transform(candidate)
            for c in range(0, h_ref.shape[0], _GATE_CHUNK):
                tally.add_logits(
                    project_logits(h_ref[c : c + _GATE_CHUNK], ref.head, t_ref),
                    project_logits(h_cand[c : c + _GATE_CHUNK], cand.head, t_cand),
                )
    if tally.n == 0:
        raise KDError("the int8 fidelity gate has no probe tokens (empty probe rows)")
    report = tally.report()
    report.refuse_below(
        min_agreement,
        max_kl,
        what=f"the int8 LM teacher {getattr(candidate, 'path', '')} disagrees with fp32",
        options="run the teacher with precision: fp32 (backend: onnx keeps most of the speed)",
    )
    log.info("int8 fidelity gate passed: %s", str(report).replace("probes", "tokens"))
    return report


def _first_rows(batch: Any, n: int) -> Any:
    """The first ``n`` rows of a TokenBatch (all of it when it has no more)."""
    if batch.input_ids.shape[0] <= n:
        return batch
    from dataclasses import fields, replace

    cut = {
        f.name: getattr(batch, f.name)[:n]
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    cut["n_tokens"] = int(cut["mask"].sum())
    return replace(batch, **cut)


def probe_batches(dataset: Sequence[Any], collate: Any, rows: int = GATE_ROWS) -> list[Any]:
    """The gate's probe: the first ``rows`` rows of ``dataset`` collated, in batches of 8
    (read by index, so no sampler or RNG is touched: a run's batches stay the same)."""
    n = min(rows, len(dataset))
    return [collate([dataset[i] for i in range(b, min(b + 8, n))]) for b in range(0, n, 8)]
