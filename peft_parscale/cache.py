"""KV-cache layers that keep the ParScale prefix resident during generation.

With a cache, the prefix of stream p is written once into the first T slots of every layer's cache, rows
p·N .. p·N + N - 1 (stream-major, N sequences per stream). From then on the model sees T extra tokens "already
seen" that every query may attend to: transformers' own mask code (fed a 2D mask with T leading ones) builds the
right mask, and no decode step copies the cache to put the prefix in front.

Consequences of counting the prefix as cached tokens: `cache.get_seq_length()` includes the T prefix slots, and
the real tokens' rotary positions are passed explicitly (they still start at 0). Both are handled in `layer.py`.

transformers has no hook to choose the layer class of a cache it creates, so the default `DynamicLayer` and
`StaticLayer` of an unused cache are swapped for the subclasses below (`make_prefix_resident`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer


def stream_prefix(prefix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Expand a (P, heads, T, head_dim) prefix to the P·N stream-major rows of `like` (row p·N + b gets prefix[p])."""
    num_streams = prefix.shape[0]
    if like.shape[0] % num_streams:
        raise ValueError(f"{like.shape[0]} rows cannot be split into {num_streams} ParScale streams.")
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


class ParScaleDynamicLayer(_PrefixResident, DynamicLayer):
    """A `DynamicLayer` whose first T positions hold the streams' prefix."""

    def __init__(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        super().__init__()
        self.prefix_k, self.prefix_v = prefix_k, prefix_v

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = stream_prefix(self.prefix_k, key_states)
        self.values = stream_prefix(self.prefix_v, value_states)

    def get_seq_length(self) -> int:
        # The prefix counts from the start: the attention mask is sized before the first update.
        return self.keys.shape[-2] if self.is_initialized else self.prefix_k.shape[2]


class ParScaleStaticLayer(_PrefixResident, StaticLayer):
    """A `StaticLayer` with T more slots, the first T holding the streams' prefix."""

    def __init__(self, max_cache_len: int, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        super().__init__(max_cache_len + prefix_k.shape[2])
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        self.cumulative_length.fill_(prefix_k.shape[2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._write_prefix()

    def _write_prefix(self) -> None:
        prefix_length = self.prefix_k.shape[2]
        self.keys[:, :, :prefix_length] = stream_prefix(self.prefix_k, self.keys)
        self.values[:, :, :prefix_length] = stream_prefix(self.prefix_v, self.values)

    def get_seq_length(self) -> torch.Tensor:
        return self.cumulative_length

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self._write_prefix()
        self.cumulative_length.fill_(self.prefix_k.shape[2])


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
        elif type(layer) is StaticLayer:
            new_layers[i] = ParScaleStaticLayer(layer.max_cache_len, prefix_k, prefix_v)
        else:
            raise ValueError(
                f"ParScale supports the default dynamic and static caches, not {type(layer).__name__} layers."
            )
    cache.layers = new_layers
    if hasattr(cache, "layer_class_to_replicate"):
        cache.layer_class_to_replicate = None
