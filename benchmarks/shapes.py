"""Model shapes: the Qwen2.5 base models (random weights), tiny CPU stand-ins, and dense models scaled by parameters.

The parallel scaling law fitted on the paper's code runs (peft_parscale.scaling_law.paper_runs) says that P streams act like
multiplying the non-embedding parameter count N by (1 + k·ln P), k = 0.3935. `dense_equivalent` builds, for a shape
and a P, the dense model of that quality: the same family, hidden size, heads and vocabulary (so the same embedding),
with round(L·r) layers and the MLP width that makes the non-embedding count r·N (rounded to a multiple of 64).
"""

from __future__ import annotations

import math

from transformers import Qwen2Config

# k of the fitted law on Stack-V2 Python (peft_parscale.scaling_law.paper_runs).
SCALING_K = 0.3935

# Qwen2.5 base configurations (hidden, MLP, layers, heads, key/value heads); vocabulary 151936, tied embeddings.
QWEN25 = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12},
    "3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16},
}
QWEN25_COMMON = {
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}
# CPU stand-ins for the tiny mode: same family, small enough to run in seconds.
TINY = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
TINY_COMMON = dict(QWEN25_COMMON, vocab_size=512, max_position_embeddings=1024)


def shape_config(name: str, attn_implementation: str = "sdpa", **overrides) -> Qwen2Config:
    """The Qwen2 configuration of a named shape ("0.5b", "1.5b", "3b" or "tiny")."""
    fields = {**QWEN25_COMMON, **QWEN25[name]} if name in QWEN25 else {**TINY_COMMON, **TINY[name]}
    return Qwen2Config(**{**fields, **overrides}, attn_implementation=attn_implementation)


def layer_parameters(config: Qwen2Config, intermediate_size: int | None = None) -> int:
    """Parameters of one decoder layer: attention (q, k, v with bias; o without), gated MLP, two RMSNorms."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    query, key_value = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = hidden * query + query + 2 * (hidden * key_value + key_value) + query * hidden
    mlp = 3 * hidden * (config.intermediate_size if intermediate_size is None else intermediate_size)
    return attention + mlp + 2 * hidden


def non_embedding_parameters(config: Qwen2Config) -> int:
    """N of the scaling law: every parameter but the token embedding (tied with the LM head here)."""
    return config.num_hidden_layers * layer_parameters(config) + config.hidden_size


def dense_equivalent(name: str, num_streams: int, k: float = SCALING_K, **overrides) -> Qwen2Config:
    """The dense model whose non-embedding parameter count is (1 + k·ln P) times that of the named shape."""
    config = shape_config(name, **overrides)
    target = non_embedding_parameters(config) * (1 + k * math.log(num_streams))
    layers = round(config.num_hidden_layers * (1 + k * math.log(num_streams)))
    per_layer = (target - config.hidden_size) / layers
    mlp_per_unit = 3 * config.hidden_size  # parameters per unit of intermediate_size
    intermediate = (per_layer - layer_parameters(config, intermediate_size=0)) / mlp_per_unit
    return shape_config(name, **overrides, num_hidden_layers=layers, intermediate_size=64 * round(intermediate / 64))
