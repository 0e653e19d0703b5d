"""Training attention through sdpa's plain causal kernels, by padding the queries: a lever of issue 21, measured here
before it could become a default.

In training, each stream's T prefix keys come before the S token keys, so query i sees keys 0..T+i: a causal mask
aligned to the lower right of the (S, T + S) scores. The package says so with `causal_lower_right` (layer.py
`mask_with_prefix`), which only two of sdpa's kernels accept: flash (FlashAttention-2) and memory-efficient. sdpa's
`is_causal` is aligned to the upper left, which is the same thing only when the lengths are equal, and cuDNN's kernel
(Hopper) takes nothing else without an explicit mask. Putting T zero query rows in front makes the lengths equal: row
T + i of the padded queries then sees keys 0..T+i, exactly query i's keys, and the T extra rows are dropped from the
output (so no gradient reaches them). The cost is T / S more query rows (48 of 2,048 at the sweep's shape).

`padded_prefix_sdpa` is registered through transformers' public `AttentionInterface` and `AttentionMaskInterface`
(as peft_parscale/decode_attention.py does), so no model code is forked; every other call (explicit masks of padded
or packed batches, one-token decoding) goes to transformers' own sdpa attention unchanged.

    with padded_prefix_attention(peft_model, [SDPBackend.CUDNN_ATTENTION]):
        loss = peft_model(input_ids=ids, labels=ids).loss
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from peft_parscale.decode_attention import (
    OTHER_ATTENTION_TERMS,
    attention_configs,
    compile_safe_sdpa_kernel,
    sdpa_switched_to,
)

PADDED_PREFIX_SDPA = "parscale_padded_prefix_sdpa"


def padded_prefix_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except that a lower-right causal bias over more keys than queries becomes sdpa's
    `is_causal` over queries padded in front to the keys' length. query (B, H, S, D); key and value (B, H_kv, K, D)."""
    lower_right = isinstance(attention_mask, CausalBias) and attention_mask.variant == CausalVariant.LOWER_RIGHT
    padding = key.shape[2] - query.shape[2]
    if not lower_right or padding <= 0 or any(kwargs.get(name) is not None for name in OTHER_ATTENTION_TERMS):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    # Repeated as on the bias's path (transformers repeats whenever a mask is passed), so that the two differ only in
    # the padding; and sdpa's `enable_gqa` is not taken by every kernel in every torch version (cuDNN's among them).
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    padded = torch.cat([query.new_zeros(*query.shape[:2], padding, query.shape[3]), query], dim=2)
    output = scaled_dot_product_attention(padded, key, value, dropout_p=dropout, is_causal=True, scale=scaling)
    # (B, H, S, Dv) -> (B, S, H, Dv): the layout transformers' attention functions return
    return output[:, :, padding:].transpose(1, 2).contiguous(), None


AttentionInterface.register(PADDED_PREFIX_SDPA, padded_prefix_sdpa)
AttentionMaskInterface.register(PADDED_PREFIX_SDPA, sdpa_mask)  # the masks sdpa gets


@contextmanager
def padded_prefix_attention(causal_lm: nn.Module, backends: list[SDPBackend] | None = None) -> Iterator[None]:
    """Run `causal_lm`'s attention as `padded_prefix_sdpa` inside the block, limited to sdpa's `backends` (all when
    None). Every config in the model must say "sdpa"; restored on exit."""
    configs = attention_configs(causal_lm)
    if not configs or any(config._attn_implementation != "sdpa" for config in configs):
        raise ValueError("padded_prefix_attention needs a model whose attention is 'sdpa'.")
    kernels = compile_safe_sdpa_kernel(backends) if backends else nullcontext()
    with sdpa_switched_to(configs, PADDED_PREFIX_SDPA), kernels:
        yield
