"""The fast path's decode attention (`peft_parscale.decode_attention`): grouped key/value heads attended to without
copies, against attention written out head by head, and switched on only inside the fast path's calls."""

import math

import pytest
import test_generate
import torch
from reference import adapter_tensors, left_padded_batch, reference_greedy
from torch import nn
from torch.nn.attention import SDPBackend
from torch.nn.functional import scaled_dot_product_attention

from peft_parscale import decode_attention
from peft_parscale.decode import greedy_generate
from peft_parscale.decode_attention import grouped_query_decoding, packed_gqa_sdpa

setup = test_generate.setup  # the tiny Qwen2 (6 query heads, 2 key/value heads) with a random P=3, T=5 adapter
NEW_TOKENS = 5
# float32 attention over at most 11 keys of values below 4: each output is a convex combination computed in a
# different order by the two sides, so they differ by a few ulps of values below 4, < 1e-5 with a wide margin
TOLERANCE = 1e-5


class GroupedAttention(nn.Module):
    """What `packed_gqa_sdpa` reads of an attention module."""

    num_key_value_groups = 3


def attention_head_by_head(query, key, value, allowed, scale):
    """Query head h attends to key/value head h // groups over the allowed keys: softmax(q·k·scale) v, in loops."""
    batch, heads, _, _ = query.shape
    groups = heads // key.shape[1]
    output = torch.zeros(batch, 1, heads, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            keys = [j for j in range(key.shape[2]) if allowed[b, j]]
            scores = [float(query[b, h, 0] @ key[b, h // groups, j]) * scale for j in keys]
            top = max(scores)
            weights = [math.exp(score - top) for score in scores]
            for weight, j in zip(weights, keys):
                output[b, 0, h] += weight / sum(weights) * value[b, h // groups, j].double()
    return output


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_one_query_attends_to_its_group_s_key_value_head(mask_kind):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(shape, generator=generator) for shape in [(2, 6, 1, 8), (2, 2, 11, 8), (2, 2, 11, 5)]
    )
    allowed = torch.ones(2, 11, dtype=torch.bool)
    allowed[0, :3] = False  # left padding
    allowed[1, 9:] = False  # cache slots not written yet
    mask = {
        "bool": allowed[:, None, None, :],
        "additive": torch.zeros(2, 1, 1, 11).masked_fill(~allowed[:, None, None, :], torch.finfo(torch.float32).min),
        "none": None,
    }[mask_kind]
    if mask is None:
        allowed = torch.ones_like(allowed)
    output, weights = packed_gqa_sdpa(GroupedAttention(), query, key, value, mask, scaling=0.3)
    assert weights is None and output.shape == (2, 1, 6, 5) and output.is_contiguous()
    expected = attention_head_by_head(query, key, value, allowed, 0.3)
    assert (output.double() - expected).abs().max().item() <= TOLERANCE


def count_attention_calls(monkeypatch) -> dict[str, int]:
    """Count the decode-attention calls that take the packed branch and those passed on to transformers' sdpa."""
    calls = {"packed": 0, "transformers": 0}
    plain_sdpa = decode_attention.scaled_dot_product_attention
    transformers_sdpa = decode_attention.sdpa_attention_forward

    def packed(*args, **kwargs):
        calls["packed"] += 1
        return plain_sdpa(*args, **kwargs)

    def passed_on(*args, **kwargs):
        calls["transformers"] += 1
        return transformers_sdpa(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "scaled_dot_product_attention", packed)
    monkeypatch.setattr(decode_attention, "sdpa_attention_forward", passed_on)
    return calls


def test_decode_steps_run_packed_and_give_the_reference_s_tokens(setup, monkeypatch):
    model, reference = setup
    config = model.get_base_model().config
    assert config._attn_implementation == "sdpa" and config.num_attention_heads // config.num_key_value_heads == 3
    adapter = adapter_tensors(model)
    input_ids, attention_mask = left_padded_batch([6, 3])
    calls = count_attention_calls(monkeypatch)
    tokens = greedy_generate(model, input_ids, attention_mask, NEW_TOKENS, compile=False)
    for row in range(2):
        expected = reference_greedy(reference, input_ids[row][attention_mask[row].bool()], adapter, NEW_TOKENS)
        assert torch.equal(tokens[row, -NEW_TOKENS:], expected[-NEW_TOKENS:])
    # the prompt goes to transformers' sdpa once per layer; every later step of every layer is packed
    layers = config.num_hidden_layers
    assert calls == {"transformers": layers, "packed": layers * (NEW_TOKENS - 1)}
    assert config._attn_implementation == "sdpa"  # switched back after the call


def test_the_switch_is_undone_on_error_and_skipped_for_other_implementations(setup):
    model, _ = setup
    config = model.get_base_model().config
    with pytest.raises(RuntimeError, match="inside"), grouped_query_decoding(model.get_base_model()):
        assert config._attn_implementation == decode_attention.PACKED_GQA_SDPA
        raise RuntimeError("inside")
    assert config._attn_implementation == "sdpa"
    config._attn_implementation = "eager"
    try:
        with grouped_query_decoding(model.get_base_model()):
            assert config._attn_implementation == "eager"  # eager attention is left as it is
    finally:
        config._attn_implementation = "sdpa"


def test_a_kernel_choice_is_kept_by_code_compiled_after_another_choice(tmp_path, monkeypatch):
    """`compile_safe_sdpa_kernel`: attention compiled by inductor under sdpa's CPU flash kernel, then compiled afresh
    under its math kernel with the same compile cache, runs the math kernel. With torch's plain `sdpa_kernel` the
    second compilation comes back from the cache and runs flash (pytorch/pytorch#185449; so on torch 2.11 to 2.13)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # one cache for both, and none outside the test

    def attend(query, key, value):
        return scaled_dot_product_attention(query, key, value, is_causal=True)

    inputs = [torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]

    def runs_flash(backend: SDPBackend) -> bool:
        torch._dynamo.reset()  # a fresh compilation, as in a new process; only the on-disk cache is shared
        with decode_attention.compile_safe_sdpa_kernel([backend]):
            compiled = torch.compile(attend)
            compiled(*inputs)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                compiled(*inputs)
        return any("flash_attention" in event.name for event in profile.events())

    assert runs_flash(SDPBackend.FLASH_ATTENTION)  # flash is reached at all, so the next line can fail
    assert not runs_flash(SDPBackend.MATH)
    torch._dynamo.reset()
