"""Generation through the normal `model.generate`, checked against recomputation without a cache."""

import copy

import pytest
import torch
from peft import get_peft_model
from reference import adapter_tensors, left_padded_batch, positions_from_mask, randomize_adapter, reference_greedy
from tiny_models import tiny_model

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def setup():
    base = tiny_model("qwen2", "sdpa")
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ParScaleConfig(P=3, prefix_length=5))
    randomize_adapter(model)
    model.eval()
    return model, reference


def greedy_without_cache(model, input_ids, attention_mask, steps):
    """Recompute the whole sequence at every step, no cache: the slow, obviously right way."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask),
                use_cache=False,
            ).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return input_ids


def generate(model, input_ids, attention_mask, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_greedy_with_cache_equals_recomputation(setup, cache_implementation):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 3, 5])
    expected = greedy_without_cache(model, input_ids, attention_mask, NEW_TOKENS)
    tokens = generate(model, input_ids, attention_mask, cache_implementation=cache_implementation)
    assert torch.equal(tokens, expected)


def test_greedy_matches_the_reference_and_ignores_padding(setup):
    model, reference = setup
    adapter = adapter_tensors(model)
    input_ids, attention_mask = left_padded_batch([6, 3])
    batched = generate(model, input_ids, attention_mask)
    for row in range(2):
        tokens = input_ids[row][attention_mask[row].bool()]
        alone = generate(model, tokens[None], torch.ones_like(tokens)[None])[0]
        tokens = reference_greedy(reference, tokens, adapter, NEW_TOKENS)
        assert torch.equal(alone, tokens)
        assert torch.equal(batched[row, -NEW_TOKENS:], tokens[-NEW_TOKENS:])


def test_static_cache_equals_dynamic_cache(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 2, 4])
    dynamic = generate(model, input_ids, attention_mask, max_new_tokens=10)
    static = generate(model, input_ids, attention_mask, max_new_tokens=10, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_beam_search_with_cache_equals_without(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 3])
    options = {"num_beams": 3, "num_return_sequences": 2}
    with_cache = generate(model, input_ids, attention_mask, **options)
    without_cache = generate(model, input_ids, attention_mask, use_cache=False, **options)
    assert with_cache.shape == (4, input_ids.shape[1] + NEW_TOKENS)
    assert torch.equal(with_cache, without_cache)


def test_sampling_with_cache_equals_without(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 3])
    options = {"do_sample": True, "top_k": 0, "num_return_sequences": 3}
    torch.manual_seed(0)
    with_cache = generate(model, input_ids, attention_mask, **options)
    torch.manual_seed(0)
    without_cache = generate(model, input_ids, attention_mask, use_cache=False, **options)
    assert with_cache.shape[0] == 6
    assert torch.equal(with_cache, without_cache)


def test_prefix_stays_resident_in_the_cache(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([4, 4])
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    layer = output.past_key_values.layers[0]
    prefix_k = model.base_model.model.model.layers[0].self_attn.parscale_prefix_k["default"]
    assert layer.keys.shape == (3 * 2, 2, 5 + 4, prefix_k.shape[-1])  # P·B rows, T prefix slots + 4 tokens
    for stream in range(3):
        for sequence in range(2):
            assert torch.equal(layer.keys[stream * 2 + sequence, :, :5], prefix_k[stream])
    assert output.past_key_values.get_seq_length() == 5 + 4  # the prefix counts as cached tokens


def test_a_cache_filled_without_the_prefix_is_refused(setup):
    model, reference = setup
    input_ids, _ = left_padded_batch([4])
    with torch.no_grad():
        cache = reference(input_ids=input_ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="without the ParScale prefix"):
            model(input_ids=input_ids[:, -1:], past_key_values=cache)


def test_a_user_supplied_empty_cache_works(setup):
    from transformers import DynamicCache

    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 3])
    expected = generate(model, input_ids, attention_mask)
    assert torch.equal(generate(model, input_ids, attention_mask, past_key_values=DynamicCache()), expected)


def test_continuing_from_a_returned_cache_is_refused(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 3])
    first = generate(model, input_ids, attention_mask, return_dict_in_generate=True)
    mask = torch.cat([attention_mask, torch.ones(2, NEW_TOKENS, dtype=torch.long)], dim=1)
    with pytest.raises(ValueError, match="Continuing generation"):
        generate(model, first.sequences, mask, past_key_values=first.past_key_values)


def test_custom_4d_masks_are_refused(setup):
    model, _ = setup
    input_ids = torch.randint(1, 50, (2, 4))
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="4D"):
        model(input_ids=input_ids, attention_mask=mask)


def test_a_copied_model_generates_like_the_original(setup):
    model, _ = setup
    copied = copy.deepcopy(model)
    input_ids, attention_mask = left_padded_batch([5, 3])
    for cache_implementation in ("dynamic", "static"):
        expected = generate(model, input_ids, attention_mask, cache_implementation=cache_implementation)
        assert torch.equal(
            generate(copied, input_ids, attention_mask, cache_implementation=cache_implementation), expected
        )


def test_generating_from_inputs_embeds_equals_from_input_ids(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 4])
    expected = generate(model, input_ids, attention_mask)[:, input_ids.shape[1] :]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        tokens = model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    assert torch.equal(tokens, expected)
