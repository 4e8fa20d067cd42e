"""Language models from model strings, and their final hidden states without logits.

Model strings (what a config's ``student:`` / ``teacher:`` holds):

- ``hf:PATH``: a local ``save_pretrained`` folder, loaded with ``AutoModelForCausalLM`` (its
  ``from_pretrained``, ``local_files_only=True``) and its tokenizer.
- ``hf-config:PATH``: a folder (or file) with ``config.json``; a random-init model is built from
  it (``from_config``), the tokenizer is loaded from the same folder if it has one.

Nothing downloads: every load passes ``local_files_only=True`` and a missing folder is a KDError.
No folder code runs: a model or tokenizer folder with an ``auto_map`` (code of its own) is a
KDError unless the caller passes ``trust_code=True`` (:func:`kdkit.lm._hf.refuse_custom_code`).

:func:`hidden_and_head` runs the decoder to its final, normed hidden states and returns the
output head *without* applying it: a ``[B, L, V]`` logits tensor is the largest thing in LM
distillation (250 MiB at 2048 tokens x V=32000 in fp32, 9x that at peak in a dense loss, see
shared/LM-ANCHORS.md B), so the fused loss projects chunks itself, with what the model does
after its head (:func:`kdkit.lm.logits.output_transform`). Hugging Face models go through
``model.get_decoder()`` (or ``base_model`` / ``model``) and ``get_output_embeddings()``; packed
rows reach them as per-document ``position_ids`` (:mod:`kdkit.lm.packing`); any other module
works if it follows the small protocol of :func:`hidden_and_head`.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from kdkit.errors import KDError, closest_names
from kdkit.lm._hf import from_folder, load_error, refuse_custom_code, require
from kdkit.lm._sizes import check_model_config
from kdkit.lm.logits import output_transform
from kdkit.lm.packing import block_mask, document_ids, positions_from_mask

__all__ = [
    "DecoderOutputs",
    "HiddenAndHead",
    "decoder_outputs",
    "decoder_step",
    "freeze_teacher",
    "hidden_and_head",
    "load_lm",
    "load_tokenizer",
    "logit_transform",
    "max_positions",
    "load_tokenizer_folder",
    "output_head",
]

log = logging.getLogger(__name__)

_PREFIXES = ("hf", "hf-config")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class HiddenAndHead(NamedTuple):
    """``hidden`` [B, L, H]: final normed hidden states; ``head``: the output projection."""

    hidden: torch.Tensor
    head: nn.Linear


class DecoderOutputs(NamedTuple):
    """:class:`HiddenAndHead` and a mixture-of-experts decoder's ``router_logits`` (per layer)."""

    hidden: torch.Tensor
    head: nn.Linear
    router_logits: tuple[torch.Tensor, ...] = ()


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise KDError(f"unknown dtype {dtype!r}; did you mean {closest_names(dtype, _DTYPES)}?")
    return _DTYPES[dtype]


def _parse(spec: str) -> tuple[str, Path]:
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in _PREFIXES or not rest:
        raise KDError(
            f"model string {spec!r} is not 'hf:PATH' or 'hf-config:PATH' (a local folder); "
            f"did you mean {closest_names(prefix, _PREFIXES)}?"
        )
    path = Path(rest).expanduser()
    if prefix == "hf-config" and path.name == "config.json":
        path = path.parent
    if not path.is_dir():
        raise KDError(f"{spec}: no such folder {str(path)!r} (models are never downloaded)")
    if not (path / "config.json").is_file():
        raise KDError(f"{spec}: {str(path)!r} has no config.json; save it with save_pretrained")
    return prefix, path


def load_tokenizer(
    spec: str, tokenizer: str | os.PathLike[str] | None = None, *, trust_code: bool = False
) -> Any:
    """The tokenizer of a model string (``hf:PATH`` / ``hf-config:PATH``), or of the folder
    ``tokenizer``, without loading the model. ``trust_code`` lets a folder run its own code."""
    _, path = _parse(spec)
    folder = Path(tokenizer) if tokenizer is not None else path
    return load_tokenizer_folder(folder, required=True, trust_code=trust_code)


def load_tokenizer_folder(path: Path, *, required: bool, trust_code: bool = False) -> Any:
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        if required:
            raise KDError(f"{str(path)!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
        return None
    refuse_custom_code(path, trust_code)  # its own message, not "cannot load"
    tf = require("transformers")
    try:
        return from_folder(tf.AutoTokenizer, path, trust_code=trust_code)
    except KDError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise many types
        raise KDError(f"cannot load the tokenizer in {str(path)!r}: {e}".splitlines()[0]) from None


def load_lm(
    spec: str,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    trust_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load ``hf:PATH`` or build ``hf-config:PATH``; returns ``(model, tokenizer)``.

    ``tokenizer`` names another local folder to take the tokenizer from (else the model's own;
    ``None`` is returned for an ``hf-config`` folder without one). ``seed`` makes the random
    init of ``hf-config`` reproducible without touching the global RNG. ``trust_code`` lets
    the model or tokenizer folder run Python code of its own (``auto_map``); without it such a
    folder is a KDError before transformers opens it.
    """
    prefix, path = _parse(spec)
    tok_path = Path(tokenizer) if tokenizer is not None else path
    for folder in dict.fromkeys((path, tok_path)):  # both, before any work
        refuse_custom_code(folder, trust_code)
    torch_dtype = _dtype(dtype)
    check_model_config(path, str(torch_dtype).removeprefix("torch.") if torch_dtype else None, spec)
    tf = require("transformers")
    kwargs: dict[str, Any] = {} if torch_dtype is None else {"dtype": torch_dtype}
    auto = tf.AutoModelForCausalLM
    try:
        if prefix == "hf":
            model = from_folder(auto, path, trust_code=trust_code, **kwargs)
        else:
            config = from_folder(tf.AutoConfig, path, trust_code=trust_code)
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                model = auto.from_config(config, trust_remote_code=trust_code, **kwargs)
    except KDError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers validates with any exception type
        raise load_error(spec, path, e) from None
    required = prefix == "hf" or tokenizer is not None
    tok = load_tokenizer_folder(tok_path, required=required, trust_code=trust_code)
    log.info(
        "%s: %s, %.2fM parameters",
        spec,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model, tok


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns the same module."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def max_positions(model: nn.Module) -> int | None:
    """The model's ``max_position_embeddings`` (``None`` if it does not say)."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None) or getattr(
        model, "max_positions", None
    )
    return int(value) if value else None


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` applied after the head, from
    :func:`kdkit.lm.logits.output_transform` (the one lookup; kept for callers of 0.3):
    Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Gemma 2/3's
    ``final_logit_softcapping``; ``(1.0, None)`` for plain models such as Llama."""
    t = output_transform(model)
    return t.scale, t.softcap


def output_head(model: nn.Module) -> nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise KDError(
            f"{type(model).__name__} has no output head: give it an `lm_head` nn.Linear "
            "(or get_output_embeddings()) so kdkit can project hidden states itself"
        )
    return head


def hidden_and_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> HiddenAndHead:
    """Final normed hidden states ``[B, L, H]`` and the output head, logits never computed.

    ``hidden_and_head(model, **batch.model_inputs())`` for a :class:`~kdkit.lm.align.TokenBatch`.
    ``attention_mask`` is ``[B, L]`` (1 = token, 0 = padding) for rows of one document each;
    a packed batch gives ``position_ids`` restarting at 0 at each document and **no** mask, and
    the model attends as it would to each document alone (:mod:`kdkit.lm.packing`: a Hugging
    Face model builds its own masks, sliding windows included). A ``[B, 1, L, L]`` bool
    block-causal mask (what TokenBatch.attention_mask held for packed rows before, or a
    caller's own) is read as the documents it holds.

    What the model does after its head is not applied here:
    :func:`kdkit.lm.logits.output_transform` says what it is.

    Protocol for a module that is not a Hugging Face model: ``forward(input_ids,
    position_ids=None, attention_mask=None) -> hidden [B, L, H]`` (the two keywords optional in
    its signature; a packed batch needs ``attention_mask``, given as a ``[B, 1, L, L]`` bool
    block-causal mask, unless the module sets ``packs_with_position_ids = True``) and an
    ``lm_head`` ``nn.Linear`` (or ``get_output_embeddings()``).
    """
    out = decoder_outputs(model, input_ids, position_ids, attention_mask)
    return HiddenAndHead(out.hidden, out.head)


def decoder_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    router_logits: bool = False,
) -> DecoderOutputs:
    """:func:`hidden_and_head`, and with ``router_logits`` a mixture-of-experts decoder's
    router logits (one ``[tokens, experts]`` tensor per layer; ``()`` for other models)."""
    head = output_head(model)
    if attention_mask is not None and attention_mask.dim() == 4:
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        attention_mask = None  # the documents are in position_ids now
    decoder = _decoder_of(model)
    if decoder is not None:
        extra = {"output_router_logits": True} if router_logits else {}
        out = decoder(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **extra,
        )
        routers = tuple(getattr(out, "router_logits", None) or ()) if router_logits else ()
        return DecoderOutputs(out.last_hidden_state, head, routers)
    hidden = _protocol_hidden(model, input_ids, position_ids, attention_mask)
    return DecoderOutputs(hidden, head, ())


def decoder_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    past_key_values: Any = None,
) -> tuple[torch.Tensor, Any]:
    """One step of a Hugging Face causal LM's decoder with its KV cache: ``(hidden [B, L, H],
    past_key_values)``, the final normed hidden states of the ``L`` new tokens (logits never
    computed; project them with :func:`kdkit.lm.logits.project_logits`). ``attention_mask``
    is ``[B, past + L]`` (1 = token, 0 = left padding). For sampling (``kdkit lm generate``);
    a module without a decoder and a cache is a one-line KDError."""
    decoder = _decoder_of(model)
    if decoder is None or "past_key_values" not in inspect.signature(decoder.forward).parameters:
        raise KDError(
            f"{type(model).__name__} is not a Hugging Face causal LM with a KV cache "
            "(past_key_values); sampling needs one"
        )
    out = decoder(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        past_key_values=past_key_values,
        use_cache=True,
    )
    return out.last_hidden_state, out.past_key_values


def _decoder_of(model: nn.Module) -> nn.Module | None:
    """A Hugging Face causal LM's decoder (its final hidden states), or None: not one.
    ``get_decoder()`` first; where it returns the model itself (Llama 4's text model in
    transformers 5.23), its ``base_model``, then its ``model`` attribute."""
    if not hasattr(model, "config"):
        return None
    get = getattr(model, "get_decoder", None)
    for candidate in (
        get() if callable(get) else None,
        getattr(model, "base_model", None),
        getattr(model, "model", None),
    ):
        if isinstance(candidate, nn.Module) and candidate is not model:
            return candidate
    return None


def _protocol_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The hidden states of a module that follows :func:`hidden_and_head`'s protocol."""
    params = inspect.signature(model.forward).parameters
    if (
        attention_mask is None
        and position_ids is not None
        and not getattr(model, "packs_with_position_ids", False)
        and bool((document_ids(position_ids)[:, -1] > 0).any())  # a host read: packed rows?
    ):
        attention_mask = block_mask(position_ids)
    kwargs: dict[str, torch.Tensor] = {}
    for name, value in (("position_ids", position_ids), ("attention_mask", attention_mask)):
        if value is None:
            continue
        if name in params:
            kwargs[name] = value
        elif name == "attention_mask" and value.dim() == 4:
            raise KDError(
                f"{type(model).__name__}.forward takes no attention_mask, so packed rows would "
                "attend across documents; add the keyword or set data.pack: false"
            )
    hidden = model(input_ids, **kwargs)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise KDError(
            f"{type(model).__name__}.forward must return hidden states [B, L, H], "
            f"got {type(hidden).__name__}"
        )
    return hidden
