"""The fast decode path (`peft_parscale.decode.greedy_generate`, and `generate` with a compiled static cache) against
the independent reference's own greedy loop and against plain recomputation.

No GPU here: the compiled variants use torch.compile's "eager" backend, which traces the step exactly as on CUDA
(`fullgraph=True` fails on any graph break) but runs it without code generation, so these tests stay fast and need no
C++ compiler. Inductor and CUDA graphs themselves were checked on an H100 (BENCHMARKS.md).
"""

import pytest
import test_architectures
import test_fused_projections
import test_generate
import test_sampling
import torch
from reference import adapter_tensors, left_padded_batch, reference_greedy, relative_error
from test_generate import generate, greedy_without_cache
from tiny_models import ARCHITECTURES, SLIDING
from torch._dynamo.utils import counters
from transformers import CompileConfig

import peft_parscale  # noqa: F401
from peft_parscale import decode
from peft_parscale.decode import causal_lm_of, fast_decoder, fast_generate, greedy_generate

TRACE_ONLY = {"backend": "eager", "fullgraph": True}
NEW_TOKENS = 7
setup = test_generate.setup  # the same tiny model with a random P=3, T=5 adapter, and a copy of its base


@pytest.mark.parametrize("compile_options", [None, TRACE_ONLY], ids=["uncompiled", "compiled"])
def test_fast_path_matches_the_reference_greedy_loop(setup, compile_options):
    model, reference = setup
    adapter = adapter_tensors(model)
    input_ids, attention_mask = left_padded_batch([6, 3])
    tokens = greedy_generate(
        model,
        input_ids,
        attention_mask,
        NEW_TOKENS,
        compile=compile_options is not None,
        compile_options=compile_options,
    )
    assert tokens.shape == (2, input_ids.shape[1] + NEW_TOKENS)
    for row in range(2):
        expected = reference_greedy(reference, input_ids[row][attention_mask[row].bool()], adapter, NEW_TOKENS)
        assert torch.equal(tokens[row, -NEW_TOKENS:], expected[-NEW_TOKENS:])
        assert torch.equal(tokens[row, : input_ids.shape[1]], input_ids[row])


def test_fast_path_equals_recomputation_for_several_shapes(setup):
    model, _ = setup
    for lengths, steps in (([5, 2, 4], 9), ([3], 4), ([6, 6], 1)):
        input_ids, attention_mask = left_padded_batch(lengths)
        expected = greedy_without_cache(model, input_ids, attention_mask, steps)
        assert torch.equal(greedy_generate(model, input_ids, attention_mask, steps, compile=False), expected)


def test_compiled_step_is_one_graph_and_is_reused(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 2, 4])
    torch._dynamo.reset()
    counters.clear()
    # Same batch size and total length, different numbers of new tokens: the cached decoder is reused and its
    # compiled step must not be compiled again (each step's input keeps the same strides).
    decoder = fast_decoder(model, 3, input_ids.shape[1] + 8, compile=True, compile_options=TRACE_ONLY)
    decoder.run(input_ids, attention_mask, 3)
    tokens = greedy_generate(model, input_ids, attention_mask, 8, compile=True, compile_options=TRACE_ONLY)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(tokens, greedy_without_cache(model, input_ids, attention_mask, 8))


def test_prefix_is_written_once_and_never_moves(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([4, 4])
    decoder = fast_decoder(model, 2, input_ids.shape[1] + 6)
    decoder.run(input_ids, attention_mask, 6)
    layer = decoder.cache.layers[0]
    storage = layer.keys.data_ptr()
    decoder.run(input_ids, attention_mask, 6)  # a second generation resets the cache in place
    prefix_k = model.base_model.model.model.layers[0].self_attn.parscale_prefix_k["default"]
    assert layer.keys.data_ptr() == storage  # the static cache is updated in place, never copied
    assert layer.keys.shape[2] == 5 + input_ids.shape[1] + 6  # T prefix slots in front of the generation
    for stream in range(3):
        for sequence in range(2):
            assert torch.equal(layer.keys[stream * 2 + sequence, :, :5], prefix_k[stream])


def test_end_of_sequence_is_handled_like_generate(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 3, 5])
    free_run = greedy_generate(model, input_ids, attention_mask, NEW_TOKENS, compile=False)
    eos = int(free_run[0, input_ids.shape[1] + 2])  # the third new token of the first sequence
    expected = generate(model, input_ids, attention_mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    tokens = greedy_generate(model, input_ids, attention_mask, NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(tokens, expected)
    assert (tokens[0, input_ids.shape[1] + 3 :] == 0).all()


def test_disabled_adapter_gives_the_base_model(setup):
    model, reference = setup
    input_ids, attention_mask = left_padded_batch([5, 3])
    with model.disable_adapter():
        tokens = greedy_generate(model, input_ids, attention_mask, NEW_TOKENS, compile=False)
    expected = greedy_without_cache(reference, input_ids, attention_mask, NEW_TOKENS)
    assert torch.equal(tokens, expected)


def test_generate_compiles_the_static_cache_step_into_one_graph(setup):
    """What `generate(..., cache_implementation="static")` compiles on CUDA: ParScale's hooks trace without breaks."""
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 3, 5])
    compile_config = CompileConfig(**TRACE_ONLY)
    compile_config._compile_all_devices = True  # what transformers offers to compile off CUDA, for tests
    torch._dynamo.reset()
    counters.clear()
    tokens = generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=NEW_TOKENS,
        cache_implementation="static",
        compile_config=compile_config,
    )
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(tokens, greedy_without_cache(model, input_ids, attention_mask, NEW_TOKENS))


@pytest.mark.parametrize("name", [name for name in ARCHITECTURES if name not in SLIDING])
def test_every_architecture_s_prompts_run_once_for_several_sequences(tokenizer_dir, name, monkeypatch):
    # The prefill runs each distinct prompt once through a dynamic cache, two prompts per chunk here (so the last chunk
    # is partial), and copies its rows into the static cache once per returned sequence (`cache.copy_prompt_rows`);
    # every later step reads those rows. Top-k 1 sampling is greedy search, so each copy must continue as greedy
    # recomputation does, with every decode step's logits within test_architectures.TOLERANCE of recomputation's (a
    # wrong or missing cache row moves them by 1e-2 to 1, even where the argmax hides it). Sliding-window layers keep
    # the plain prefill (test_architectures.py).
    model, _ = test_architectures.build(tokenizer_dir, name, "sdpa", "static cache")
    input_ids, attention_mask = test_architectures.left_padded_batch([6, 3, 5])
    num_streams = model.peft_config["default"].P
    monkeypatch.setattr(decode, "PREFILL_TOKENS", 2 * num_streams * input_ids.shape[1])
    expected, expected_logits = test_architectures.recompute_greedy(model, input_ids, attention_mask, NEW_TOKENS)
    step_logits = []

    def keep_step_logits(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] == 1:  # a decode step, not the prefill
            step_logits.append(output.logits[:, -1])

    hook = causal_lm_of(model).register_forward_hook(keep_step_logits, with_kwargs=True)
    try:
        tokens = fast_generate(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=True,
            top_k=1,
            num_return_sequences=2,
            eos_token_id=[],
            compile=False,
        )
    finally:
        hook.remove()
    assert torch.equal(tokens, expected.repeat_interleave(2, dim=0))
    logits = torch.stack(step_logits, dim=1)  # (rows, NEW_TOKENS - 1, vocabulary): every step after the prefill
    error = relative_error(logits, expected_logits[:, 1:].repeat_interleave(2, dim=0))
    assert error <= test_architectures.TOLERANCE


def test_a_prompt_repeated_anywhere_in_the_batch_runs_once(setup):
    # HumanEval's evaluation puts a problem's samples, and the rows that fill its last batch, in rows of their own:
    # the prefill finds the distinct prompts wherever they are.
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 3])
    input_ids, attention_mask = input_ids[[0, 1, 0]], attention_mask[[0, 1, 0]]
    with test_sampling.forward_input_shapes(model) as shapes:
        tokens = greedy_generate(model, input_ids, attention_mask, NEW_TOKENS, compile=False)
    assert shapes[0] == (2, input_ids.shape[1])
    assert torch.equal(tokens, greedy_without_cache(model, input_ids, attention_mask, NEW_TOKENS))


def test_a_model_cast_after_decoding_gets_a_decoder_of_its_own_dtype():
    """The decoder kept on the model (its static cache) is rebuilt when the model is cast or moved, so the next
    generation is the cast model's, as recomputation gives it."""
    model = test_fused_projections.parscale_model()
    input_ids, attention_mask = left_padded_batch([5, 3])
    greedy_generate(model, input_ids, attention_mask, NEW_TOKENS, compile=False)
    model.double()
    tokens = greedy_generate(model, input_ids, attention_mask, NEW_TOKENS, compile=False)
    assert causal_lm_of(model)._parscale_fast_decoder.cache.layers[0].keys.dtype == torch.float64
    assert torch.equal(tokens, greedy_without_cache(model, input_ids, attention_mask, NEW_TOKENS))


def test_compiled_prefill_gives_the_same_tokens_and_is_one_graph(setup, monkeypatch):
    """With `prefill_compile_options` the prompts' forward pass is compiled with `fullgraph` (dynamo traces the
    ParScale model into a dynamic cache without a break) and the tokens are recomputation's. Chunks of two prompts
    (`PREFILL_TOKENS` lowered) give one chunk shape, compiled once for two generations."""
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 2, 4, 3])
    expected = greedy_without_cache(model, input_ids, attention_mask, NEW_TOKENS)
    monkeypatch.setattr(decode, "PREFILL_TOKENS", 2 * 3 * input_ids.shape[1])  # two prompts of P=3 streams a chunk
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        tokens = greedy_generate(
            model, input_ids, attention_mask, NEW_TOKENS, compile=False, prefill_compile_options=TRACE_ONLY
        )
        assert torch.equal(tokens, expected)
    assert counters["stats"]["unique_graphs"] == 1
