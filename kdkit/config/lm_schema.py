"""The ``task: lm`` config: token-level distillation of a causal language model.

Same walk, messages and validation-before-work as the image config (:mod:`kdkit.config.schema`);
the ``train:`` section is the very same :class:`~kdkit.config.TrainConfig`. The key names are
the contract (``kdkit train`` with ``task: lm``)::

    task: lm
    student: {model: "hf-config:DIR"}      # or "hf:DIR" (a save_pretrained folder)
    teacher: {model: "hf:DIR"}             # or "cache:DIR" (kdkit lm capture); null: scratch
                                           # backend: torch | onnx, precision: fp32 | int8
                                           # or "http://HOST:PORT" (kdkit lm serve, vLLM),
                                           # served: {protocol: kdkit, topk: 32, prefetch: 2}
    data: {text_files: [GLOB, ...], val: {split: 0.05}, format: text, max_length: 256,
           pack: true, loss_on: all, batch_size: 8}
    distill: {divergence: fkl, temperature: 1.0, ce_weight: 0.0, memory_budget_mb: 256,
              on_policy: {lambda: 0.5, max_new_tokens: 64, temperature: 1.0},   # optional: GKD
              router_aux_loss: true,     # a MoE student's router loss, as its own training
              cross_tokenizer: {method: project, uld_weight: 1.0}}  # a teacher of another
                                           # tokenizer (teacher.tokenizer or its folder's)
    train: {epochs: 1, optimizer: {name: AdamW, lr: 0.001}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from kdkit.config.schema import TrainConfig, field_check

__all__ = [
    "LMServedConfig",
    "LMModelConfig",
    "LMPeftConfig",
    "LMValConfig",
    "LMDatasetConfig",
    "LMDataConfig",
    "LMOnPolicyConfig",
    "LMCrossTokenizerConfig",
    "LMLayerPairConfig",
    "LMDistillConfig",
    "LMRunConfig",
]

LM_PREFIXES = ("hf", "hf-config")
_BIG = 2**24  # rows, tokens: beyond any batch or context a machine holds (and below sys.maxsize)
_SEED = "an integer in [0, 2**63)"
_POSITIVE = "a finite number > 0"


def _finite_positive(v: float) -> bool:
    return 0 < v < math.inf


Divergence = Literal["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "ce"]


@dataclass(frozen=True)
class LMServedConfig:
    """``teacher.served``: how a teacher at ``model: "http://HOST:PORT"`` is asked
    (docs/lm-serve.md). ``protocol``: ``kdkit`` (``kdkit lm serve``: binary top-k at any
    temperature, its fingerprint checked) or ``vllm`` (``/v1/completions`` with
    ``prompt_logprobs``: temperature 1, at most the server's ``--max-logprobs``); ``topk``:
    entries per position; ``prefetch``: batches whose targets are fetched ahead of the step;
    ``timeout_s``: the longest one request may take before it is retried; ``retry_s``: how long
    the run waits for a server that does not answer before it stops; ``token_env``: the
    environment variable holding the server's shared token (the token is never in a config)."""

    protocol: Literal["kdkit", "vllm"] = "kdkit"
    topk: int = field(
        default=32, metadata=field_check(lambda v: 1 <= v <= 1 << 16, "an integer in [1, 65536]")
    )
    prefetch: int = field(
        default=2, metadata=field_check(lambda v: 0 <= v <= 64, "an integer in [0, 64]")
    )
    timeout_s: float = field(
        default=60.0, metadata=field_check(lambda v: 0 < v <= 3600, "a number in (0, 3600]")
    )
    retry_s: float = field(
        default=300.0, metadata=field_check(lambda v: 0 <= v <= 86400, "a number in [0, 86400]")
    )
    token_env: str = field(
        default="KDKIT_TEACHER_TOKEN",
        metadata=field_check(
            lambda v: v.replace("_", "a").isalnum() and not v[:1].isdigit(),
            "an environment variable name (letters, digits, _)",
        ),
    )


@dataclass(frozen=True)
class LMPeftConfig:
    """``student.peft``: train LoRA adapters only (the ``peft`` library, TRL's ``peft_config``);
    the base weights stay frozen. ``target_modules``: module names (``[q_proj, v_proj]``) or
    ``all-linear`` (every linear layer but the output head)."""

    r: int = field(
        default=8, metadata=field_check(lambda v: 1 <= v <= 4096, "an integer in [1, 4096]")
    )
    alpha: float = field(default=16.0, metadata=field_check(_finite_positive, _POSITIVE))
    dropout: float = field(default=0.0, metadata=field_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    target_modules: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    #: modules trained in full beside the adapters (e.g. ``[embed_tokens]``)
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class LMModelConfig:
    """``model``: ``hf:DIR`` (a local ``save_pretrained`` folder: model + tokenizer) or
    ``hf-config:DIR`` (random init from its ``config.json``); ``tokenizer``: another local
    folder to take the tokenizer from; ``dtype``: ``float32`` / ``bfloat16`` / ``float16``.

    Teacher only: ``backend: onnx`` runs its decoder in ONNX Runtime on the CPU
    (:mod:`kdkit.lm.onnx_teacher`); ``precision: int8`` quantizes that (ONNX Runtime, as for
    vision teachers, whatever ``backend`` says) behind a fidelity gate on real rows.

    Teacher only: ``model: "http://HOST:PORT"`` is a teacher served by ``kdkit lm serve`` (or
    vLLM), asked as ``served`` says (:class:`LMServedConfig`); its engine and dtype are chosen
    where it runs."""

    model: str
    tokenizer: str | None = None
    dtype: str | None = None
    backend: Literal["torch", "onnx"] = "torch"
    precision: Literal["fp32", "int8"] = "fp32"
    served: LMServedConfig | None = None
    #: student only: LoRA adapters (:class:`LMPeftConfig`); None trains every weight
    peft: LMPeftConfig | None = None


@dataclass(frozen=True)
class LMValConfig:
    """Held-out text: its own ``text_files``, or a ``split`` fraction of the training rows."""

    text_files: tuple[str, ...] | None = None
    split: float | None = field(
        default=None, metadata=field_check(lambda v: 0 < v < 1, "a fraction in (0, 1)")
    )


#: ``data.chat_template`` names kdkit ships (anything else is a template file's path)
CHAT_TEMPLATE_NAMES = ("chatml",)


@dataclass(frozen=True)
class LMDatasetConfig:
    """``data.dataset``: a Hugging Face ``datasets`` dataset on disk (never downloaded): a
    ``save_to_disk`` folder, a folder of data files, or one ``.parquet`` / ``.arrow`` /
    ``.json(l)`` / ``.csv`` file. The ``*_field`` keys name the columns that hold the format's
    fields (defaults: the JSONL names)."""

    path: str
    split: str = "train"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"


@dataclass(frozen=True, kw_only=True)
class LMDataConfig:
    #: files or globs; or ``dataset:`` instead (one of the two)
    text_files: tuple[str, ...] = ()
    dataset: LMDatasetConfig | None = None
    val: LMValConfig | None = None
    format: Literal["text", "prompt_completion", "chat"] = "text"
    max_length: int = field(
        default=256, metadata=field_check(lambda v: 2 <= v <= _BIG, "an integer in [2, 2**24]")
    )
    pack: bool = True
    #: a document longer than max_length: ``split`` into rows (plain text) or ``truncate``
    overflow: Literal["split", "truncate"] = "split"
    loss_on: Literal["all", "completion", "assistant"] = "all"
    #: a prompt/completion or chat document over max_length (kdkit.lm._truncate): unset cuts
    #: its end but refuses a run losing > 5% of the trainable tokens; right | left (cut the
    #: prompt's start) | drop_row accept the loss; error refuses any overlong document
    truncation: Literal["drop_row", "left", "right", "error"] | None = None
    #: format chat: the template that renders the conversations, ``chatml`` or a Jinja file
    #: (default: the tokenizer's own); the exported tokenizer carries it
    chat_template: str | None = None
    #: keep the tokenized corpus under ~/.cache/kdkit/lm-tokens, keyed by the files' sha256,
    #: the tokenizer and these settings: a second run with the same data skips tokenizing;
    #: rows are streamed there and read back memory-mapped (a corpus larger than memory)
    token_cache: bool = True
    batch_size: int = field(
        default=8, metadata=field_check(lambda v: 1 <= v <= _BIG, "an integer in [1, 2**24]")
    )
    seed: int = field(default=0, metadata=field_check(lambda v: 0 <= v < 2**63, _SEED))


@dataclass(frozen=True)
class LMOnPolicyConfig:
    """``distill.on_policy`` (GKD, :mod:`kdkit.lm.onpolicy`): with probability ``lambda`` a
    batch's completions are sampled from the student (at the sampling ``temperature``, at most
    ``max_new_tokens``) and scored by the live teacher. The YAML key ``lambda`` is the field
    ``lam`` (``lambda`` is a Python keyword): the metadata ``key`` names a field's YAML key."""

    lam: float = field(
        metadata={**field_check(lambda v: 0 <= v <= 1, "in [0, 1]"), "key": "lambda"}
    )
    max_new_tokens: int = field(
        default=64, metadata=field_check(lambda v: 1 <= v <= _BIG, "an integer in [1, 2**24]")
    )
    temperature: float = field(default=1.0, metadata=field_check(_finite_positive, _POSITIVE))


@dataclass(frozen=True)
class LMCrossTokenizerConfig:
    """``distill.cross_tokenizer`` (:mod:`kdkit.lm.xtok`, docs/lm-xtok.md): how a teacher whose
    tokenizer differs from the student's is distilled. ``method``: ``project`` (the teacher's
    distribution sent through the vocabulary map, exact and decomposed, P-KL; ULD on what the
    map cannot place), ``exact`` (exact string matches only, GOLD's split) or ``uld`` (sorted
    distributions alone); ``uld_weight``: the ULD term's weight. Used only when the tokenizers
    differ (the default applies then); a same-tokenizer run keeps the exact path."""

    method: Literal["project", "exact", "uld"] = "project"
    uld_weight: float = field(
        default=1.0, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )


@dataclass(frozen=True)
class LMLayerPairConfig:
    """One ``distill.pairs`` entry: student decoder layer ``student`` learns teacher layer
    ``teacher`` (0-based, -1 the last) through a learned projection when the widths differ."""

    student: int
    teacher: int
    weight: float = field(
        default=1.0, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )
    loss: Literal["mse", "cosine"] = "mse"


@dataclass(frozen=True)
class LMDistillConfig:
    divergence: Divergence = "fkl"
    beta: float = field(default=0.5, metadata=field_check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    skew: float = field(default=0.1, metadata=field_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    #: the fused loss runs in float32 chunks: above 100 its value drifts from the exact one
    #: (measured against float64: 0.3% at T=100, 5% at T=1000, negative at T=1e4)
    temperature: float = field(
        default=1.0, metadata=field_check(lambda v: 0 < v <= 100, "a number in (0, 100]")
    )
    ce_weight: float = field(default=0.0, metadata=field_check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    memory_budget_mb: float = field(default=256, metadata=field_check(_finite_positive, _POSITIVE))
    #: beyond a cached or served teacher's top k (``cache:DIR``, ``http://``), see kdkit.lm.cache
    tail: Literal["bucket", "renorm", "uniform", "prior", "drop", "label"] = "bucket"
    #: on-policy distillation (GKD); absent or ``lambda: 0`` = off
    on_policy: LMOnPolicyConfig | None = None
    #: a mixture-of-experts student's router load-balancing loss, weighted by its config's
    #: ``router_aux_loss_coef`` as its own training does (kdkit.lm.moe); logged as router_aux
    router_aux_loss: bool = True
    #: a teacher of another tokenizer; None = the default, used only when the tokenizers differ
    cross_tokenizer: LMCrossTokenizerConfig | None = None
    #: hidden-state pairs between decoder layers (kdkit.lm.hidden), beside the token loss
    pairs: tuple[LMLayerPairConfig, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LMRunConfig:
    """A whole ``task: lm`` run (``run_dir`` defaults to ``runs/NAME``)."""

    task: Literal["lm"] = "lm"
    name: str = "lm"
    student: LMModelConfig
    teacher: LMModelConfig | None = None
    data: LMDataConfig
    distill: LMDistillConfig = field(default_factory=LMDistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
