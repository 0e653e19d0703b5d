"""Prefix reparameterisation (`prefix_projection=True`): it starts at the initialisation, trains through the MLP only,
and saves the merged prefixes as an ordinary adapter."""

import dataclasses

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from reference import left_padded_batch, positions_from_mask, tiny_model
from safetensors.torch import load_file
from test_init import SMOOTHING, TEXTS, TOKENIZER, TOLERANCE, randomize_aggregator, text_config, worst_batch_error
from transformers import AutoModelForCausalLM, StaticCache
from trl import SFTConfig

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig, init_prefixes_from_text
from peft_parscale.sft import ParScaleSFTTrainer
from peft_parscale.testing import save_tiny_checkpoint, tiny_tokenizer

INPUT_IDS, ATTENTION_MASK = left_padded_batch([7, 3, 5])
T = 6


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    TOKENIZER.save_pretrained(directory)
    return str(directory)


def base_model():
    base = tiny_model("qwen2", vocab_size=len(TOKENIZER))
    base.generation_config.eos_token_id = None  # generate exactly the tokens asked for
    return base


def projected_model(config=None):
    config = config or ParScaleConfig(P=3, prefix_length=T, smoothing=SMOOTHING)
    model = get_peft_model(
        base_model(), dataclasses.replace(config, prefix_projection=True, prefix_projection_hidden=32)
    )
    randomize_aggregator(model)
    return model


def logits(model):
    with torch.no_grad():
        return model(
            input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, position_ids=positions_from_mask(ATTENTION_MASK)
        ).logits


def train_steps(model, steps=3):
    """A few AdamW steps on next-token loss, so that the projection's output is far from zero."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = INPUT_IDS.masked_fill(ATTENTION_MASK == 0, -100)
    for _ in range(steps):
        model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def named(model, part: str) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if part in name}


def prefixes_in_use(model) -> dict[str, torch.Tensor]:
    """The prefixes the adapter's attention uses, under the names of the stored ones."""
    prefixes = {}
    for name, module in model.named_modules():
        if hasattr(module, "prefix_projections"):
            for kind, prefix in zip("kv", module.prefix("default"), strict=True):
                prefixes[f"{name}.parscale_prefix_{kind}.default"] = prefix.detach().clone()
    return prefixes


@pytest.mark.parametrize("P", [1, 3])
def test_a_fresh_projection_starts_at_the_text_initialisation(tokenizer_dir, P):
    model = projected_model(text_config(tokenizer_dir, P=P))
    oracle = base_model()  # the same weights as the frozen backbone
    for use_cache in (False, True):
        assert worst_batch_error(model, oracle, TEXTS[:P], INPUT_IDS, ATTENTION_MASK, use_cache) <= TOLERANCE


def test_training_moves_the_projection_and_not_the_stored_prefixes():
    model = projected_model()
    stored = named(model, "parscale_prefix_k") | named(model, "parscale_prefix_v")
    aggregator = named(model, "parscale_aggregator")
    parameters = dict(model.named_parameters())
    assert stored and not any(parameters[name].requires_grad for name in stored)
    assert all(p.requires_grad for n, p in parameters.items() if "parscale_prefix_projection" in n)
    before = prefixes_in_use(model)
    assert all(torch.equal(before[name], value) for name, value in stored.items())  # the start: the projection adds 0
    train_steps(model)
    with model.disable_adapter():  # PEFT marks adapter weights trainable again afterwards; the stored ones stay frozen
        pass
    assert not any(parameters[name].requires_grad for name in stored)
    assert all(torch.equal(parameters[name], value) for name, value in stored.items())
    after = prefixes_in_use(model)
    assert all((after[name] - before[name]).abs().max() > 1e-3 for name in stored)
    assert all(not torch.equal(parameters[name], value) for name, value in aggregator.items())


def test_the_saved_adapter_holds_the_prefixes_in_use_and_nothing_else(tmp_path):
    model = projected_model()
    train_steps(model)
    expected = logits(model)
    in_use = prefixes_in_use(model)
    stored = named(model, "parscale_prefix_k") | named(model, "parscale_prefix_v")
    assert all((in_use[name] - stored[name]).abs().max() > 1e-3 for name in stored)  # so the check below can fail
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    get_peft_model(base_model(), ParScaleConfig(P=3, prefix_length=T)).save_pretrained(tmp_path / "plain")
    assert saved.keys() == load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()  # an ordinary adapter
    assert all(torch.equal(saved[name.replace(".default", "")], value) for name, value in in_use.items())
    # trainable: with a new projection (a low_cpu_mem_usage load gives it weights too, as no file holds it)
    for options in (
        {},
        {"low_cpu_mem_usage": True},
        {"is_trainable": True},
        {"is_trainable": True, "low_cpu_mem_usage": True},
    ):
        loaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter", **options)
        assert torch.equal(logits(loaded), expected), options


def test_loading_into_a_trained_projection_gives_the_loaded_prefixes(tmp_path):
    model = projected_model()
    train_steps(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model)
    train_steps(model)
    assert not torch.allclose(logits(model), expected)
    model.load_adapter(tmp_path / "adapter", adapter_name="default")
    assert torch.equal(logits(model), expected)


def test_text_initialisation_restarts_the_projection():
    model = projected_model()
    train_steps(model)
    init_prefixes_from_text(model, TOKENIZER, TEXTS)
    for use_cache in (False, True):
        assert worst_batch_error(model, base_model(), TEXTS, INPUT_IDS, ATTENTION_MASK, use_cache) <= TOLERANCE


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generation_uses_the_prefixes_in_use(tmp_path, cache_implementation):
    model = projected_model()
    train_steps(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter")
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "cache_implementation": cache_implementation}
    options.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        output = model.generate(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, **options)
        expected = loaded.generate(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, **options)
    assert torch.equal(output.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(output.logits, expected.logits, strict=True))


def test_a_static_cache_kept_across_training_steps_holds_the_current_prefixes():
    # as `greedy_generate` keeps its static cache from one call to the next, and resets it in between
    model = projected_model()
    length = INPUT_IDS.shape[1]

    def forward(cache):
        with torch.no_grad():
            return model(
                input_ids=INPUT_IDS,
                attention_mask=ATTENTION_MASK,
                position_ids=positions_from_mask(ATTENTION_MASK),
                past_key_values=cache,
                use_cache=True,
            ).logits

    kept = StaticCache(config=model.config, max_cache_len=length)
    forward(kept)
    train_steps(model, steps=1)
    kept.reset()
    assert torch.equal(forward(kept), forward(StaticCache(config=model.config, max_cache_len=length)))


def test_sft_trainer_with_gradient_checkpointing_saves_what_it_trained(tmp_path):
    tokenizer = tiny_tokenizer()
    base_dir = save_tiny_checkpoint(tmp_path / "base")
    texts = [text * 3 for text in TEXTS] * 2
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=32,
        gradient_checkpointing=True,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    config = ParScaleConfig(P=2, prefix_length=4, prefix_projection=True, prefix_projection_hidden=16)
    trainer = ParScaleSFTTrainer(
        model=str(base_dir),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=config,
    )
    stored, before = named(trainer.model, "parscale_prefix_k"), prefixes_in_use(trainer.model)
    trainer.train()
    assert all(torch.equal(value, stored[name]) for name, value in named(trainer.model, "parscale_prefix_k").items())
    after = prefixes_in_use(trainer.model)
    assert all((after[name] - before[name]).abs().max() > 1e-3 for name in stored)
    trainer.model.eval()
    input_ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        expected = trainer.model(input_ids=input_ids).logits
    trainer.save_model()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize(
    "settings", [{"prefix_projection": 1}, {"prefix_projection_hidden": 0}, {"prefix_projection_hidden": 2.5}]
)
def test_nonsense_projection_config_raises(settings):
    with pytest.raises(ValueError, match="prefix_projection"):
        ParScaleConfig(**settings)
