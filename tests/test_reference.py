"""The package's logits against the plain reference in `reference.py`, for every supported architecture."""

import copy

import pytest
import torch
from peft import get_peft_model
from reference import (
    adapter_tensors,
    assert_logits_match,
    left_padded_batch,
    positions_from_mask,
    randomize_adapter,
    reference_logits,
)
from tiny_models import REFERENCE_ARCHITECTURES, VOCAB, tiny_model

import peft_parscale  # noqa: F401  (registers the PEFT type)
from peft_parscale import ParScaleConfig

# Both sides run in float64 and are compared with `assert_logits_match` (its bound is derived in reference.py). In
# float32 the two differ by up to 1.1e-5 on these logits of magnitude ~3, and by more on a loaded CPU, whose thread
# scheduling changes float32 accumulation order: no fixed float32 bound is both tight and safe.


def build(architecture, attn_implementation, P=3, prefix_length=5, smoothing=0.1, dtype=torch.float64):
    base = tiny_model(architecture, attn_implementation, dtype=dtype)
    reference = copy.deepcopy(base).double()
    model = get_peft_model(base, ParScaleConfig(P=P, prefix_length=prefix_length, smoothing=smoothing))
    randomize_adapter(model)
    return model, reference, adapter_tensors(model)


def expected_rows(reference, adapter, input_ids, attention_mask):
    """Reference logits of each row's real tokens, computed without any padding."""
    return [reference_logits(reference, ids[mask.bool()], adapter) for ids, mask in zip(input_ids, attention_mask)]


def check_left_padded_batch(architecture, attn_implementation, lengths, dtype=torch.float64):
    model, reference, adapter = build(architecture, attn_implementation, dtype=dtype)
    input_ids, attention_mask = left_padded_batch(lengths)
    position_ids = positions_from_mask(attention_mask)
    expected = expected_rows(reference, adapter, input_ids, attention_mask)
    for use_cache in (False, True):  # the two places the prefix lives: in front of each call, or in the cache
        with torch.no_grad():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
            ).logits
        for row, mask in enumerate(attention_mask):
            assert_logits_match(logits[row][mask.bool()], expected[row])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", list(REFERENCE_ARCHITECTURES))
def test_left_padded_logits_match_reference(architecture, attn_implementation):
    check_left_padded_batch(architecture, attn_implementation, [7, 3, 5])


def test_flex_attention_matches_reference():
    # Flex attention compiles on first use (slow on CPU): one architecture, in float32 (flex has no float64 on CPU).
    # On CPU, padded generation with flex fails to compile in torch 2.13 for the plain base model too, so flex
    # generation is not tested here.
    check_left_padded_batch("qwen2", "flex_attention", [6, 3], dtype=torch.float32)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", list(REFERENCE_ARCHITECTURES))
def test_unpadded_logits_match_reference(architecture, attn_implementation):
    model, reference, adapter = build(architecture, attn_implementation)
    input_ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    for row in range(2):
        assert_logits_match(logits[row], reference_logits(reference, input_ids[row], adapter))


def test_training_mode_with_gradient_checkpointing_matches_reference():
    # Gradient checkpointing drops the cache inside each layer: the prefix must come from the layer itself.
    model, reference, adapter = build("qwen2", "sdpa")
    model.gradient_checkpointing_enable()
    model.train()
    input_ids, attention_mask = left_padded_batch([6, 4])
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)
    ).logits
    for row, expected in enumerate(expected_rows(reference, adapter, input_ids, attention_mask)):
        assert_logits_match(logits[row][attention_mask[row].bool()], expected.detach())


def test_packed_sequences_stay_separate():
    # Padding-free batches (TRL's packing): sequences concatenated in one row, position_ids restarting at 0.
    model, reference, adapter = build("llama", "sdpa")
    first, second = torch.randint(1, VOCAB, (5,)), torch.randint(1, VOCAB, (4,))
    packed = torch.cat([first, second])[None]
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        logits = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits[0]
    assert_logits_match(logits[:5], reference_logits(reference, first, adapter))
    assert_logits_match(logits[5:], reference_logits(reference, second, adapter))


def test_single_stream_is_prefix_only():
    model, reference, adapter = build("qwen2", "sdpa", P=1)
    assert adapter["aggregator"] is None
    input_ids = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0]
    assert_logits_match(logits, reference_logits(reference, input_ids[0], adapter))


def test_reference_detects_a_wrong_stream_order():
    # Guard on the reference itself: swapping two streams' prefixes must change its output.
    _, reference, adapter = build("qwen2", "sdpa")
    tokens = torch.randint(1, VOCAB, (5,))
    swapped = {**adapter, "prefix_k": [k[[1, 0, 2]] for k in adapter["prefix_k"]]}
    assert (
        reference_logits(reference, tokens, adapter) - reference_logits(reference, tokens, swapped)
    ).abs().max() > 1e-3


@pytest.mark.parametrize("architecture", list(REFERENCE_ARCHITECTURES))
def test_disabled_adapter_is_the_base_model_bitwise(architecture):
    model, reference, _ = build(architecture, "sdpa")
    input_ids, attention_mask = left_padded_batch([6, 3])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        with model.disable_adapter():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        active = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(logits, expected)
    assert not torch.allclose(active, expected)
