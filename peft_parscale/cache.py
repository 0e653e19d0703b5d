"""KV-cache layers that keep the ParScale prefix resident during generation.

With a cache, the prefix of stream p is written once into the first T slots of every layer's cache, rows
p·N .. p·N + N - 1 (stream-major, N sequences per stream). From then on the model sees T extra tokens "already
seen" that every query may attend to: transformers' own mask code (fed a 2D mask with T leading ones) builds the
right mask, and no decode step copies the cache to put the prefix in front.

Consequences of counting the prefix as cached tokens: `cache.get_seq_length()` includes the T prefix slots, and
the real tokens' rotary positions are passed explicitly (they still start at 0). Both are handled in `layer.py`.

Sliding-window layers keep the prefix too, and never evict it: their first T slots hold the prefix, the slots after it
the last real tokens of the window (the real tokens are evicted as transformers' own sliding-window layers evict them).
Their `get_mask_sizes` describes the real-token slots to transformers' mask code (offset: the evicted real tokens), and
`ParScaleAttention` marks the T prefix columns of a sliding layer's mask visible, as the mask code itself cannot.

transformers has no hook to choose the layer class of a cache it creates, so the default `DynamicLayer`,
`DynamicSlidingWindowLayer`, `StaticLayer` and `StaticSlidingWindowLayer` of an unused cache are swapped for the
subclasses below (`make_prefix_resident`).

`copy_prompt_rows` fills a static cache from a dynamic one that ran each prompt once, for the fast path's several
sequences per prompt (`decode.py`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)


def stream_prefix(prefix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Expand a (P, heads, T, head_dim) prefix to the P·N stream-major rows of `like` (row p·N + b gets prefix[p])."""
    num_streams = prefix.shape[0]
    if like.shape[0] % num_streams:
        raise ValueError(f"{like.shape[0]} rows cannot be split into {num_streams} ParScale streams.")
    if like.shape[1] != prefix.shape[1] or like.shape[-1] != prefix.shape[-1]:
        # The adapter's shape is what each layer cached in one forward pass (`probe.py`); a layer that caches another
        # layout in another call would otherwise fail inside `torch.cat` with a bare shape error.
        raise ValueError(
            f"The model's keys/values have {like.shape[1]} heads of size {like.shape[-1]}, the ParScale prefix "
            f"{prefix.shape[1]} of size {prefix.shape[-1]}: this attention layer cached another layout when the "
            "adapter was made."
        )
    return prefix.to(like.dtype).repeat_interleave(like.shape[0] // num_streams, dim=0)


class _PrefixResident:
    """What the dynamic and the static prefix layer share: the prefix, and batch re-indexing across streams."""

    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    keys: torch.Tensor

    def _stream_rows(self, indices: torch.Tensor) -> torch.Tensor:
        # `generate` selects rows by per-sequence indices (beam search: B·beams of them); apply them in every stream.
        num_streams = self.prefix_k.shape[0]
        rows_per_stream = self.keys.shape[0] // num_streams
        offsets = rows_per_stream * torch.arange(num_streams, device=indices.device)
        return (offsets[:, None] + indices[None, :]).reshape(-1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            super().reorder_cache(self._stream_rows(beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            super().batch_select_indices(self._stream_rows(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows_per_stream = self.keys.shape[0] // self.prefix_k.shape[0]
            self.batch_select_indices(torch.arange(rows_per_stream, device=self.keys.device).repeat_interleave(repeats))


class _PrefixInStaticSlots(_PrefixResident):
    """What the static prefix layers share: the prefix written into the first T of the preallocated slots, when they
    are allocated and again on every reset, which also sets the length back to T."""

    values: torch.Tensor

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._write_prefix()

    def _write_prefix(self) -> None:
        prefix_length = self.prefix_k.shape[2]
        self.keys[:, :, :prefix_length] = stream_prefix(self.prefix_k, self.keys)
        self.values[:, :, :prefix_length] = stream_prefix(self.prefix_v, self.values)

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self._write_prefix()
        self.cumulative_length.fill_(self.prefix_k.shape[2])


class _PrefixInDynamicKeys(_PrefixResident):
    """What the dynamic prefix layers share: the keys/values start as the prefix, to which tokens are appended."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = stream_prefix(self.prefix_k, key_states)
        self.values = stream_prefix(self.prefix_v, value_states)


class ParScaleDynamicLayer(_PrefixInDynamicKeys, DynamicLayer):
    """A `DynamicLayer` whose first T positions hold the streams' prefix."""

    def __init__(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        super().__init__()
        self.prefix_k, self.prefix_v = prefix_k, prefix_v

    def get_seq_length(self) -> int:
        # The prefix counts from the start: the attention mask is sized before the first update.
        return self.keys.shape[-2] if self.is_initialized else self.prefix_k.shape[2]


class ParScaleStaticLayer(_PrefixInStaticSlots, StaticLayer):
    """A `StaticLayer` with T more slots, the first T holding the streams' prefix."""

    def __init__(self, max_cache_len: int, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        super().__init__(max_cache_len + prefix_k.shape[2])
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        self.cumulative_length.fill_(prefix_k.shape[2])

    def get_seq_length(self) -> torch.Tensor:
        return self.cumulative_length


class ParScaleDynamicSlidingWindowLayer(_PrefixInDynamicKeys, DynamicSlidingWindowLayer):
    """A `DynamicSlidingWindowLayer` whose first T positions hold the streams' prefix, never evicted.

    After the prefix it keeps the last `sliding_window - 1` real tokens, as transformers' layer does. Its length
    (`cumulative_length`) counts the prefix, like the full layers': the queries' cache positions are T + real position.
    """

    def __init__(self, sliding_window: int, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        super().__init__(sliding_window=sliding_window)
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        self.cumulative_length = prefix_k.shape[2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        prefix_length, kept = self.prefix_k.shape[2], self.sliding_window - 1
        if keys.shape[-2] - prefix_length > kept:  # evict the oldest real tokens, never the prefix
            self.keys = torch.cat([keys[:, :, :prefix_length], keys[:, :, keys.shape[-2] - kept :]], dim=-2)
            self.values = torch.cat([values[:, :, :prefix_length], values[:, :, values.shape[-2] - kept :]], dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The keys `update` returns: T prefix slots, the kept real tokens, the new ones. The mask code numbers key
        # slot s as s + offset; with offset = number of evicted real tokens, the real-token slots get their true cache
        # positions (T + real position). The prefix slots get wrong ones, and `ParScaleAttention` overrides them.
        prefix_length = self.prefix_k.shape[2]
        real_tokens = self.cumulative_length - prefix_length
        kept = min(real_tokens, self.sliding_window - 1)
        return prefix_length + kept + query_length, real_tokens - kept

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("ParScale's sliding-window cache layers cannot be cropped.")

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = self.prefix_k.shape[2]


class ParScaleStaticSlidingWindowLayer(_PrefixInStaticSlots, StaticSlidingWindowLayer):
    """A `StaticSlidingWindowLayer` with T more slots, the first T holding the streams' prefix, never evicted.

    The slots after the prefix hold the last real tokens, rolled as in transformers' layer; the python-int length
    (`cumulative_length_int`) counts the prefix, like the full layers' length.
    """

    def __init__(self, max_cache_len: int, sliding_window: int, prefix_k: torch.Tensor, prefix_v: torch.Tensor):
        prefix_length = prefix_k.shape[2]
        super().__init__(max_cache_len=min(sliding_window, max_cache_len), sliding_window=sliding_window)
        self.window_slots = self.max_cache_len  # real-token slots: min(sliding_window, max_cache_len)
        self.max_cache_len += prefix_length
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        self.cumulative_length_int = prefix_length
        self.cumulative_length.fill_(prefix_length)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        prefix_length, slots = self.prefix_k.shape[2], self.window_slots
        real_tokens, new_tokens = self.cumulative_length_int - prefix_length, key_states.shape[-2]
        self.cumulative_length_int += new_tokens
        if real_tokens + new_tokens <= slots:  # room left: write in place, return the whole buffer
            position = torch.arange(new_tokens, device=self.device) + self.cumulative_length
            self.keys.index_copy_(2, position, key_states)
            self.values.index_copy_(2, position, value_states)
            self.cumulative_length.add_(new_tokens)
            return self.keys, self.values
        if real_tokens >= slots and new_tokens == 1:  # full, one token: roll the real-token slots left by one
            for cached, new in ((self.keys, key_states), (self.values, value_states)):
                rolled = cached[:, :, prefix_length:].roll(-1, dims=-2)
                rolled[:, :, -1:] = new
                cached[:, :, prefix_length:].copy_(rolled)
            return self.keys, self.values
        # Several new tokens that overflow the window: return prefix, kept and new tokens; keep the last `slots` real
        kept = min(real_tokens, slots) - (1 if real_tokens >= slots else 0)
        start = prefix_length + min(real_tokens, slots) - kept
        returned = []
        for cached, new in ((self.keys, key_states), (self.values, value_states)):
            real = torch.cat([cached[:, :, start : start + kept], new], dim=-2)
            full = torch.cat([cached[:, :, :prefix_length], real], dim=-2)
            cached[:, :, prefix_length:].copy_(real[:, :, -slots:])
            returned.append(full)
        return returned[0], returned[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # As `ParScaleDynamicSlidingWindowLayer.get_mask_sizes`, for the keys `update` returns in each of its cases.
        prefix_length, slots = self.prefix_k.shape[2], self.window_slots
        real_tokens = self.cumulative_length_int - prefix_length
        if real_tokens + query_length <= slots:
            return prefix_length + slots, 0
        if real_tokens >= slots:
            return prefix_length + slots - 1 + query_length, real_tokens - slots + 1
        return prefix_length + real_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length_int

    def reset(self) -> None:
        super().reset()
        self.cumulative_length_int = self.prefix_k.shape[2]


def make_prefix_resident(cache: Cache, prefixes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Turn an unused cache's layers into prefix layers (idempotent for a cache already prepared with `prefixes`).

    Raises `ValueError`, leaving the cache unchanged, for a cache that already holds tokens computed without the
    prefix, one prepared for another adapter, or cache layers other than the default dynamic and static ones.
    """
    if not isinstance(cache, Cache):
        raise TypeError(f"ParScale needs a transformers `Cache` for past_key_values, got {type(cache).__name__}.")
    if getattr(cache, "offloading", False):
        raise ValueError("ParScale does not support offloaded caches.")
    num_layers = len(prefixes)
    first = cache.layers[0] if cache.layers else None
    if isinstance(first, _PrefixResident) and first.prefix_k is prefixes[0][0]:
        return  # prepared already (all layers are swapped together): the case at every decoding step
    if not cache.layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        new_layers = [DynamicLayer() for _ in range(num_layers)]
    elif len(cache.layers) == num_layers:
        new_layers = list(cache.layers)
    else:
        raise ValueError(f"The cache has {len(cache.layers)} layers; the model has {num_layers} attention layers.")

    for i, (layer, (prefix_k, prefix_v)) in enumerate(zip(new_layers, prefixes)):
        if isinstance(layer, _PrefixResident):
            if layer.prefix_k is not prefix_k:
                raise ValueError(
                    "This cache was filled by another ParScale adapter; start generation with a new cache."
                )
            continue
        if layer.is_initialized:
            raise ValueError(
                "This cache already holds keys/values computed without the ParScale prefix; use a new cache."
            )
        if type(layer) is DynamicLayer:
            new_layers[i] = ParScaleDynamicLayer(prefix_k, prefix_v)
        elif type(layer) is DynamicSlidingWindowLayer:
            new_layers[i] = ParScaleDynamicSlidingWindowLayer(layer.sliding_window, prefix_k, prefix_v)
        elif type(layer) is StaticLayer:
            new_layers[i] = ParScaleStaticLayer(layer.max_cache_len, prefix_k, prefix_v)
        elif type(layer) is StaticSlidingWindowLayer:
            # its max_cache_len is already min(sliding_window, the cache's max_cache_len)
            new_layers[i] = ParScaleStaticSlidingWindowLayer(
                layer.max_cache_len, layer.max_cache_len, prefix_k, prefix_v
            )
        else:
            raise ValueError(
                "ParScale supports the default dynamic and static caches (full and sliding-window layers), not "
                f"{type(layer).__name__} layers."
            )
    cache.layers = new_layers
    if hasattr(cache, "layer_class_to_replicate"):
        cache.layer_class_to_replicate = None


def takes_prompt_rows(cache: Cache) -> bool:
    """Whether `copy_prompt_rows` can fill `cache`: every layer a full-attention static one. A sliding-window layer
    keeps only its window, and the slots it rolls would have to be reproduced."""
    return bool(cache.layers) and all(type(layer) in (StaticLayer, ParScaleStaticLayer) for layer in cache.layers)


def copy_prompt_rows(
    cache: Cache,
    prompt_cache: Cache,
    rows: torch.Tensor,
    prompts: torch.Tensor,
    num_sequences: int,
    prompt_length: int,
) -> None:
    """Write the prompt tokens' keys/values that `prompt_cache` holds into the sequences `rows` of `cache` (a cache
    for `num_sequences`), sequence `rows[i]` getting those of prompt `prompts[i]` of `prompt_cache`, after the prefix
    slots; set every layer's length to the prefix and the prompt, so that the next token is written after them.

    `cache`'s layers (see `takes_prompt_rows`; prepared with `make_prefix_resident` when an adapter is active) and
    `prompt_cache`'s hold P rows per sequence and per prompt, stream-major.
    """
    for layer, prompt_layer in zip(cache.layers, prompt_cache.layers, strict=True):
        new_keys, new_values = (cached[:, :, -prompt_length:] for cached in (prompt_layer.keys, prompt_layer.values))
        num_streams = layer.prefix_k.shape[0] if isinstance(layer, _PrefixResident) else 1
        if not layer.is_initialized:  # allocates the rows (and writes the prefix) from the shapes of an expanded view
            like = [new[:1, :, :1].expand(num_streams * num_sequences, -1, -1, -1) for new in (new_keys, new_values)]
            layer.lazy_initialization(*like)
        start = layer.prefix_k.shape[2] if isinstance(layer, _PrefixResident) else 0
        for slots, new in ((layer.keys, new_keys), (layer.values, new_values)):
            target = slots.view(num_streams, -1, *slots.shape[1:])
            target[:, rows, :, start : start + prompt_length] = new.view(num_streams, -1, *new.shape[1:])[:, prompts]
        layer.cumulative_length.fill_(start + prompt_length)
