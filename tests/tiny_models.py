"""The tests' tiny random models, built from their transformers configs, and the tiny tokenizer they read.

Two sets, one `tiny_model`:

- `REFERENCE_ARCHITECTURES`: the four architectures the plain reference implementation (`tests/reference.py`)
  computes (Qwen2, Qwen3, Llama, Mistral), with a vocabulary of `VOCAB` ids; most tests run on these.
- `ARCHITECTURES`: every architecture in the README's support table. Each entry names a model type and the config
  fields that make it tiny (2 layers, hidden size 48, the vocabulary of `tiny_tokenizer()`) while keeping what makes
  the architecture itself: its module layout, its cache argument, its position scheme (rotary, partial rotary, NoPE
  layers, Llama-3 rope scaling, learned absolute positions), its attention variant (grouped-query, multi-query,
  Falcon-40B's broadcast heads), sliding-window and alternating layers, logit soft-capping and scaling, mixtures of
  experts. `tests/test_architectures.py` runs the same tests over all of them; `tests/support_table.py` renders the
  README's table from those tests' results.

Dropout is off everywhere, so training mode computes what evaluation mode does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from peft_parscale.testing import tiny_tokenizer  # the tests take it from here, with the models

VOCAB = 97  # the reference architectures' vocabulary
TOKENIZER_VOCAB = len(tiny_tokenizer())  # the support table's: the tiny tokenizer's ids
WINDOW = 16  # sliding windows in the oracle tests: longer than any [text ; input] there (6 + 7 tokens)

LLAMA_LIKE = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Arch:
    """One row of the support table: a model type and the config fields of its tiny model."""

    name: str  # the row's label
    model_type: str
    config: dict = field(default_factory=dict)
    sliding: bool = False  # has sliding-window layers (tested past the window too)


REFERENCE_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
REFERENCE_ARCHITECTURES = {
    arch.name: arch
    for arch in [
        Arch("qwen2", "qwen2", REFERENCE_LIKE),
        Arch("qwen3", "qwen3", {**REFERENCE_LIKE, "head_dim": 16, "attention_bias": False}),
        Arch("llama", "llama", {**REFERENCE_LIKE, "tie_word_embeddings": True}),
        Arch("mistral", "mistral", {**REFERENCE_LIKE, "sliding_window": None, "head_dim": 8}),
    ]
}
ARCHITECTURES = {
    arch.name: arch
    for arch in [
        Arch("Qwen2", "qwen2", LLAMA_LIKE),
        Arch(
            "Qwen2 (sliding window)",
            "qwen2",
            {**LLAMA_LIKE, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
            sliding=True,
        ),
        Arch("Qwen3", "qwen3", {**LLAMA_LIKE, "head_dim": 16}),
        Arch(
            "Qwen3-MoE",
            "qwen3_moe",
            {**LLAMA_LIKE, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
        ),
        Arch(
            "Llama (Llama-3 rope scaling)",
            "llama",
            {
                **LLAMA_LIKE,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            },
        ),
        Arch("Mistral (sliding window)", "mistral", {**LLAMA_LIKE, "sliding_window": WINDOW}, sliding=True),
        Arch("Mixtral", "mixtral", {**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}),
        Arch("Gemma", "gemma", {**LLAMA_LIKE, "head_dim": 12}),
        Arch(
            "Gemma2 (alternating sliding/full)",
            "gemma2",
            {**LLAMA_LIKE, "head_dim": 12, "query_pre_attn_scalar": 12, "sliding_window": WINDOW},
            sliding=True,
        ),
        Arch(
            "Gemma3 text (alternating sliding/full)",
            "gemma3_text",
            {
                **LLAMA_LIKE,
                "head_dim": 12,
                "query_pre_attn_scalar": 12,
                "sliding_window": WINDOW,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            sliding=True,
        ),
        Arch(
            "Phi3 (sliding window)", "phi3", {**LLAMA_LIKE, "sliding_window": WINDOW, "pad_token_id": 0}, sliding=True
        ),
        Arch("OLMo2", "olmo2", LLAMA_LIKE),
        Arch(
            "Granite",
            "granite",
            {
                **LLAMA_LIKE,
                "embedding_multiplier": 2.0,
                "residual_multiplier": 0.5,
                "attention_multiplier": 0.2,
                "logits_scaling": 2.0,
            },
        ),
        Arch("StableLM", "stablelm", {**LLAMA_LIKE, "partial_rotary_factor": 0.5}),  # rotary on half of each head
        Arch(
            "SmolLM3 (NoPE layers)",
            "smollm3",
            {**LLAMA_LIKE, "no_rope_layers": [1, 0], "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None},
        ),
        Arch("Starcoder2 (sliding window)", "starcoder2", {**LLAMA_LIKE, "sliding_window": WINDOW}, sliding=True),
        Arch(
            "GPT-NeoX",
            "gpt_neox",
            {**{k: v for k, v in LLAMA_LIKE.items() if k != "num_key_value_heads"}, "rotary_pct": 0.5},
        ),
        Arch(
            "Falcon (rotary, multi-query)",
            "falcon",
            {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "alibi": False, "multi_query": True},
        ),
        Arch(
            "Falcon (rotary, new decoder architecture)",
            "falcon",
            {
                "hidden_size": 48,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_kv_heads": 2,
                "alibi": False,
                "new_decoder_architecture": True,
            },
        ),
        Arch(
            "DeepSeek-V3 (latent attention)",
            "deepseek_v3",
            {
                **LLAMA_LIKE,
                "num_key_value_heads": 4,
                "moe_intermediate_size": 32,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "n_group": 1,
                "topk_group": 1,
                "first_k_dense_replace": 1,  # layer 0 dense, layer 1 a mixture of experts
                "kv_lora_rank": 16,  # the cache holds this compressed latent and the rotary part of the keys
                "q_lora_rank": 24,
                "qk_rope_head_dim": 8,
                "qk_nope_head_dim": 8,
                "v_head_dim": 12,
            },
        ),
        Arch(
            "CodeGen (rotary angles from a table)",
            "codegen",
            {"n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8},
        ),
        Arch(
            "GPT-J (rotary angles from a table)",
            "gptj",
            {"n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8},
        ),
        Arch("GPT-2", "gpt2", {"n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 256}),
        Arch(
            "GPT-BigCode",
            "gpt_bigcode",
            {"n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 256, "multi_query": True},
        ),
    ]
}
SLIDING = [name for name, arch in ARCHITECTURES.items() if arch.sliding]


def tiny_config(name: str, attn_implementation: str = "sdpa", **overrides):
    arch = REFERENCE_ARCHITECTURES.get(name) or ARCHITECTURES[name]
    settings = {"vocab_size": TOKENIZER_VOCAB, "bos_token_id": None, "eos_token_id": None, **arch.config, **overrides}
    config = AutoConfig.for_model(arch.model_type, **settings)
    for key, value in list(vars(config).items()):  # no dropout anywhere
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(
    name: str = "qwen2",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A tiny random model of architecture `name` (a key of `REFERENCE_ARCHITECTURES` or `ARCHITECTURES`); weights
    larger than the default init, so that mistakes show in the logits, and the same weights in any `dtype` (drawn in
    float32, then converted)."""
    config = tiny_config(name, attn_implementation, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    norms = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name_, parameter in model.named_parameters():
            if id(parameter) in norms and name_.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None  # generate exactly the number of tokens asked for
    model.generation_config.pad_token_id = 0
    return model.to(dtype)
