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
shared/LM-ANCHORS.md B), so the fused loss projects chunks itself. Hugging Face models go through
``model.get_decoder()`` (or ``base_model``) and ``get_output_embeddings()``; any other module
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

__all__ = [
    "HiddenAndHead",
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
    """``(logit_scale, softcap)`` applied after the head (Cohere's ``logit_scale``, Gemma-2's
    ``final_logit_softcapping``); ``(1.0, None)`` for plain models such as Llama."""
    config = getattr(model, "config", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def output_head(model: nn.Module) -> nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise KDError(
            f"{type(model).__name__} has no output head: give it an `lm_head` nn.Linear "
            "(or get_output_embeddings()) so kdkit can project hidden states itself"
        )
    return head


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D bool mask (True = attend) as the additive float mask HF eager and sdpa both take
    (a bool 4D mask is added as 0/1 by Llama's eager path: measured wrong by 1.3)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )


def hidden_and_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> HiddenAndHead:
    """Final normed hidden states ``[B, L, H]`` and the output head, logits never computed.

    ``attention_mask`` is ``[B, L]`` (1 = token, 0 = padding) or a ``[B, 1, L, L]`` bool
    block-causal mask (True = may attend) as :class:`kdkit.lm.align.TokenBatch` gives for packed
    rows; the bool mask is turned into the additive mask of the model's dtype here.

    Protocol for a module that is not a Hugging Face model: ``forward(input_ids,
    position_ids=None, attention_mask=None) -> hidden [B, L, H]`` (the two keywords optional in
    its signature; a packed batch needs ``attention_mask``) and an ``lm_head`` ``nn.Linear`` (or
    ``get_output_embeddings()``).
    """
    head = output_head(model)
    if attention_mask is not None and attention_mask.dim() == 4:
        attn = str(getattr(getattr(model, "config", None), "_attn_implementation", ""))
        if "flash" in attn and position_ids is not None:
            # flash-attention takes no dense mask: HF derives the document boundaries from
            # position_ids that restart at 0 (not run here: no GPU on these machines)
            attention_mask = None
        else:
            attention_mask = _additive_mask(attention_mask.bool(), head.weight.dtype)
    decoder = None
    if hasattr(model, "config"):
        get = getattr(model, "get_decoder", None)
        decoder = get() if callable(get) else None
        decoder = decoder if isinstance(decoder, nn.Module) else getattr(model, "base_model", None)
    if decoder is not None and decoder is not model:
        out = decoder(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        )
        return HiddenAndHead(out.last_hidden_state, head)
    params = inspect.signature(model.forward).parameters
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
    return HiddenAndHead(hidden, head)
