"""Tiny random-init configs of the model families kdkit is checked against (installed
transformers, nothing downloaded): ``build(name, seed)`` gives a causal LM of that family.

Every model has 2 layers, hidden 32, the test tokenizer's 320 tokens and, where the family has
one, a sliding window of 4 tokens (documents in the tests are longer, so a window that is lost
shows). Weights are drawn with ``initializer_range`` 0.3 so the logits are as peaked as a
trained model's (random init at 0.02 is near-uniform and hides every transform), and each
family's after-head transform is set small enough to change the distribution: Gemma's soft-cap
2 (30 in the released models, whose logits are ~10x larger), Granite's logits_scaling 4,
Cohere's logit_scale 0.25.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 320
WINDOW = 4

_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.3,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MOE = dict(num_experts_per_tok=2)

#: name -> (config class in transformers, overrides of _BASE; None drops a key)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    "mixtral": ("MixtralConfig", {**_MOE, "num_local_experts": 4, "sliding_window": WINDOW}),
    "qwen2": (
        "Qwen2Config",
        {
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,  # layer 0 full, layer 1 windowed
        },
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **_MOE,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {**_MOE, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 8},
    ),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 8, "sliding_window": WINDOW, "final_logit_softcapping": 2.0},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "head_dim": 8,
            "sliding_window": WINDOW,
            "final_logit_softcapping": 2.0,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi": ("PhiConfig", {"num_key_value_heads": None}),  # head bias
    "phi3": ("Phi3Config", {"sliding_window": WINDOW}),
    "gpt2": (
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 64},
    ),
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None}),
    "gptj": (
        "GPTJConfig",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4},
    ),
    "opt": (
        "OPTConfig",
        {"ffn_dim": 64, "word_embed_proj_dim": 32, "num_key_value_heads": None},
    ),
    "falcon": ("FalconConfig", {"num_key_value_heads": None}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
    "granitemoe": ("GraniteMoeConfig", {**_MOE, "num_local_experts": 4, "logits_scaling": 4.0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "cohere2": ("Cohere2Config", {"logit_scale": 0.25, "sliding_window": WINDOW}),
    "olmo2": ("Olmo2Config", {}),
    "olmoe": ("OlmoeConfig", {**_MOE, "num_experts": 4}),
    "smollm3": ("SmolLM3Config", {}),
    "starcoder2": ("Starcoder2Config", {"sliding_window": WINDOW}),
    "bloom": ("BloomConfig", {"num_key_value_heads": None}),  # ALiBi
    "llama4_text": (
        "Llama4TextConfig",
        {
            "head_dim": 8,
            "intermediate_size_mlp": 64,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "attention_chunk_size": WINDOW,  # chunked local layers (no-RoPE layers global)
            "no_rope_layers": [1, 0],
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        {
            **_MOE,
            "num_local_experts": 4,
            "head_dim": 8,
            "intermediate_size": 32,
            "sliding_window": WINDOW,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
}
#: families whose decoder adds a router load-balancing loss
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "olmoe", "gpt_oss")
#: after-head transforms the configs above set (what output_transform must find)
TRANSFORMED = ("gemma2", "gemma3_text", "granite", "granitemoe", "cohere", "cohere2")


def build(name: str, seed: int = 0, *, attn: str = "sdpa", dtype=torch.float64):
    """A random-init causal LM of family ``name`` (eval mode), reproducible from ``seed``;
    ``attn`` as ``hf:`` loads it (sdpa), or eager where the family has no sdpa path."""
    import transformers

    cls_name, overrides = FAMILIES[name]
    kwargs = {**_BASE, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for implementation in dict.fromkeys((attn, "eager")):
        config = getattr(transformers, cls_name)(**kwargs)
        config._attn_implementation = implementation
        config._experts_implementation = "eager"  # grouped_mm takes no float64
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:  # "does not support an attention implementation through sdpa"
                continue
        return model.to(dtype).eval()
    raise AssertionError(f"{name}: no attention implementation builds")


def matrix() -> list[str]:
    """The families table of docs/lm-families.md: each family's class, what kdkit applies after
    its head, how packed rows reach it, and the logits probe on 13 random token ids."""
    from kdkit.errors import KDError
    from kdkit.lm.logits import output_transform
    from kdkit.lm.packing import packing_path
    from kdkit.lm.probe import probe_model

    ids = torch.randint(3, VOCAB, (13,), generator=torch.Generator().manual_seed(7))
    lines = [
        "| family (`model_type`) | class | after the head | packed rows | probe: max \\|kdkit - own\\| "
        "| probe: packed row max \\|d h\\| |",
        "|---|---|---|---|---:|---|",
    ]
    for name in FAMILIES:
        model = build(name)
        plain = probe_model(model, ids, role="teacher")
        try:
            packed = probe_model(model, ids, role="teacher", packing=True)
            packed_cell = f"{packed.packed_diff:.1e}"
        except KDError:
            packed_cell = "refused (`data.pack: true`)"
        lines.append(
            f"| {name} | `{type(model).__name__}` | {output_transform(model).describe()} | "
            f"{packing_path(model)} | {plain.max_abs_diff:.1e} | {packed_cell} |"
        )
    return lines


if __name__ == "__main__":  # python tests/_lm_families.py: the table of docs/lm-families.md
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    print("\n".join(matrix()))
