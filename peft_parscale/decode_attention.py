"""Attention for the fast path's decode step: one query per sequence against grouped key/value heads, without copying
the keys and values once per query head.

In grouped-query attention (Qwen2.5-0.5B: 14 query heads, 2 key/value heads), transformers' sdpa attention repeats
every key/value head once per query head of its group (`repeat_kv`) whenever an attention mask is passed and sdpa's
own `enable_gqa` would fall back to its math kernel. A decode step always passes one (the static cache's), so each
step writes and reads the whole cache several times over: a cost that grows with the rows and the length, and at P
streams the rows are P times the sequences. transformers 5.23 avoids the copy for a single query token
(`pack_gqa`: the group's query heads become that key/value head's queries) but not under torch.compile, and 5.17 not
at all; the fast path's decode step is compiled. `packed_gqa_sdpa` does that packing always, and the fast path
switches a model to it for the duration of a call (`grouped_query_decoding`) through transformers' public
`AttentionInterface` and `AttentionMaskInterface` registries, so no model code is forked and the model is left as it
was. Everything else (the prompt, masks with a per-head dimension, softcaps, attention sinks, position biases) goes
to transformers' own sdpa attention unchanged.

    with grouped_query_decoding(model):  # a transformers causal LM whose attention is "sdpa"
        logits = model(input_ids=next_token, attention_mask=mask, past_key_values=cache, use_cache=True).logits

The switches it needs serve training too: `sdpa_switched_to` and `attention_configs` (the benchmarks' padded
attention), and `compile_safe_sdpa_kernel`, sdpa's kernel choice kept under torch.compile (`parscale sft`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch._functorch import config as functorch_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_GQA_SDPA = "parscale_packed_gqa_sdpa"
# Keyword arguments that change what attention computes beyond query, key, value, mask and scale.
OTHER_ATTENTION_TERMS = ("softcap", "position_bias", "s_aux", "sinks")


def packed_gqa_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except that one query token per sequence attends to grouped key/value heads as
    the group's query heads stacked as queries: (B, H, 1, D) -> (B, H_kv, H / H_kv, D), with no copy of key or value.
    Query head h belongs to key/value head h // (H / H_kv), as in `repeat_kv`, and the mask, shared by every head, is
    broadcast over the group's queries."""
    groups = getattr(module, "num_key_value_groups", 1)
    shared_mask = attention_mask is None or attention_mask.shape[1] == 1
    if (
        query.shape[2] != 1
        or groups == 1
        or not shared_mask
        or any(kwargs.get(name) is not None for name in OTHER_ATTENTION_TERMS)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, _, head_dim = query.shape
    output = scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, head_dim),
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
    )
    # (B, H_kv, groups, Dv) -> (B, 1, H, Dv): the layout transformers' attention functions return
    return output.reshape(batch, 1, heads, value.shape[-1]), None


AttentionInterface.register(PACKED_GQA_SDPA, packed_gqa_sdpa)
AttentionMaskInterface.register(PACKED_GQA_SDPA, sdpa_mask)  # the masks sdpa gets


@contextmanager
def grouped_query_decoding(causal_lm: nn.Module) -> Iterator[None]:
    """Run `causal_lm`'s attention as `packed_gqa_sdpa` inside the block if its attention layers call transformers'
    attention functions and every config in it says "sdpa"; leave it as it is otherwise. Restored on exit."""
    configs = attention_configs(causal_lm)
    # Models that branch on the string "sdpa" in their own attention code (Falcon, Bloom, GPT-J, ...) would take their
    # eager branch and add sdpa's boolean mask to the scores; transformers marks the models that dispatch through
    # `AttentionInterface` with `_supports_attention_backend`.
    switch = (
        getattr(causal_lm, "_supports_attention_backend", False)
        and bool(configs)
        and all(config._attn_implementation == "sdpa" for config in configs)
    )
    with sdpa_switched_to(configs if switch else [], PACKED_GQA_SDPA):
        yield


@contextmanager
def sdpa_switched_to(configs: list[PretrainedConfig], implementation: str) -> Iterator[None]:
    """Set each of `configs` (whose attention is "sdpa") to the registered attention `implementation` inside the
    block, and back to "sdpa" on exit."""
    for config in configs:
        config._attn_implementation = implementation
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"


@contextmanager
def compile_safe_sdpa_kernel(backends: list[SDPBackend]) -> Iterator[None]:
    """torch's `sdpa_kernel(backends)`, kept also by code that torch.compile compiles inside the block.

    torch.compile picks sdpa's kernel when it traces a graph, and its on-disk cache of traced graphs
    (AOTAutogradCache) keys them without the kernel choice (pytorch/pytorch#185449, unfixed in torch 2.11 to 2.13):
    a graph traced under another choice, earlier in this process or in another one, would come back from the cache
    and run that choice's kernel. So the cache is off inside the block (inductor's own cache, which keys the traced
    graph with its kernel in it, still serves)."""
    with sdpa_kernel(backends), functorch_config.patch(enable_autograd_cache=False):
        yield


def attention_configs(causal_lm: nn.Module) -> list[PretrainedConfig]:
    """Every config the modules of `causal_lm` read their attention implementation from, sub-configs included, each
    once (modules share their model's config)."""
    found = {}
    for module in causal_lm.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            found[id(config)] = config
            for key in config.sub_configs:
                if isinstance(getattr(config, key, None), PretrainedConfig):
                    found[id(getattr(config, key))] = getattr(config, key)
    return list(found.values())
