"""Sampling, several sequences per prompt and stop conditions on the fast path (`peft_parscale.decode.fast_generate`),
against `model.generate` and against a plain sampling loop that recomputes the whole sequence at every step.

The plain loop follows the convention of `fast_generate`'s docstring in float64 with Python loops: the uniform numbers
drawn up front, temperature, top-k, top-p as "the smallest set of most probable tokens reaching top_p", and the
smallest token id whose cumulative probability exceeds u times the total. The fast path computes in float32 with other
kernels (a cache, batched and padded rows): on these models its logits differ from a recomputation without cache by
at most 2e-6 (measured). Allowing 1e-5, i.e. 1.5e-5 after the lowest temperature used (0.7), a probability moves by
at most 3e-5 in total, so each decision of the loop (top-k's k-th gap, top-p's cut, the inverse CDF) must be more than
MARGIN = 5e-5 from flipping, or the test would compare rounding noise. The loop checks it; the seeds below pass. The
float32 cumulative sums add at most 97 · 2^-24 < 6e-6 of the total (97 tokens) to that.

The fast path's cumulative sums run in chunks of `sampling.SCAN_CHUNK` (1024) tokens; the `scan_chunk` fixture also
cuts the tiny 97-token vocabulary into chunks (13 of 8, the last one padded), as Qwen2.5's 151,936 tokens are cut.
"""

import contextlib
import math

import pytest
import test_generate
import torch
from peft import get_peft_model
from reference import greedy_with_logits, left_padded_batch, randomize_adapter
from tiny_models import tiny_model, tiny_tokenizer
from torch._dynamo.utils import counters
from transformers import GenerationConfig

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig, decode, sampling
from peft_parscale.decode import causal_lm_of, fast_generate
from peft_parscale.sampling import TokenSelector, cumulative_sum, first_argmax

TRACE_ONLY = {"backend": "eager", "fullgraph": True}  # traces the step as on CUDA, without code generation
NEW_TOKENS = 8
MARGIN = 5e-5
SEED = 7
setup = test_generate.setup  # the tiny model with a random P=3, T=5 adapter, and a plain copy of its base


def plain_sample(logits: torch.Tensor, u: float, temperature: float, top_k: int, top_p: float) -> tuple[int, float]:
    """One token chosen by the documented convention, and the smallest distance of a decision from flipping."""
    z = [value / temperature for value in logits.double().tolist()]
    vocab = range(len(z))
    by_probability = sorted(vocab, key=lambda token: -z[token])
    kept, margins = set(vocab), []
    if 0 < top_k < len(z):
        kth = z[by_probability[top_k - 1]]
        kept = {token for token in kept if z[token] >= kth}
        margins.append(kth - z[by_probability[top_k]])

    def softmax(tokens):
        top = max(z[token] for token in tokens)
        weights = {token: math.exp(z[token] - top) for token in tokens}
        total = sum(weights.values())
        return {token: weight / total for token, weight in weights.items()}

    if top_p < 1.0:
        probabilities, mass, nucleus = softmax(kept), 0.0, []
        for token in (token for token in by_probability if token in kept):
            if mass >= top_p:
                margins.append(mass - top_p)
                break
            margins.append(top_p - mass)
            nucleus.append(token)
            mass += probabilities[token]
        kept = {token for token in kept if z[token] >= z[nucleus[-1]]}
    probabilities = softmax(kept)
    target, cumulative = u * sum(probabilities.values()), 0.0
    for token in vocab:
        previous, cumulative = cumulative, cumulative + probabilities.get(token, 0.0)
        if probabilities.get(token, 0.0) > 0 and cumulative > target:
            return token, min(margins + [cumulative - target, target - previous])
    raise AssertionError("no token chosen")


@pytest.fixture(params=[8, sampling.SCAN_CHUNK], ids=["13_chunks", "one_chunk"])
def scan_chunk(request, monkeypatch):
    monkeypatch.setattr(sampling, "SCAN_CHUNK", request.param)
    return request.param


def plain_sampling_loop(model, prompt: torch.Tensor, uniforms: torch.Tensor, **settings) -> torch.Tensor:
    """The new tokens of one unpadded prompt, recomputing the whole sequence without a cache at every step."""
    options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **settings}
    tokens = prompt
    for u in uniforms.tolist():
        with torch.no_grad():
            logits = model(input_ids=tokens[None], use_cache=False).logits[0, -1]
        token, margin = plain_sample(logits, u, **options)
        assert margin > MARGIN, f"a decision is within {margin:.1e} of flipping: choose another seed"
        tokens = torch.cat([tokens, torch.tensor([token])])
    return tokens[len(prompt) :]


def models(setup):
    model, base = setup
    return {"parscale": model, "base": base}


SAMPLING = {
    "temperature": {"temperature": 0.7, "top_k": 0},
    "top_k": {"top_k": 5},
    "top_p": {"top_p": 0.8, "top_k": 0},
}


@pytest.mark.parametrize("which", ["parscale", "base"])
@pytest.mark.parametrize("settings", SAMPLING.values(), ids=SAMPLING.keys())
@pytest.mark.parametrize("prompts_per_chunk", [2, 1])
@pytest.mark.parametrize("fused", [False, True], ids=["plain_products", "fused_products"])
def test_sampling_matches_the_plain_loop(setup, which, settings, scan_chunk, prompts_per_chunk, fused, monkeypatch):
    """With `fuse_projections` too (each layer's query/key/value and gate/up products run as one each)."""
    model = models(setup)[which]
    input_ids, attention_mask = left_padded_batch([6, 3])
    prompt_length = input_ids.shape[1]
    # The prefill runs each prompt once however many sequences continue it, in chunks of PREFILL_TOKENS stream tokens
    num_streams = model.peft_config["default"].P if which == "parscale" else 1
    monkeypatch.setattr(decode, "PREFILL_TOKENS", prompts_per_chunk * num_streams * prompt_length)
    with forward_input_shapes(model) as shapes:
        tokens = fast_generate(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=True,
            num_return_sequences=2,
            generator=torch.Generator().manual_seed(SEED),
            fuse_projections=fused,
            **settings,
        )
    assert (causal_lm_of(model)._parscale_fast_decoder.fused is not None) == fused  # the products asked for ran
    assert shapes[: 2 // prompts_per_chunk] == [(prompts_per_chunk, prompt_length)] * (2 // prompts_per_chunk)
    assert shapes[2 // prompts_per_chunk :] == [(4, 1)] * (NEW_TOKENS - 1)  # then one token per sequence
    # The convention: one generator draws every sequence's numbers, sequence r taking row r of a (rows, steps) draw.
    uniforms = torch.rand(4, NEW_TOKENS, generator=torch.Generator().manual_seed(SEED))
    assert tokens.shape == (4, prompt_length + NEW_TOKENS)
    for row in range(4):
        prompt = row // 2  # each prompt's sequences are consecutive rows, as in generate
        assert torch.equal(tokens[row, : input_ids.shape[1]], input_ids[prompt])
        unpadded = input_ids[prompt][attention_mask[prompt].bool()]
        expected = plain_sampling_loop(model, unpadded, uniforms[row], **settings)
        assert torch.equal(tokens[row, input_ids.shape[1] :], expected), row


def test_a_generator_per_sequence_makes_each_independent_of_its_batch(setup, scan_chunk):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 2, 4])
    settings = {"do_sample": True, "temperature": 1.3, "top_k": 10, "top_p": 0.9, "max_new_tokens": NEW_TOKENS}
    seeds = [11, 12, 13]
    batched = fast_generate(
        model, input_ids, attention_mask, generator=[torch.Generator().manual_seed(s) for s in seeds], **settings
    )
    for row, seed in enumerate(seeds):
        prompt = input_ids[row][attention_mask[row].bool()]
        alone = fast_generate(model, prompt[None], generator=[torch.Generator().manual_seed(seed)], **settings)
        assert torch.equal(batched[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])
        uniforms = torch.rand(NEW_TOKENS, generator=torch.Generator().manual_seed(seed))
        sampling = {name: settings[name] for name in ("temperature", "top_k", "top_p")}
        assert torch.equal(alone[0, -NEW_TOKENS:], plain_sampling_loop(model, prompt, uniforms, **sampling))


def test_the_compiled_sampling_step_is_one_graph_and_samples_the_same(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([5, 2, 4])
    settings = {"do_sample": True, "temperature": 1.3, "top_k": 10, "top_p": 0.9, "max_new_tokens": NEW_TOKENS}
    uncompiled = fast_generate(model, input_ids, attention_mask, generator=torch.Generator().manual_seed(3), **settings)
    torch._dynamo.reset()
    counters.clear()
    compiled = fast_generate(
        model,
        input_ids,
        attention_mask,
        generator=torch.Generator().manual_seed(3),
        compile=True,
        compile_options=TRACE_ONLY,
        **settings,
    )
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, uncompiled)


def test_a_step_compiled_for_dynamic_shapes_is_traced_once_for_every_batch_shape(setup):
    """What HumanEval on the fast path relies on: batches of different sizes and prompt lengths, one compilation."""
    model, _ = setup
    settings = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 0, "max_new_tokens": 6}
    torch._dynamo.reset()
    counters.clear()
    for lengths in ([5, 2, 4], [6, 3], [7, 7, 2, 3]):
        input_ids, attention_mask = left_padded_batch(lengths)
        options = {**TRACE_ONLY, "dynamic": True}
        compiled = fast_generate(
            model,
            input_ids,
            attention_mask,
            generator=torch.Generator().manual_seed(5),
            compile=True,
            compile_options=options,
            **settings,
        )
        uncompiled = fast_generate(
            model, input_ids, attention_mask, generator=torch.Generator().manual_seed(5), **settings
        )
        assert torch.equal(compiled, uncompiled)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("length", [1, 8, 9, 97, 3000])
def test_the_chunked_cumulative_sum_is_a_cumulative_sum(monkeypatch, length):
    monkeypatch.setattr(sampling, "SCAN_CHUNK", 8)
    values = torch.randn(3, length, generator=torch.Generator().manual_seed(0))
    expected = values.double().cumsum(-1)
    # Entry i is a float32 sum of i + 1 terms in some order (within its chunk, then the chunk totals before it): its
    # error is at most (i + 1) · 2^-24 · (|x_0| + ... + |x_i|), the bound of any order of summation.
    steps = torch.arange(1, length + 1, dtype=torch.float64)
    bound = steps * 2**-24 * values.double().abs().cumsum(-1)
    assert ((cumulative_sum(values).double() - expected).abs() <= bound).all()


def first_largest(row: list) -> int:
    """The index of the first largest entry of `row`, found by reading it."""
    return row.index(max(row))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("length", [1, 8, 9, 97, 3000])
def test_the_chunked_argmax_gives_each_rows_first_largest(monkeypatch, length, dtype):
    """Entries drawn from 0..4, so every row is full of ties; a row of equal entries (-inf for floats); a row whose
    largest is its last entry, in the padded last chunk; and a row of negative entries."""
    monkeypatch.setattr(sampling, "SCAN_CHUNK", 8)
    values = torch.randint(0, 5, (4, length), generator=torch.Generator().manual_seed(SEED)).to(dtype)
    values[1] = float("-inf") if dtype.is_floating_point else 3
    values[2, -1] = 9
    values[3] -= 10  # every entry below zero, so padding with zeros instead of the lowest value would be chosen
    expected = [first_largest(row) for row in values.tolist()]
    assert first_argmax(values).tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_the_chunked_argmax_compiles_to_the_first_largest(monkeypatch, dtype):
    """Through inductor's code generation on CPU, as the decode step runs it (ties and the padded chunk as above)."""
    monkeypatch.setattr(sampling, "SCAN_CHUNK", 8)
    values = torch.randint(0, 5, (3, 97), generator=torch.Generator().manual_seed(SEED)).to(dtype)
    values[1, -1] = 9
    torch._dynamo.reset()
    assert torch.compile(first_argmax, fullgraph=True)(values).tolist() == [first_largest(r) for r in values.tolist()]


def test_the_token_choice_compiles_with_inductor_and_follows_the_convention():
    """Inductor's code generation on CPU, not only tracing, over a vocabulary of three chunks of 1024 tokens.

    On CPU inductor runs cumulative sums through ATen (its C++ backend has no scans), so the CUDA-only failure that
    the chunks avoid cannot happen here; `python -m benchmarks.run --suites selector` checks it on a GPU. The logits
    are the inputs themselves, and top-k 50 leaves 50 non-zero probabilities, so the float32 sums are within
    50 · 2^-24 < 3e-6 of float64 and every decision more than MARGIN from flipping is the plain loop's.
    """
    settings = {"temperature": 0.7, "top_k": 50, "top_p": 0.9}
    logits = 3 * torch.randn(6, 3000, generator=torch.Generator().manual_seed(SEED))
    uniforms = torch.rand(6, generator=torch.Generator().manual_seed(SEED))
    torch._dynamo.reset()
    compiled = torch.compile(TokenSelector(do_sample=True, **settings), fullgraph=True)
    tokens = compiled(logits, uniforms)
    for row in range(6):
        token, margin = plain_sample(logits[row], float(uniforms[row]), **settings)
        assert margin > MARGIN, f"a decision is within {margin:.1e} of flipping: choose another seed"
        assert int(tokens[row]) == token, row


GREEDY_EQUIVALENTS = {
    "greedy": {"do_sample": False},
    "top_k=1": {"do_sample": True, "top_k": 1},
    "temperature=1e-4": {"do_sample": True, "temperature": 1e-4, "top_k": 0},
}


@pytest.mark.parametrize("settings", GREEDY_EQUIVALENTS.values(), ids=GREEDY_EQUIVALENTS.keys())
def test_settings_without_randomness_give_generate_s_greedy_tokens(setup, settings):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 3, 5])
    greedy = greedy_with_logits(model, input_ids, attention_mask, NEW_TOKENS)
    # At temperature 1e-4 the tokens other than the argmax hold at most 96 · exp(-gap / 1e-4) of the probability:
    # below 1e-40 with these gaps (> 1e-2), and less than any of the uniform numbers drawn (seed 0), so the inverse
    # CDF lands on the argmax.
    gaps = torch.stack(greedy.logits).topk(2, dim=-1).values.diff(dim=-1).abs()
    assert gaps.min() > 1e-2
    assert torch.rand(3, NEW_TOKENS, generator=torch.Generator().manual_seed(0)).min() > 1e-40
    tokens = fast_generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=NEW_TOKENS,
        generator=torch.Generator().manual_seed(0),
        **settings,
    )
    assert torch.equal(tokens, greedy.sequences)


def test_several_sequences_per_prompt_like_generate(setup):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 3])
    settings = {"do_sample": True, "top_k": 1, "num_return_sequences": 3, "max_new_tokens": NEW_TOKENS}
    with torch.no_grad():
        expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=0, **settings)
    tokens = fast_generate(model, input_ids, attention_mask, **settings)
    assert tokens.shape[0] == 6
    assert torch.equal(tokens, expected)


@pytest.fixture(scope="module")
def text_model():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    model = get_peft_model(tiny_model(vocab_size=len(tokenizer)), ParScaleConfig(P=3, prefix_length=4))
    randomize_adapter(model, scale=0.3)
    return model.eval(), tokenizer


@contextlib.contextmanager
def forward_input_shapes(model):
    """The shape of `input_ids` in each forward pass of `model`'s causal LM inside the block."""
    shapes = []
    handle = causal_lm_of(model).register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        yield shapes
    finally:
        handle.remove()


@pytest.mark.parametrize("with_eos", [True, False], ids=["eos_and_stop_strings", "stop_strings_only"])
@pytest.mark.parametrize("check_every", [4, 32])
def test_end_of_sequence_and_stop_strings_like_generate(text_model, with_eos, check_every):
    model, tokenizer = text_model
    prompts = ["def f(x):\n", "x = 1", "import os\nprint("]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    max_new_tokens = 16

    def generate(**settings):
        with torch.no_grad():
            return model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, tokenizer=tokenizer, **settings
            )

    free_run = generate(pad_token_id=tokenizer.pad_token_id)[:, inputs.input_ids.shape[1] :]
    texts = [tokenizer.decode(row) for row in free_run]
    # Row 0 stops inside its text, row 1 at its first token (a stop string that begins in the prompt), row 2 at an
    # end-of-sequence token (one of two ids), or without one at a third stop string (then generate pads nothing).
    stop_strings = [texts[0][3:5], prompts[1][-1] + texts[1][0]]
    if with_eos:
        settings = {"eos_token_id": [int(free_run[2, 6]), tokenizer.pad_token_id + 1], "pad_token_id": 0}
    else:
        settings, stop_strings = {}, [*stop_strings, texts[2][8:10]]
    expected = generate(stop_strings=stop_strings, **settings)
    with forward_input_shapes(model) as calls:
        tokens = fast_generate(
            model,
            **inputs,
            max_new_tokens=max_new_tokens,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
            check_every=check_every,
            **settings,
        )
    assert torch.equal(tokens, expected)
    assert tokens.shape[1] < inputs.input_ids.shape[1] + max_new_tokens  # every row ended early
    if check_every == 4:  # and the loop stopped at a checkpoint instead of running to the end
        assert len(calls) < max_new_tokens


BAD_SETTINGS = {
    "beam search": ({"num_beams": 2}, "beam search"),
    "repetition penalty": ({"repetition_penalty": 1.2}, "repetition_penalty"),
    "min_new_tokens": ({"min_new_tokens": 2}, "min_new_tokens"),
    "no_repeat_ngram_size": ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
    "min_p": ({"do_sample": True, "min_p": 0.1}, "min_p"),
    "scores": ({"return_dict_in_generate": True}, "return_dict_in_generate"),
    "zero temperature": ({"do_sample": True, "temperature": 0.0}, "temperature"),
    "greedy with several sequences": ({"num_return_sequences": 2}, "num_return_sequences"),
    "stop strings without tokenizer": ({"stop_strings": ["ab"]}, "tokenizer"),
    "too few generators": ({"do_sample": True, "generator": [torch.Generator()]}, "one per returned sequence"),
    "no new tokens": ({"max_new_tokens": 0}, "max_new_tokens"),
    "unknown setting": ({"output_attention": True}, "Unknown generation settings"),
}


@pytest.mark.parametrize("settings, message", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_settings_raise_before_running(setup, settings, message):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 3])
    with forward_input_shapes(model) as calls, pytest.raises(ValueError, match=message):
        fast_generate(model, input_ids, attention_mask, **{"max_new_tokens": 4, **settings})
    assert not calls


def test_the_checkpoint_s_generation_config_fills_unset_values(setup, monkeypatch):
    model, _ = setup
    input_ids, attention_mask = left_padded_batch([6, 3])
    with torch.no_grad():
        greedy = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    checkpoint = causal_lm_of(model).generation_config
    for name, value in {"do_sample": True, "top_k": 1, "max_new_tokens": 5, "pad_token_id": 0}.items():
        monkeypatch.setattr(checkpoint, name, value)
    assert torch.equal(fast_generate(model, input_ids, attention_mask), greedy)  # top-k 1 sampling is greedy
    explicit = fast_generate(model, input_ids, attention_mask, GenerationConfig(max_new_tokens=3))
    assert torch.equal(explicit, greedy[:, : input_ids.shape[1] + 3])
    monkeypatch.setattr(checkpoint, "repetition_penalty", 1.1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        fast_generate(model, input_ids, attention_mask)
    overridden = fast_generate(model, input_ids, attention_mask, GenerationConfig(repetition_penalty=1.0))
    assert torch.equal(overridden, greedy)
