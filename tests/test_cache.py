"""The prefix-resident cache layers: prefix placement, lengths, and batch re-indexing across streams."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peft_parscale.cache import ParScaleDynamicLayer, ParScaleStaticLayer, make_prefix_resident

P, HEADS, T, DIM, SEQUENCES = 2, 1, 3, 4, 3


def prefix():
    return torch.randn(P, HEADS, T, DIM), torch.randn(P, HEADS, T, DIM)


def keys_for(rows, length, start=0):
    # key value = 100·row + position, to see where every entry went
    values = 100 * torch.arange(rows)[:, None] + torch.arange(start, start + length)[None, :]
    return values[:, None, :, None].expand(rows, HEADS, length, DIM).float()


@pytest.mark.parametrize("layer_class", ["dynamic", "static"])
def test_prefix_fills_the_first_slots_of_each_stream(layer_class):
    prefix_k, prefix_v = prefix()
    layer = (
        ParScaleDynamicLayer(prefix_k, prefix_v)
        if layer_class == "dynamic"
        else ParScaleStaticLayer(8, prefix_k, prefix_v)
    )
    assert int(layer.get_seq_length()) == T  # counted before the first update: masks are sized before it
    keys = keys_for(P * SEQUENCES, 2)
    stored, _ = layer.update(keys, keys)
    assert int(layer.get_seq_length()) == T + 2
    for row in range(P * SEQUENCES):
        assert torch.equal(stored[row, :, :T], prefix_k[row // SEQUENCES])  # stream-major rows
        assert torch.equal(stored[row, :, T : T + 2], keys[row])
    if layer_class == "static":
        assert stored.shape[2] == 8 + T
        layer.reset()
        assert int(layer.get_seq_length()) == T
        assert torch.equal(layer.keys[SEQUENCES, :, :T], prefix_k[1]) and layer.keys[:, :, T:].abs().sum() == 0


def test_batch_reindexing_applies_in_every_stream():
    layer = ParScaleDynamicLayer(*prefix())
    layer.update(keys_for(P * SEQUENCES, 2), keys_for(P * SEQUENCES, 2))
    before = layer.keys.clone()
    layer.reorder_cache(torch.tensor([2, 2, 0]))  # beam search: per-sequence indices
    for stream in range(P):
        for new, old in enumerate([2, 2, 0]):
            assert torch.equal(layer.keys[stream * 3 + new], before[stream * 3 + old])
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == P * 6
    assert torch.equal(layer.keys[6 + 1], before[3 + 2])  # stream 1, 2nd copy of sequence 0 (sequence 2 before)
    layer.batch_select_indices(torch.tensor([5]))
    assert layer.keys.shape[0] == P and torch.equal(layer.keys[1], before[3])


def test_make_prefix_resident_is_idempotent_and_refuses_foreign_caches():
    prefixes = [prefix() for _ in range(2)]
    cache = DynamicCache()  # layers created lazily
    make_prefix_resident(cache, prefixes)
    layers = list(cache.layers)
    assert [type(layer) for layer in layers] == [ParScaleDynamicLayer] * 2
    make_prefix_resident(cache, prefixes)
    assert all(a is b for a, b in zip(layers, cache.layers))
    with pytest.raises(ValueError, match="another ParScale adapter"):
        make_prefix_resident(cache, [prefix() for _ in range(2)])
    used = DynamicCache()
    used.update(torch.zeros(1, 1, 1, DIM), torch.zeros(1, 1, 1, DIM), 0)
    used.update(torch.zeros(1, 1, 1, DIM), torch.zeros(1, 1, 1, DIM), 1)
    with pytest.raises(ValueError, match="without the ParScale prefix"):
        make_prefix_resident(used, prefixes)
    assert all(type(layer) is DynamicLayer for layer in used.layers)  # unchanged
