"""What `get_peft_model` reads from one forward pass of the model (`peft_parscale/probe.py`): the shape of what each
attention layer caches, and whether positions are looked up in a table; and what follows from a position table (the
real tokens start at T, and the usable context shrinks by T).

The support table's oracle tests (`test_architectures.py`) show that CodeGen, GPT-J and DeepSeek-V3 are exact against
the plain model over [text ; x]; these tests show why it takes the probe, and that the limits are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from reference import positions_from_mask
from test_architectures import (
    TEXTS,
    TOLERANCE,
    aggregator_tensors,
    build,
    left_padded_batch,
    text_ids,
    worst_error_against_oracle,
)
from tiny_models import tiny_model

import peft_parscale  # noqa: F401  (registers the PEFT type)
from peft_parscale import ParScaleConfig, init_prefixes_from_token_ids
from peft_parscale.architecture import _cached_shape, describe_architecture
from peft_parscale.layer import ParScaleStreams
from peft_parscale.probe import Probe

ROTARY_TABLES = ["CodeGen (rotary angles from a table)", "GPT-J (rotary angles from a table)"]


@pytest.mark.parametrize(
    "name, table",
    [("Qwen2", None), ("SmolLM3 (NoPE layers)", None), ("GPT-2", 256), ("GPT-BigCode", 256)]
    + [(name, 256) for name in ROTARY_TABLES],
)
def test_position_tables_are_found_by_what_the_model_does(name, table):
    # Rotary models compute angles from the positions; GPT-2 and GPT-BigCode add learned embeddings, CodeGen and GPT-J
    # index a table of fixed rotary angles: all of them have n_positions = 256.
    model = tiny_model(name, "eager")
    assert describe_architecture(model).position_table == table


@pytest.mark.parametrize("name", ROTARY_TABLES)
def test_without_the_shift_a_rotary_table_breaks_text_initialisation(tokenizer_dir, name):
    model, oracle = build(tokenizer_dir, name, "eager")
    input_ids, attention_mask = left_padded_batch([7, 3, 5])
    aggregator = aggregator_tensors(model)

    def error() -> float:
        with torch.no_grad():
            positions = positions_from_mask(attention_mask)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
        return worst_error_against_oracle(logits, oracle, input_ids, attention_mask, aggregator)

    assert error() <= TOLERANCE
    # The planted bug: take negative positions as valid, as the package did before it probed for tables: the text is
    # read at -T..-1 and the real tokens start at 0. CodeGen's table then wraps to its end; GPT-J's lookup fails.
    next(m for m in model.modules() if isinstance(m, ParScaleStreams)).position_table = None
    texts = [text_ids(text).tolist() for text in TEXTS]
    if name.startswith("GPT-J"):
        with pytest.raises(RuntimeError, match="out of bounds"):
            init_prefixes_from_token_ids(model, texts)
    else:
        init_prefixes_from_token_ids(model, texts)
        assert error() > 100 * TOLERANCE


def test_a_position_table_shortens_the_context_by_the_prefix_and_says_so():
    # GPT-2 with a table of 16 positions and a prefix of 6: the real tokens take positions 6..15, so 10 of them fit.
    with pytest.raises(ValueError, match="table of 16.*prefix_length=16 leaves no position"):
        get_peft_model(tiny_model("GPT-2", n_positions=16), ParScaleConfig(P=2, prefix_length=16))
    model = get_peft_model(tiny_model("GPT-2", n_positions=16), ParScaleConfig(P=2, prefix_length=6))
    tokens = torch.randint(4, 50, (1, 11))
    with torch.no_grad():
        assert model(input_ids=tokens[:, :10]).logits.shape == (1, 10, model.config.vocab_size)
        with pytest.raises(ValueError, match="table of 16.*at most 10 fit: position 10 was asked for"):
            model(input_ids=tokens)
        # generate feeds back all but its last new token: 8 + 3 tokens fit, the fourth new token does not
        assert model.generate(input_ids=tokens[:, :8], max_new_tokens=3, do_sample=False).shape == (1, 11)
        with pytest.raises(ValueError, match="at most 10 fit"):  # one token at a time, through the cache
            model.generate(input_ids=tokens[:, :8], max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize(
    "probe, message",
    [
        (Probe(((2, 12), (4, 12)), ((2, 12), (4, 12)), None), "of one shape"),
        (Probe(((2, 12),), ((1, 12),), None), "2 key heads and 1 value heads"),
    ],
    ids=["layers-differ", "heads-differ"],
)
def test_cached_layouts_a_prefix_cannot_take_are_refused(probe, message):
    with pytest.raises(ValueError, match=message):
        _cached_shape("TinyModel", probe)


def test_latent_attention_prefixes_have_the_cached_latent_shapes_and_save_and_load(tmp_path):
    # DeepSeek-V3 caches a compressed latent (kv_lora_rank = 16) and the keys' rotary part (qk_rope_head_dim = 8),
    # one head each: the prefixes take those shapes, and the adapter records the values' size.
    from peft import PeftModel

    from peft_parscale.model_card import trainable_parameters

    name = "DeepSeek-V3 (latent attention)"
    model = get_peft_model(tiny_model(name), ParScaleConfig(P=2, prefix_length=3))
    shape = model.peft_config["default"].base_shape
    assert shape == {
        "num_hidden_layers": 2,
        "hidden_size": 48,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "value_head_dim": 8,
    }
    prefixes = {n: p.shape for n, p in model.named_parameters() if "parscale_prefix" in n}
    assert set(prefixes.values()) == {(2, 1, 3, 16), (2, 1, 3, 8)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_parameters(model.peft_config["default"]) == trainable
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0.0, 0.5)
    tokens = torch.randint(4, 50, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(name), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, expected)
