"""Every architecture of the README's support table (`tests/tiny_models.py`), with sdpa and eager attention.

For each one, a fresh text-initialised adapter equals an explicit oracle written here (the plain transformers model
run P times over [text_p ; x], the paper's aggregation, the LM head), with and without a cache, on a left-padded
batch of sequences shorter than any sliding window; training gives gradients to the ParScale weights only; greedy
generation with a dynamic and a static cache equals recomputation without a cache. Models with sliding-window layers
are also run past the window against a plain reference attention written here (the prefix visible to every query,
the window on real tokens), and generate past it.

Each test's `support` mark says which cell of the support table it proves (`tests/support_table.py`); flex attention
runs only where `PARSCALE_TEST_FLEX=1` (on CPU, torch's flex attention has no backward pass and padded generation
fails to compile, for the plain base models too).
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from peft import get_peft_model
from reference import greedy_with_logits, positions_from_mask, randomize_aggregator, relative_error
from tiny_models import ARCHITECTURES, SLIDING, tiny_model
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import peft_parscale  # noqa: F401  (registers the PEFT type)
from peft_parscale import ParScaleConfig
from peft_parscale.cache import ParScaleDynamicSlidingWindowLayer, ParScaleStaticSlidingWindowLayer
from peft_parscale.testing import tiny_tokenizer

# transformers 5.23 renames gradient_checkpointing_enable; 5.17, also supported, has only the old name
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
TOKENIZER = tiny_tokenizer()
T = 6
TEXTS = ["import os\nimport sys\n", "def main(argv):\n", "class Point:\n    x: int\n"]
SMOOTHING = 0.1
NEW_TOKENS = 4
LENGTHS = [7, 3, 5]  # left-padded; with T, shorter than every window (16)
DEVICE = torch.device(os.environ.get("PARSCALE_TEST_DEVICE", "cpu"))
IMPLEMENTATIONS = ["sdpa", "eager"] + (["flex_attention"] if os.environ.get("PARSCALE_TEST_FLEX") == "1" else [])

# Worst |package - expected| / max(1, |expected|) over every logit, in float32: 5.5e-6, measured over seeds 0..2 of
# the model, aggregator and batch, every architecture, sdpa and eager, with and without a cache, in training mode and
# through generate (past the window too), on a CPU loaded by other work (load average 4.7 on 2 cores). The two sides
# round differently: the rotary embedding is evaluated at other positions, the attention sums run in other orders,
# and Gemma's soft-capping and long generations amplify that. The bound, 2e-5, leaves a margin of 3.6x; a misplaced or
# missing prefix, a wrong stream order or a visible token outside the window moves these logits by 1e-2 to 1.
TOLERANCE = 2e-5


def text_ids(text: str) -> torch.Tensor:
    """A stream's text as the model reads it: its first T - 1 tokens, then a document boundary (the tiny tokenizer
    has no BOS token: its EOS token)."""
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"][: T - 1] + [TOKENIZER.eos_token_id]
    return torch.tensor(ids, device=DEVICE)


def left_padded_batch(lengths, seed=2):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros((len(lengths), width), dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(4, len(TOKENIZER), (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids.to(DEVICE), attention_mask.to(DEVICE)


@functools.cache
def plain_model_failure(name: str, attn_implementation: str, feature: str | None) -> str | None:
    """Why the plain model (no adapter) cannot do `feature` with this attention implementation here, or None.

    transformers offers no sdpa for Gemma2 and no flex attention for some models; with flex attention on CPU, torch
    has no backward pass, and transformers' generate fails with a static cache. Those are limits of the plain model,
    not of ParScale: such a cell is reported as "n/a" with the reason, and asked again of every new version.
    """
    try:
        model = tiny_model(name, attn_implementation).to(DEVICE)
    except ValueError as error:
        if "does not support an attention implementation" not in str(error):
            raise
        return f"transformers offers no {attn_implementation} for {ARCHITECTURES[name].model_type}"
    if attn_implementation != "flex_attention" or feature is None:
        return None  # sdpa and eager: nothing to probe
    input_ids = left_padded_batch([5, 5])[0]
    try:
        if feature == "training":
            model.train()
            model(input_ids=input_ids).logits.sum().backward()
        else:
            cache_implementation = "static" if feature == "static cache" else "dynamic"
            model.generate(
                input_ids=input_ids, max_new_tokens=2, do_sample=False, cache_implementation=cache_implementation
            )
    except Exception as error:  # noqa: BLE001  (whatever the plain model raises here, ParScale is not what fails)
        message = str(error).strip().splitlines()[0][:120]
        return f"the plain model fails too on {DEVICE.type}: {type(error).__name__}: {message}"
    return None


def skip_unsupported(name: str, attn_implementation: str, feature: str | None = None) -> None:
    """Skip a combination that the plain model itself cannot run here (`plain_model_failure`)."""
    reason = plain_model_failure(name, attn_implementation, feature)
    if reason is not None:
        pytest.skip(reason)


def build(tokenizer_dir, name, attn_implementation, feature=None, seed=0):
    """A fresh text-initialised P=3 adapter (random aggregator) on a tiny model, and a plain copy of the model."""
    skip_unsupported(name, attn_implementation, feature)
    base = tiny_model(name, attn_implementation, seed=seed).to(DEVICE)
    oracle = copy.deepcopy(base)
    config = ParScaleConfig(
        P=3,
        prefix_length=T,
        smoothing=SMOOTHING,
        prefix_init="text",
        prefix_init_text=TEXTS,
        tokenizer_name_or_path=tokenizer_dir,
    )
    model = get_peft_model(base, config)
    randomize_aggregator(model, seed=seed + 1)
    return model, oracle


def aggregator_tensors(model):
    parts = {}
    for name, parameter in model.named_parameters():
        if "parscale_aggregator" in name:
            parts[name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]] = parameter.detach()
    return [parts[key] for key in ("0.weight", "0.bias", "2.weight", "2.bias")]


# ---------------------------------------------------------------------------------------------------------------
# The oracle: the plain model reading [text_p ; x], the paper's aggregation, the LM head


def lm_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The plain model's logits from its final-norm hidden states (the LM head and what these models apply after it:
    Granite's logit scaling, Gemma2/3's final soft-capping)."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits


def plain_hidden(oracle, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states of the plain model over [prefix ; tokens] (positions 0..T+n-1), at the tokens'
    positions."""
    with torch.no_grad():
        output = oracle(input_ids=torch.cat([prefix, tokens])[None], output_hidden_states=True)
    return output.hidden_states[-1][0][len(prefix) :]


def aggregate_and_head(model, streams: list[torch.Tensor], aggregator) -> torch.Tensor:
    """The paper's aggregation of P streams' final hidden states (n, H) each, then the LM head."""
    w1, b1, w2, b2 = aggregator
    features = torch.stack(streams, dim=-1).flatten(-2)  # (n, H·P), element h·P + p
    weights = torch.softmax(torch.nn.functional.silu(features @ w1.T + b1) @ w2.T + b2, dim=-1)
    weights = weights * (1 - SMOOTHING) + SMOOTHING / len(streams)
    mixed = sum(weights[:, p, None] * streams[p] for p in range(len(streams)))
    return lm_head(model, mixed)


def oracle_logits(oracle, tokens: torch.Tensor, aggregator, texts=TEXTS) -> torch.Tensor:
    streams = [plain_hidden(oracle, text_ids(text), tokens) for text in texts]
    return aggregate_and_head(oracle, streams, aggregator)


def worst_error_against_oracle(logits, oracle, input_ids, attention_mask, aggregator, texts=TEXTS) -> float:
    errors = []
    for row, mask in enumerate(attention_mask.bool()):
        expected = oracle_logits(oracle, input_ids[row][mask], aggregator, texts)
        errors.append(relative_error(logits[row][mask], expected))
    return max(errors)


def support(feature: str):
    """The support-table cell a test proves: its architecture and attention implementation, and `feature`."""
    return pytest.mark.support(feature=feature)


# ---------------------------------------------------------------------------------------------------------------
# Every architecture


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_oracle_reads_the_plain_models_logits(name, attn_implementation):
    # Guard on the oracle itself: its last hidden states and LM head give the plain model's own logits.
    skip_unsupported(name, attn_implementation)
    model = tiny_model(name, attn_implementation).to(DEVICE)
    input_ids = left_padded_batch([7])[0]
    with torch.no_grad():
        output = model(input_ids=input_ids, output_hidden_states=True)
    assert relative_error(lm_head(model, output.hidden_states[-1]), output.logits) <= 1e-6


@support("cached generation")
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fresh_text_adapter_with_a_cache_matches_the_oracle(tokenizer_dir, name, attn_implementation):
    model, oracle = build(tokenizer_dir, name, attn_implementation, "cached generation")
    input_ids, attention_mask = left_padded_batch(LENGTHS)
    with torch.no_grad():
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=True,
        )
    assert output.past_key_values is not None
    aggregator = aggregator_tensors(model)
    assert worst_error_against_oracle(output.logits, oracle, input_ids, attention_mask, aggregator) <= TOLERANCE
    # Guard: the check can fail for this architecture; with two streams' texts swapped the oracle is far away.
    swapped = [TEXTS[1], TEXTS[0], TEXTS[2]]
    error = worst_error_against_oracle(output.logits, oracle, input_ids, attention_mask, aggregator, swapped)
    assert error > 100 * TOLERANCE


@support("training")
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_training_matches_the_oracle_and_trains_only_parscale_weights(tokenizer_dir, name, attn_implementation):
    model, oracle = build(tokenizer_dir, name, attn_implementation, "training")
    base = model.get_base_model()
    if base.supports_gradient_checkpointing:  # the cache is then dropped inside the layers: the prefix comes from them
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    input_ids, attention_mask = left_padded_batch(LENGTHS)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        labels=labels,
    )
    error = worst_error_against_oracle(
        output.logits.detach(), oracle, input_ids, attention_mask, aggregator_tensors(model)
    )
    assert error <= TOLERANCE
    output.loss.backward()
    parscale, frozen = [], []
    for parameter_name, parameter in model.named_parameters():
        (parscale if "parscale_" in parameter_name else frozen).append((parameter_name, parameter))
    assert len(parscale) == 2 * model.peft_config["default"].base_shape["num_hidden_layers"] + 4
    for parameter_name, parameter in parscale:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().max() > 0, parameter_name
    assert all(not parameter.requires_grad and parameter.grad is None for _, parameter in frozen)


def recompute_greedy(model, input_ids, attention_mask, new_tokens):
    """Greedy decoding with no cache: the whole sequence through the model at every step."""
    steps = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask),
                use_cache=False,
            ).logits[:, -1]
            steps.append(logits)
            input_ids = torch.cat([input_ids, logits.argmax(-1)[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return input_ids, torch.stack(steps, dim=1)


def check_generation_against_recomputation(model, input_ids, attention_mask, cache_implementation, new_tokens):
    output = greedy_with_logits(model, input_ids, attention_mask, new_tokens, cache_implementation=cache_implementation)
    expected_tokens, expected_logits = recompute_greedy(model, input_ids, attention_mask, new_tokens)
    logits = torch.stack(output.logits, dim=1)
    top = expected_logits.topk(2, dim=-1).values
    # no near-tie: logits within the tolerance cannot pick another token
    assert (top[..., 0] - top[..., 1]).min() > 2 * TOLERANCE * max(1.0, expected_logits.abs().max().item())
    assert torch.equal(output.sequences, expected_tokens)
    assert relative_error(logits, expected_logits) <= TOLERANCE
    return output


@pytest.mark.parametrize(
    "cache_implementation",
    [
        pytest.param("dynamic", marks=support("cached generation")),
        pytest.param("static", marks=support("static cache")),
    ],
)
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_greedy_generation_equals_recomputation_without_a_cache(
    tokenizer_dir, name, attn_implementation, cache_implementation
):
    feature = "static cache" if cache_implementation == "static" else "cached generation"
    model, _ = build(tokenizer_dir, name, attn_implementation, feature)
    input_ids, attention_mask = left_padded_batch([6, 3, 5])
    check_generation_against_recomputation(model, input_ids, attention_mask, cache_implementation, NEW_TOKENS)


# ---------------------------------------------------------------------------------------------------------------
# Past the sliding window: a plain reference attention

PAST_WINDOW = 5  # the window in these tests; the inputs are 2 to 4 times longer
PAST_T = 3


class ReferenceAttention:
    """A plain attention function for transformers' `AttentionInterface`: each query sees the stream's whole prefix
    and the real keys of its window (all earlier real keys in full-attention layers). It ignores the mask it is
    given and builds its own from positions; it runs one unpadded sequence of one stream at a time."""

    def __init__(self) -> None:
        self.prefix_k: list[torch.Tensor] = []  # per layer, (kv_heads, T, head_dim) of the stream being run
        self.prefix_v: list[torch.Tensor] = []
        self.windows: list[int | None] = []  # per layer: the window, or None for full attention
        # Soft-capping of the scores, where the model's attention implementation applies it: transformers' sdpa path
        # has none (Gemma2, which transformers < 5.23 runs with sdpa, then ignores attn_logit_softcapping).
        self.softcap = True

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        assert query.shape[0] == 1, "one sequence at a time"
        layer = module.layer_idx
        keys = torch.cat([self.prefix_k[layer], key[0]], dim=1)
        values = torch.cat([self.prefix_v[layer], value[0]], dim=1)
        heads, length, head_dim = query.shape[1:]
        keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)
        values = values.repeat_interleave(heads // values.shape[0], dim=0)
        scores = query[0] @ keys.transpose(-1, -2) * (head_dim**-0.5 if scaling is None else scaling)
        if softcap is not None and self.softcap:
            scores = torch.tanh(scores / softcap) * softcap
        queries, real_keys = torch.arange(length)[:, None], torch.arange(length)[None, :]
        visible = real_keys <= queries
        if self.windows[layer] is not None:
            visible &= real_keys > queries - self.windows[layer]  # transformers' window: the query and W-1 before it
        visible = torch.cat([torch.ones(length, keys.shape[1] - length, dtype=torch.bool), visible], dim=1)
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        output = torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values
        return output.transpose(0, 1)[None], None


REFERENCE = ReferenceAttention()
AttentionInterface.register("parscale_reference", REFERENCE)


def window_per_layer(config) -> list[int | None]:
    """Sliding-window layers as the config declares them (`layer_types`, or a `sliding_window` for all layers)."""
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [config.sliding_window if kind == "sliding_attention" else None for kind in layer_types]


def reference_logits(reference, model, tokens: torch.Tensor) -> torch.Tensor:
    """ParScale logits of one unpadded sequence, each stream run through `reference` (the plain model with
    `ReferenceAttention`), aggregated here."""
    prefix_k = [layer.parscale_prefix_k["default"].detach() for layer in attention_layers(model)]
    prefix_v = [layer.parscale_prefix_v["default"].detach() for layer in attention_layers(model)]
    REFERENCE.windows = window_per_layer(reference.config)
    REFERENCE.softcap = model.get_base_model().config._attn_implementation != "sdpa"
    streams = []
    for p in range(prefix_k[0].shape[0]):
        REFERENCE.prefix_k, REFERENCE.prefix_v = [k[p] for k in prefix_k], [v[p] for v in prefix_v]
        with torch.no_grad():
            output = reference(input_ids=tokens[None], output_hidden_states=True)
        streams.append(output.hidden_states[-1][0])
    return aggregate_and_head(reference, streams, aggregator_tensors(model))


def attention_layers(model):
    from peft_parscale.layer import ParScaleAttention

    return [module for module in model.modules() if isinstance(module, ParScaleAttention)]


def build_past_window(name, attn_implementation, feature=None):
    skip_unsupported(name, attn_implementation, feature)
    base = tiny_model(name, attn_implementation, sliding_window=PAST_WINDOW).to(DEVICE)
    reference = copy.deepcopy(base)
    reference.config._attn_implementation = "parscale_reference"
    for module in reference.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "parscale_reference"
    model = get_peft_model(base, ParScaleConfig(P=2, prefix_length=PAST_T, smoothing=SMOOTHING))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random prefixes and aggregator: streams differ clearly
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.5)
    return model, reference


@pytest.mark.parametrize(
    "use_cache",
    [pytest.param(False, marks=support("training")), pytest.param(True, marks=support("cached generation"))],
    ids=["no-cache", "cache"],
)
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", SLIDING)
def test_past_the_window_matches_a_plain_reference(name, attn_implementation, use_cache):
    model, reference = build_past_window(name, attn_implementation, "cached generation" if use_cache else "training")
    input_ids, attention_mask = left_padded_batch([14, 9, 12], seed=5)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=use_cache,
        ).logits
    for row, mask in enumerate(attention_mask.bool()):
        expected = reference_logits(reference, model, input_ids[row][mask])
        assert relative_error(logits[row][mask], expected) <= TOLERANCE, row


def test_the_reference_sees_the_window_and_the_prefix():
    # Guards on the reference: without the window, or without the prefix, its logits move far beyond the tolerance.
    model, reference = build_past_window("Mistral (sliding window)", "eager")
    tokens = left_padded_batch([14], seed=5)[0][0]
    expected = reference_logits(reference, model, tokens)
    reference.config.sliding_window = 1000
    assert relative_error(reference_logits(reference, model, tokens), expected) > 100 * TOLERANCE
    reference.config.sliding_window = PAST_WINDOW
    for layer in attention_layers(model):
        layer.parscale_prefix_k["default"].data.zero_()
    assert relative_error(reference_logits(reference, model, tokens), expected) > 100 * TOLERANCE


@pytest.mark.parametrize(
    "cache_implementation",
    [
        pytest.param("dynamic", marks=support("cached generation")),
        pytest.param("static", marks=support("static cache")),
    ],
)
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", SLIDING)
@pytest.mark.parametrize(
    "lengths, seed", [([9, 4], 6), ([3, 2], 7)], ids=["prompt-past-the-window", "generation-past-the-window"]
)
def test_generation_past_the_window(name, attn_implementation, cache_implementation, lengths, seed):
    feature = "static cache" if cache_implementation == "static" else "cached generation"
    model, _ = build_past_window(name, attn_implementation, feature)
    input_ids, attention_mask = left_padded_batch(lengths, seed=seed)
    new_tokens = 8  # up to 17 tokens: more than 3 windows
    output = check_generation_against_recomputation(model, input_ids, attention_mask, cache_implementation, new_tokens)
    # The sliding-window cache layers evicted real tokens but kept the prefix in their first T slots.
    layers = [layer for layer in output.past_key_values.layers if layer.is_sliding]
    assert layers
    for layer in layers:
        if cache_implementation == "dynamic":
            assert isinstance(layer, ParScaleDynamicSlidingWindowLayer)
            assert layer.keys.shape[2] == PAST_T + PAST_WINDOW - 1
        else:
            assert isinstance(layer, ParScaleStaticSlidingWindowLayer)
            assert layer.keys.shape[2] == PAST_T + PAST_WINDOW
        rows = layer.keys.shape[0] // 2
        index = output.past_key_values.layers.index(layer)
        prefix_k = attention_layers(model)[index].parscale_prefix_k["default"]
        assert torch.equal(layer.keys[:, :, :PAST_T], prefix_k.repeat_interleave(rows, dim=0))


# ---------------------------------------------------------------------------------------------------------------
# What is refused, and why


def tiny(model_type: str, **config):
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=50, **config))


@pytest.mark.parametrize(
    "build_model, message",
    [
        (lambda: tiny("falcon", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, alibi=True), "ALiBi"),
        (lambda: tiny("bloom", hidden_size=32, n_layer=1, n_head=2), "ALiBi"),
        (lambda: tiny("mpt", d_model=32, n_layers=1, n_heads=2), "ALiBi"),
        (
            lambda: AutoModelForSeq2SeqLM.from_config(
                AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=50)
            ),
            "encoder-decoder",
        ),
        (lambda: tiny("gpt2", n_embd=32, n_layer=1, n_head=2, add_cross_attention=True), "cross-attention"),
        # GPT-Neo's attention passes the cache `self.layer_id`; Mamba has no attention at all
        (
            lambda: tiny(
                "gpt_neo", hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]]
            ),
            "cache.update",
        ),
        (lambda: tiny("mamba", hidden_size=32, num_hidden_layers=1), "cache.update"),
        (
            lambda: tiny(
                "llama4_text",
                hidden_size=32,
                intermediate_size=64,
                intermediate_size_mlp=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                attention_chunk_size=8,
                num_local_experts=2,
            ),
            "chunked_attention",
        ),
    ],
    ids=["falcon-alibi", "bloom", "mpt", "t5", "gpt2-cross-attention", "gpt-neo", "mamba", "llama4-chunked"],
)
def test_unsupported_models_are_refused_naming_the_cause(build_model, message):
    model = build_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, ParScaleConfig(P=2, prefix_length=2))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], value) for key, value in before.items())


@pytest.mark.parametrize("name", SLIDING)
def test_the_fast_decode_path_past_the_window(name):
    # `greedy_generate` (static cache, one decode step at a time, uncompiled here) through the sliding-window layers.
    from peft_parscale.decode import greedy_generate

    model, _ = build_past_window(name, "eager")
    input_ids, attention_mask = left_padded_batch([9, 4], seed=6)
    expected, _ = recompute_greedy(model, input_ids, attention_mask, 8)
    assert torch.equal(greedy_generate(model, input_ids, attention_mask, 8, compile=False), expected)
