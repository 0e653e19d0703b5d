"""PEFT integration: config, saving and loading, several adapters on one backbone, and refusing bad input."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from reference import randomize_adapter
from safetensors.torch import load_file, save_file
from tiny_models import REFERENCE_ARCHITECTURES, VOCAB, tiny_model

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig, ParScaleModel

INPUT_IDS = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def trained_adapter(tmp_path, P=2, name="adapter", seed=1, safe_serialization=True, **config):
    """Save an adapter with random (non-initial) weights; return its directory."""
    model = get_peft_model(tiny_model("qwen2"), ParScaleConfig(P=P, prefix_length=4, **config))
    randomize_adapter(model, seed=seed)
    directory = tmp_path / name
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    return str(directory), logits(model)


def adapter_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "parscale_" in name}


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_registration():
    config = ParScaleConfig(P=8)
    assert (config.P, config.prefix_length, config.smoothing) == (8, 48, 0.1)
    assert config.peft_type == "PARSCALE" and config.task_type == "CAUSAL_LM"
    model = get_peft_model(tiny_model("qwen2"), config)
    assert isinstance(model.base_model, ParScaleModel)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"P": 0},
        {"P": -2},
        {"P": 2.5},
        {"P": True},
        {"prefix_length": 0},
        {"smoothing": -0.1},
        {"smoothing": 1.0},
        {"init_std": 0.0},
        {"task_type": "SEQ_CLS"},
    ],
)
def test_nonsense_config_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        ParScaleConfig(**kwargs)


def test_trainable_parameters_are_the_prefixes_and_the_aggregator():
    P, T, layers, kv_heads, head_dim, hidden = 4, 6, 2, 2, 8, 48
    model = get_peft_model(tiny_model("qwen2"), ParScaleConfig(P=P, prefix_length=T))
    trainable, _ = model.get_nb_trainable_parameters()
    expected = layers * 2 * P * kv_heads * T * head_dim + (P * hidden * hidden + hidden) + (hidden * P + P)
    assert trainable == expected
    assert all(("parscale_" in name) == p.requires_grad for name, p in model.named_parameters())


def test_bfloat16_model_keeps_float32_adapter_weights():
    base = tiny_model("qwen2").to(torch.bfloat16)
    model = get_peft_model(base, ParScaleConfig(P=3, prefix_length=4))
    randomize_adapter(model, scale=0.1)
    assert {p.dtype for n, p in model.named_parameters() if "parscale_" in n} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "parscale_" not in n} == {torch.bfloat16}
    assert logits(model).dtype == torch.bfloat16  # its values against the float64 reference: test_bfloat16.py
    with torch.no_grad():
        tokens = model.generate(input_ids=INPUT_IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 11)


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def test_save_load_gives_identical_logits(tmp_path):
    directory, expected = trained_adapter(tmp_path, P=3)
    assert sorted(os.listdir(directory)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(Path(directory, "adapter_config.json").read_text())["peft_type"] == "PARSCALE"
    config = PeftConfig.from_pretrained(directory)
    assert isinstance(config, ParScaleConfig) and config.P == 3 and config.prefix_length == 4
    loaded = PeftModel.from_pretrained(tiny_model("qwen2"), directory)
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    assert loaded.get_model_status().peft_types == {"default": "PARSCALE"}
    trainable = PeftModel.from_pretrained(tiny_model("qwen2"), directory, is_trainable=True)
    assert all(p.requires_grad == ("parscale_" in n) for n, p in trainable.named_parameters())
    from_meta = PeftModel.from_pretrained(tiny_model("qwen2"), directory, low_cpu_mem_usage=True)
    assert torch.equal(logits(from_meta), expected)


def test_pytorch_format_adapter_saves_and_loads_like_safetensors(tmp_path):
    # save_pretrained(safe_serialization=False) writes PyTorch's format, as for every PEFT method; it loads back.
    directory, expected = trained_adapter(tmp_path, P=3, safe_serialization=False)
    assert sorted(os.listdir(directory)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    stored = torch.load(os.path.join(directory, "adapter_model.bin"), weights_only=True)
    safetensors_directory, _ = trained_adapter(tmp_path, P=3, name="safetensors")
    reference = load_file(os.path.join(safetensors_directory, "adapter_model.safetensors"))
    assert stored.keys() == reference.keys() and all(torch.equal(stored[k], reference[k]) for k in stored)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(tiny_model("qwen2"), directory, low_cpu_mem_usage=low_cpu_mem_usage)
        assert torch.equal(logits(loaded), expected)
    model = get_peft_model(tiny_model("qwen2"), ParScaleConfig(P=2, prefix_length=4))
    model.load_adapter(directory, adapter_name="from_bin")
    model.set_adapter("from_bin")
    assert torch.equal(logits(model), expected)


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "base")
    base = type(tiny_model("qwen2")).from_pretrained(tmp_path / "base")
    model = get_peft_model(base, ParScaleConfig(P=2, prefix_length=4))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))


def test_adapters_with_different_P_switch_on_one_backbone(tmp_path):
    directories = {}
    for P in (2, 4, 8):
        directories[f"p{P}"] = trained_adapter(tmp_path, P=P, name=f"p{P}", seed=P)
    model = PeftModel.from_pretrained(tiny_model("qwen2"), directories["p2"][0], adapter_name="p2")
    for name in ("p4", "p8"):
        model.load_adapter(directories[name][0], adapter_name=name)
    for name in ("p8", "p2", "p4"):
        model.set_adapter(name)
        assert torch.equal(logits(model), directories[name][1])
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(tiny_model("qwen2")))
    model.delete_adapter("p4")
    assert "p4" not in model.peft_config
    assert not any(".p4" in name for name, _ in model.named_parameters())
    model.set_adapter("p8")
    assert torch.equal(logits(model), directories["p8"][1])


def test_loading_under_a_new_name_keeps_other_adapters(tmp_path):
    directory, _ = trained_adapter(tmp_path, P=2)
    model = get_peft_model(tiny_model("qwen2"), ParScaleConfig(P=2, prefix_length=4))
    randomize_adapter(model, seed=9)
    before = adapter_state(model)
    model.load_adapter(directory, adapter_name="other")
    after = adapter_state(model)
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_one_adapter_at_a_time():
    model = get_peft_model(tiny_model("qwen2"), ParScaleConfig(P=2, prefix_length=4), adapter_name="first")
    model.add_adapter("second", ParScaleConfig(P=3, prefix_length=4))
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["first", "second"])


def test_merge_and_unload_refuse():
    model = get_peft_model(tiny_model("qwen2"), ParScaleConfig(P=2, prefix_length=4))
    for method in (model.merge_and_unload, model.base_model.unload, model.base_model.merge_adapter):
        with pytest.raises(ValueError, match="cannot be merged"):
            method()


# ---------------------------------------------------------------------------------------------------------------
# Bad input fails loudly and changes nothing


def assert_unchanged(model, adapters, state):
    assert list(model.peft_config) == adapters
    now = adapter_state(model)
    assert now.keys() == state.keys() and all(torch.equal(now[name], value) for name, value in state.items())


@pytest.mark.parametrize(
    "other_base, named",
    [
        ({"hidden_size": 64}, "hidden_size=48"),
        ({"num_hidden_layers": 3}, "num_hidden_layers=2"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=2"),
        ({"head_dim": 12}, "head_dim=8"),
    ],
)
def test_adapter_on_a_base_of_another_shape_names_the_mismatch(tmp_path, other_base, named):
    directory, _ = trained_adapter(tmp_path)
    with pytest.raises(ValueError, match=named):
        PeftModel.from_pretrained(tiny_model("qwen2", **other_base), directory)
    model = get_peft_model(tiny_model("qwen2", **other_base), ParScaleConfig(P=2, prefix_length=4))
    state = adapter_state(model)
    with pytest.raises(ValueError, match=named):
        model.load_adapter(directory, adapter_name="other")
    assert_unchanged(model, ["default"], state)


def _read(path):
    return load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)


def _write(tensors, path):
    save_file(tensors, path) if path.endswith(".safetensors") else torch.save(tensors, path)


def _truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _garbage(path):
    Path(path).write_bytes(b"\x00not an adapter file" * 10)


def _nan(path):
    tensors = _read(path)
    name = min(tensors)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    _write(tensors, path)


def _reshaped(path):
    tensors = _read(path)
    name = next(n for n in sorted(tensors) if "prefix_k" in n)
    tensors[name] = tensors[name][:, :, :3].contiguous()
    _write(tensors, path)


def _missing(path):
    tensors = _read(path)
    del tensors[max(tensors)]
    _write(tensors, path)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def _code(path):  # a pickle that would run code if loaded without weights_only
    tensors = _read(path)
    tensors["payload"] = _RunsCodeWhenUnpickled()
    torch.save(tensors, path)


DAMAGES = [_truncate, _garbage, _nan, _reshaped, _missing]


@pytest.mark.parametrize(
    "file, damage",
    [("adapter_model.safetensors", damage) for damage in DAMAGES]
    + [("adapter_model.bin", damage) for damage in [*DAMAGES, _code]],
)
def test_corrupt_adapter_file_fails_loudly_and_changes_nothing(tmp_path, file, damage):
    directory, _ = trained_adapter(tmp_path, safe_serialization=file.endswith(".safetensors"))
    damage(os.path.join(directory, file))
    with pytest.raises(ValueError, match="adapter file"):
        PeftModel.from_pretrained(tiny_model("qwen2"), directory)
    model = get_peft_model(tiny_model("qwen2"), ParScaleConfig(P=2, prefix_length=4))
    state = adapter_state(model)
    with pytest.raises(ValueError, match="adapter file"):
        model.load_adapter(directory, adapter_name="other")
    assert_unchanged(model, ["default"], state)


def test_missing_adapter_file_fails_loudly_and_changes_nothing(tmp_path):
    directory, _ = trained_adapter(tmp_path)
    os.remove(os.path.join(directory, "adapter_model.safetensors"))
    model = get_peft_model(tiny_model("qwen2"), ParScaleConfig(P=2, prefix_length=4))
    state = adapter_state(model)
    with pytest.raises(ValueError, match="no adapter to load"):
        model.load_adapter(directory, adapter_name="other")
    assert_unchanged(model, ["default"], state)


# ---------------------------------------------------------------------------------------------------------------
# Architectures


@pytest.mark.parametrize("architecture", list(REFERENCE_ARCHITECTURES))
def test_supported_architectures(architecture):
    model = get_peft_model(tiny_model(architecture), ParScaleConfig(P=2, prefix_length=4))
    assert logits(model).shape == (2, 7, VOCAB)


def test_unsupported_attention_implementation_fails_at_get_peft_model_naming_it():
    # Unsupported architectures: tests/test_architectures.py.
    untouched = tiny_model("qwen2")
    untouched.config._attn_implementation = "flash_attention_2"  # CUDA-only: set by hand to check the refusal
    before = copy.deepcopy(untouched.state_dict())
    with pytest.raises(ValueError, match="flash_attention_2"):
        get_peft_model(untouched, ParScaleConfig(P=2))
    assert untouched.state_dict().keys() == before.keys()
