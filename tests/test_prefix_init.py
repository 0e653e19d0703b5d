"""Text initialisation of the prefixes (`prefix_init="text"`, `init_prefixes_from_text`) against an oracle.

The oracle runs the plain transformers model (a deepcopy of the base, no package code) P times over
[text_p ; x], the text's tokens literally in front with real positions 0..T+n-1, takes the final-norm hidden states
at x's positions, and aggregates them as the paper does, written out here from the aggregator's tensors. A fresh
text-initialised adapter must equal it: the prefix holds the keys/values the base model computes for the text at
positions -T..-1, and the rotary embedding only sees relative positions.
"""

import copy
import json

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from reference import (
    greedy_with_logits,
    left_padded_batch,
    positions_from_mask,
    randomize_aggregator,
    relative_error,
    training_args,
)
from safetensors.torch import load_file
from tiny_models import REFERENCE_ARCHITECTURES, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_parscale  # noqa: F401  (registers the PEFT type)
from peft_parscale import ParScaleConfig, broadcast_prefixes, init_prefixes_from_text, init_prefixes_from_token_ids
from peft_parscale.layer import ParScaleLayer
from peft_parscale.sft import ParScaleSFTTrainer, make_parser, train
from peft_parscale.testing import save_tiny_checkpoint

TOKENIZER = tiny_tokenizer()  # one token per character
T = 6
TEXTS = ["import os\nimport sys\n", "def main(argv):\n", "class Point:\n    x: int\n"]
SMOOTHING = 0.1
NEW_TOKENS = 4

# Worst |package - oracle| / max(1, |oracle|) over every logit, in float32: 1.1e-6 (logits up to ~4), measured over
# seeds 0..4 of the base model, the aggregator and the batch, every architecture, sdpa and eager, with and without a
# cache and through generate (dynamic and static cache), with a busy-loop process loading the CPU. The bound, 1e-5,
# leaves a margin of 9x. The two sides round differently in float32: the rotary embedding is evaluated at other
# absolute positions (-T..-1 and 0..n-1 against 0..T+n-1) and the attention sums run in another order.
TOLERANCE = 1e-5


def text_ids(text: str) -> torch.Tensor:
    """A stream's text as the model reads it: its first T - 1 tokens, then a document boundary (the tiny tokenizer
    has no BOS token: its EOS token)."""
    assert TOKENIZER.bos_token_id is None and TOKENIZER.eos_token_id is not None
    return torch.tensor(TOKENIZER(text, add_special_tokens=False)["input_ids"][: T - 1] + [TOKENIZER.eos_token_id])


def text_config(tokenizer_dir, P=3, texts=TEXTS) -> ParScaleConfig:
    return ParScaleConfig(
        P=P,
        prefix_length=T,
        smoothing=SMOOTHING,
        prefix_init="text",
        prefix_init_text=list(texts[:P]),
        tokenizer_name_or_path=tokenizer_dir,
    )


def build(tokenizer_dir, architecture="qwen2", attn_implementation="sdpa", P=3, seed=0, aggregator_seed=1):
    base = tiny_model(architecture, attn_implementation, seed=seed, vocab_size=len(TOKENIZER))
    base.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS tokens, as the oracle does
    oracle = copy.deepcopy(base)
    model = get_peft_model(base, text_config(tokenizer_dir, P=P))
    randomize_aggregator(model, seed=aggregator_seed)
    return model, oracle


def aggregator_tensors(model, adapter_name="default"):
    named = dict(model.named_parameters())
    prefix = f"base_model.model.model.streams.parscale_aggregator.{adapter_name}"
    return [named[f"{prefix}.{part}"].detach() for part in ("0.weight", "0.bias", "2.weight", "2.bias")]


def prefix_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "parscale_prefix" in name}


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "parscale_" in name}


def assert_same_state(model, state) -> None:
    now = adapter_state(model)
    assert now.keys() == state.keys() and all(torch.equal(now[name], value) for name, value in state.items())


# ---------------------------------------------------------------------------------------------------------------
# The oracle


def oracle_logits(oracle, texts, tokens: torch.Tensor, aggregator, smoothing=SMOOTHING) -> torch.Tensor:
    """ParScale logits (n, vocab) of one unpadded sequence: P plain runs over [text_p ; tokens], then the paper's
    aggregation, then the LM head."""
    streams = []
    for text in texts:
        prefix = text_ids(text)
        with torch.no_grad():
            output = oracle(input_ids=torch.cat([prefix, tokens])[None], output_hidden_states=True)
        hidden = output.hidden_states[-1][0]  # the final norm's output: the LM head's input
        streams.append(hidden[len(prefix) :])  # at the tokens' positions
    num_streams = len(streams)
    if num_streams == 1:
        mixed = streams[0]
    else:
        w1, b1, w2, b2 = aggregator
        features = torch.stack(streams, dim=-1).flatten(-2)  # (n, H·P), element h·P + p
        weights = torch.softmax(torch.nn.functional.silu(features @ w1.T + b1) @ w2.T + b2, dim=-1)
        weights = weights * (1 - smoothing) + smoothing / num_streams
        mixed = sum(weights[:, p, None] * streams[p] for p in range(num_streams))
    return mixed @ oracle.lm_head.weight.T


def oracle_greedy(oracle, texts, tokens, aggregator, new_tokens=NEW_TOKENS):
    """The oracle's own greedy loop; also returns each step's logits and its smallest top-1/top-2 gap."""
    steps, gap = [], float("inf")
    for _ in range(new_tokens):
        logits = oracle_logits(oracle, texts, tokens, aggregator)[-1]
        top = logits.topk(2).values
        gap = min(gap, (top[0] - top[1]).item())
        steps.append(logits)
        tokens = torch.cat([tokens, logits.argmax()[None]])
    return tokens, torch.stack(steps), gap


def worst_batch_error(model, oracle, texts, input_ids, attention_mask, use_cache, aggregator=None) -> float:
    """The worst `relative_error` of the model's logits on a left-padded batch against the oracle's, row by row."""
    if aggregator is None and len(texts) > 1:
        aggregator = aggregator_tensors(model)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=use_cache,
        ).logits
    errors = []
    for row, mask in enumerate(attention_mask.bool()):
        expected = oracle_logits(oracle, texts, input_ids[row][mask], aggregator)
        errors.append(relative_error(logits[row][mask].float(), expected))
    return max(errors)


# ---------------------------------------------------------------------------------------------------------------
# A fresh text-initialised adapter is the oracle


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", list(REFERENCE_ARCHITECTURES))
def test_fresh_text_adapter_matches_the_oracle(tokenizer_dir, architecture, attn_implementation):
    model, oracle = build(tokenizer_dir, architecture, attn_implementation)
    input_ids, attention_mask = left_padded_batch([7, 3, 5])
    for use_cache in (False, True):  # the prefix in front of each call, or resident in the cache
        assert worst_batch_error(model, oracle, TEXTS, input_ids, attention_mask, use_cache) <= TOLERANCE


def test_the_oracle_sees_non_uniform_weights_a_wrong_stream_order_and_misplaced_prefixes(tokenizer_dir):
    # Guards on the check itself: each mistake below must move the logits far beyond the tolerance.
    model, oracle = build(tokenizer_dir)
    input_ids, attention_mask = left_padded_batch([7, 3])
    error = worst_batch_error(model, oracle, TEXTS, input_ids, attention_mask, use_cache=False)
    assert error <= TOLERANCE
    # the last hidden state is the LM head's input
    with torch.no_grad():
        output = oracle(input_ids=input_ids[:1], output_hidden_states=True)
    assert torch.equal(output.hidden_states[-1] @ oracle.lm_head.weight.T, output.logits)
    swapped = [TEXTS[1], TEXTS[0], TEXTS[2]]
    assert worst_batch_error(model, oracle, swapped, input_ids, attention_mask, use_cache=False) > 100 * TOLERANCE
    w1, b1, w2, b2 = aggregator_tensors(model)  # the aggregation weights really differ between streams
    uniform = [w1, b1, torch.zeros_like(w2), torch.zeros_like(b2)]
    error = worst_batch_error(model, oracle, TEXTS, input_ids, attention_mask, use_cache=False, aggregator=uniform)
    assert error > 100 * TOLERANCE
    # the text's keys/values computed at positions 0..T-1 (plain transformers) instead of -T..-1
    misplaced = copy.deepcopy(model)
    with torch.no_grad():
        cache = oracle(input_ids=torch.stack([text_ids(text) for text in TEXTS]), use_cache=True).past_key_values
        for name, parameter in misplaced.named_parameters():
            if "parscale_prefix" in name:
                layer = cache.layers[int(name.split(".layers.")[1].split(".")[0])]
                parameter.copy_(layer.keys if "prefix_k" in name else layer.values)
    assert worst_batch_error(misplaced, oracle, TEXTS, input_ids, attention_mask, use_cache=False) > 100 * TOLERANCE


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("architecture", list(REFERENCE_ARCHITECTURES))
def test_greedy_generation_follows_the_oracle(tokenizer_dir, architecture, cache_implementation):
    model, oracle = build(tokenizer_dir, architecture)
    aggregator = aggregator_tensors(model)
    input_ids, attention_mask = left_padded_batch([6, 3, 5])
    output = greedy_with_logits(model, input_ids, attention_mask, NEW_TOKENS, cache_implementation=cache_implementation)
    logits = torch.stack(output.logits, dim=1)  # (B, NEW_TOKENS, vocab)
    for row, mask in enumerate(attention_mask.bool()):
        tokens, step_logits, gap = oracle_greedy(oracle, TEXTS, input_ids[row][mask], aggregator)
        # no near-tie: logits within the tolerance of the oracle's cannot pick another token
        assert gap > 2 * TOLERANCE * max(1.0, step_logits.abs().max().item())
        assert torch.equal(output.sequences[row, -NEW_TOKENS:], tokens[-NEW_TOKENS:])
        assert relative_error(logits[row], step_logits) <= TOLERANCE


def test_config_and_function_give_the_same_prefixes(tokenizer_dir):
    from_config, _ = build(tokenizer_dir)
    base = tiny_model("qwen2", vocab_size=len(TOKENIZER))
    by_hand = get_peft_model(base, ParScaleConfig(P=3, prefix_length=T, smoothing=SMOOTHING))
    random_prefixes = prefix_tensors(by_hand)
    by_hand.train()
    init_prefixes_from_text(by_hand, TOKENIZER, TEXTS)  # runs the model in eval mode, then restores the mode
    assert all(module.training for module in by_hand.modules())
    expected = prefix_tensors(from_config)
    actual = prefix_tensors(by_hand)
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert not any(torch.equal(actual[name], random_prefixes[name]) for name in expected)


# ---------------------------------------------------------------------------------------------------------------
# Bad input fails loudly and changes nothing


@pytest.mark.parametrize(
    "texts",
    [
        TEXTS[:2],  # too few
        TEXTS + ["one more text"],  # too many
        [TEXTS[0], "shor", TEXTS[2]],  # 4 tokens < T - 1 (the text, then the document boundary)
        [TEXTS[0], 12345678, TEXTS[2]],  # not a string
        [TEXTS[0], None, TEXTS[2]],
        "abc",  # a string is not a list of texts (even one of length P)
        TEXTS[0],
        None,
    ],
)
def test_bad_texts_raise_before_anything_changes(texts):
    model = get_peft_model(tiny_model("qwen2", vocab_size=len(TOKENIZER)), ParScaleConfig(P=3, prefix_length=T))
    model.add_adapter("other", ParScaleConfig(P=2, prefix_length=T))
    state = adapter_state(model)
    with pytest.raises(ValueError):
        init_prefixes_from_text(model, TOKENIZER, texts)
    assert_same_state(model, state)


@pytest.mark.parametrize(
    "token_ids, adapter_name",
    [
        ([[5] * T, [6] * T], "default"),  # 2 rows for P=3
        ([[5] * T, [6] * T, [7] * (T - 1)], "default"),  # a short row
        ([[5] * T, [6] * T, [len(TOKENIZER)] * T], "default"),  # outside the vocabulary
        ([[5] * T, [6] * T, [-1] * T], "default"),
        ([[5] * T, [6] * T, [7.0] * T], "default"),  # not integers
        ([[5] * T] * 3, "missing"),  # no such adapter
    ],
)
def test_bad_token_ids_raise_before_anything_changes(token_ids, adapter_name):
    model = get_peft_model(tiny_model("qwen2", vocab_size=len(TOKENIZER)), ParScaleConfig(P=3, prefix_length=T))
    state = adapter_state(model)
    with pytest.raises(ValueError):
        init_prefixes_from_token_ids(model, token_ids, adapter_name)
    assert_same_state(model, state)


def test_base_weights_missing_from_this_process_raise_before_anything_changes():
    # A weight that was never loaded here (under FSDP's cpu_ram_efficient_loading, transformers leaves a weight the
    # checkpoint lacks on the meta device in every process but 0): the model cannot read the texts.
    model = get_peft_model(tiny_model("qwen2", vocab_size=len(TOKENIZER)), ParScaleConfig(P=3, prefix_length=T))
    mlp = model.get_base_model().model.layers[0].mlp  # its output is what layer 1 reads
    mlp.down_proj.weight = torch.nn.Parameter(torch.empty_like(mlp.down_proj.weight, device="meta"))
    state = adapter_state(model)
    with pytest.raises(ValueError, match="not loaded in this process"):
        init_prefixes_from_token_ids(model, [[5] * T, [6] * T, [7] * T])
    assert_same_state(model, state)


def test_broadcast_prefixes_refuses_prefixes_on_the_meta_device():
    with torch.device("meta"):
        base = tiny_model("qwen2", vocab_size=len(TOKENIZER))
    model = get_peft_model(base, ParScaleConfig(P=2, prefix_length=T))
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="Process 0 holds adapter 'default'.s prefixes on the meta device"):
            broadcast_prefixes(model, "cpu")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"prefix_init": "zeros"}, "prefix_init must be one of"),
        ({"prefix_init": "text", "prefix_init_text": ["a", "b"]}, "tokenizer_name_or_path"),
        ({"prefix_init": "text", "tokenizer_name_or_path": "x"}, "only used to tokenise"),
        ({"prefix_init_text": ["a", "b"], "tokenizer_name_or_path": "x"}, "only used with prefix_init='text'"),
        ({"prefix_init": "text", "prefix_init_text": ["a"], "tokenizer_name_or_path": "x"}, "P=2"),
        ({"prefix_init": "text", "prefix_init_text": "ab", "tokenizer_name_or_path": "x"}, "P=2"),
        ({"prefix_init": "text", "prefix_init_text": ["a", 3], "tokenizer_name_or_path": "x"}, "strings"),
    ],
)
def test_nonsense_init_config_raises(settings, message):
    with pytest.raises(ValueError, match=message):
        ParScaleConfig(P=2, **settings)


def test_get_peft_model_with_unusable_text_changes_nothing(tokenizer_dir):
    for config in (
        ParScaleConfig(P=2, prefix_length=T, prefix_init="text"),  # no text: only the SFT trainer supplies one
        text_config(tokenizer_dir, P=2, texts=["long enough", "shor"]),
    ):
        base = tiny_model("qwen2", vocab_size=len(TOKENIZER))
        before = copy.deepcopy(base.state_dict())
        with pytest.raises(ValueError, match="prefix_init_text|prefix_length"):
            get_peft_model(base, config)
        assert not any(isinstance(module, ParScaleLayer) for module in base.modules())
        after = base.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())

    model, _ = build(tokenizer_dir)
    state = adapter_state(model)
    with pytest.raises(ValueError, match="prefix_length"):
        model.add_adapter("new", text_config(tokenizer_dir, P=2, texts=["long enough", "shor"]))
    assert list(model.peft_config) == ["default"]
    assert_same_state(model, state)


# ---------------------------------------------------------------------------------------------------------------
# An initialised adapter is an ordinary adapter


def test_save_and_reload_keep_the_weights_and_do_not_initialise_again(tokenizer_dir, tmp_path):
    model, _ = build(tokenizer_dir)
    with torch.no_grad():  # as if trained: reloading must give these weights, not the text's keys/values again
        for name, parameter in model.named_parameters():
            if "parscale_prefix" in name:
                parameter.add_(0.01)
    input_ids, attention_mask = left_padded_batch([6, 4])
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    state = adapter_state(model)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer_copy = tmp_path / "tokenizer"  # the adapter's config names a tokenizer that no longer exists
    saved_config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert tokenizer_dir in saved_config
    (tmp_path / "adapter" / "adapter_config.json").write_text(saved_config.replace(tokenizer_dir, str(tokenizer_copy)))

    for low_cpu_mem_usage in (False, True):
        base = tiny_model("qwen2", vocab_size=len(TOKENIZER))
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
        assert_same_state(loaded, state)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=input_ids, attention_mask=attention_mask).logits, expected)
    loaded.load_adapter(tmp_path / "adapter", adapter_name="again", low_cpu_mem_usage=True)
    loaded.set_adapter("again")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids, attention_mask=attention_mask).logits, expected)


def test_only_the_named_adapter_changes(tokenizer_dir):
    model = get_peft_model(
        tiny_model("qwen2", vocab_size=len(TOKENIZER)), ParScaleConfig(P=3, prefix_length=T), adapter_name="one"
    )
    model.add_adapter("two", ParScaleConfig(P=2, prefix_length=T))
    prefixes_of_two = {name for name in adapter_state(model) if name.endswith(("prefix_k.two", "prefix_v.two"))}

    def changed_by(initialise) -> set[str]:
        before = adapter_state(model)
        initialise()
        return {name for name, value in adapter_state(model).items() if not torch.equal(value, before[name])}

    assert (
        changed_by(lambda: init_prefixes_from_text(model, TOKENIZER, TEXTS[:2], adapter_name="two")) == prefixes_of_two
    )
    model.set_adapter("two")  # the default is the active adapter
    assert changed_by(lambda: init_prefixes_from_text(model, TOKENIZER, TEXTS[1:])) == prefixes_of_two

    state = adapter_state(model)
    model.add_adapter("three", text_config(tokenizer_dir, P=3))  # prefix_init="text" through add_adapter
    assert all(torch.equal(adapter_state(model)[name], value) for name, value in state.items())
    expected, _ = build(tokenizer_dir)
    for name, value in prefix_tensors(expected).items():
        assert torch.equal(dict(model.named_parameters())[name.replace(".default", ".three")], value)


def test_bfloat16_single_stream_is_close_to_the_oracle(tokenizer_dir):
    base = tiny_model("qwen2", vocab_size=len(TOKENIZER))
    oracle = copy.deepcopy(base)  # float32
    oracle_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    random_init = get_peft_model(copy.deepcopy(base).to(torch.bfloat16), ParScaleConfig(P=1, prefix_length=T))
    model = get_peft_model(base.to(torch.bfloat16), text_config(tokenizer_dir, P=1))
    input_ids, attention_mask = left_padded_batch([7, 3, 5])
    # The bound: the plain bfloat16 model reading [text ; x] is itself this far from the float32 oracle (bfloat16 keeps
    # 8 significant bits, 2^-8 = 0.004 per rounding, through two layers and logits up to ~4). The adapter (the text's
    # bfloat16 keys/values, then the same bfloat16 model) may be at most 3 times as far. Measured over seeds 0..4: the
    # adapter's error is 0.80 to 1.19 times the plain bfloat16 model's (0.030 to 0.048), a margin of 2.5x; a random
    # prefix is ~85 times as far.
    inherent = max(
        relative_error(
            oracle_logits(oracle_bf16, TEXTS[:1], ids[mask], None).float(),
            oracle_logits(oracle, TEXTS[:1], ids[mask], None),
        )
        for ids, mask in zip(input_ids, attention_mask.bool())
    )
    assert inherent > 0
    for use_cache in (False, True):
        assert worst_batch_error(model, oracle, TEXTS[:1], input_ids, attention_mask, use_cache) <= 3 * inherent
    # a random prefix (the other initialisation) is far outside the bound: the check can fail
    assert worst_batch_error(random_init, oracle, TEXTS[:1], input_ids, attention_mask, False) > 10 * inherent


# ---------------------------------------------------------------------------------------------------------------
# Training with TRL: the texts come from the training data

# The first row is shorter than T (with the EOS token TRL appends), so the windows are rows 1 and 2.
TRAINING_TEXTS = ["ok", "import json\nimport re\n", "def parse(text):\n    return text\n", "x = 1\n" * 4]


def expected_training_prefixes(base_dir, tokenizer) -> dict[str, torch.Tensor]:
    """`init_prefixes_from_text` on the training rows 1 and 2, the first two of at least T tokens."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), ParScaleConfig(P=2, prefix_length=T))
    init_prefixes_from_text(model, tokenizer, TRAINING_TEXTS[1:3])
    return prefix_tensors(model)


@pytest.mark.parametrize("kind", ["text", "input_ids"])
def test_sft_trainer_starts_from_the_first_training_windows(tmp_path, kind):
    base_dir = save_tiny_checkpoint(tmp_path / "base")
    if kind == "text":
        dataset = Dataset.from_dict({"text": TRAINING_TEXTS})
    else:  # pre-tokenised
        dataset = Dataset.from_dict({"input_ids": [TOKENIZER(text)["input_ids"] for text in TRAINING_TEXTS]})
    config = ParScaleConfig(P=2, prefix_length=T, prefix_init="text")
    trainer = ParScaleSFTTrainer(
        model=str(base_dir),
        args=training_args(tmp_path / "out"),
        train_dataset=dataset,
        processing_class=TOKENIZER,
        peft_config=config,
    )
    expected, actual = expected_training_prefixes(base_dir, TOKENIZER), prefix_tensors(trainer.model)
    assert actual.keys() == expected.keys() and all(torch.equal(actual[name], expected[name]) for name in expected)
    assert trainer.model.peft_config["default"].prefix_init == "text"  # as it will be saved
    assert config.prefix_init == "text" and config.base_shape is None  # the caller's config is left alone


def test_sft_trainer_without_enough_long_rows_names_the_problem(tmp_path):
    base_dir = save_tiny_checkpoint(tmp_path / "base")
    with pytest.raises(ValueError, match="only 1 rows"):
        ParScaleSFTTrainer(
            model=str(base_dir),
            args=training_args(tmp_path / "out"),
            train_dataset=Dataset.from_dict({"text": TRAINING_TEXTS[:2]}),
            processing_class=TOKENIZER,
            peft_config=ParScaleConfig(P=2, prefix_length=T, prefix_init="text"),
        )


def test_parscale_sft_prefix_init_text_flag(tmp_path):
    base_dir = save_tiny_checkpoint(tmp_path / "base")
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "train.jsonl", "w") as file:
        file.writelines(json.dumps({"text": text}) + "\n" for text in TRAINING_TEXTS)
    arguments = {
        "model_name_or_path": str(base_dir),
        "dataset_name": str(tmp_path / "data"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": "1",
        "learning_rate": "0",  # the saved prefixes are then the initial ones
        "max_length": "24",
        "per_device_train_batch_size": "2",
        "dtype": "float32",
        "bf16": "false",
        "use_cpu": "true",
        "report_to": "none",
        "save_strategy": "no",
        "P": "2",
        "prefix_length": str(T),
        "prefix_init": "text",
    }
    argv = [item for key, value in arguments.items() for item in (f"--{key}", value)]
    train(*make_parser().parse_args_and_config(argv))  # the body of `parscale sft`, in this process
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    # `parscale sft` reads the checkpoint's tokenizer, which AutoTokenizer loads as a Qwen2Tokenizer: unlike
    # TOKENIZER, it drops spaces
    expected = expected_training_prefixes(base_dir, AutoTokenizer.from_pretrained(base_dir))
    for name, value in expected.items():
        assert torch.equal(saved[name.replace(".default", "")], value)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["prefix_init"] == "text"


def test_the_document_boundary_is_the_bos_token_else_the_eos_token():
    from types import SimpleNamespace

    from peft_parscale.prefix_init import document_boundary

    assert document_boundary(SimpleNamespace(bos_token_id=1, eos_token_id=2)) == 1  # a document's start
    assert document_boundary(SimpleNamespace(bos_token_id=None, eos_token_id=2)) == 2
    assert document_boundary(SimpleNamespace(tokenizer=SimpleNamespace(bos_token_id=None, eos_token_id=7))) == 7
    with pytest.raises(ValueError, match="neither"):
        document_boundary(SimpleNamespace(bos_token_id=None, eos_token_id=None))
