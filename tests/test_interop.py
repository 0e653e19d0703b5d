"""Interop with the released ParScale checkpoints (model_type qwen2_parscale): import, export, refusals, CLI.

No machine running these tests reaches the Hub, so the released-format checkpoints are built here by hand from the
format's description (names, shapes, config fields). Imported adapters are checked against `reference.py`'s plain
forward fed with the *released* tensors under their released names, so a wrong mapping in the import shows.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from reference import (
    assert_logits_match,
    left_padded_batch,
    positions_from_mask,
    randomize_adapter,
    reference_greedy,
    reference_logits,
)
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import peft_parscale  # noqa: F401  (registers the PEFT type)
from peft_parscale import ParScaleConfig
from peft_parscale.cli import main as parscale
from peft_parscale.interop import export_official, import_official

NUM_STREAMS, PREFIX_LENGTH, SMOOTHING = 4, 48, 0.01  # T and ε of the released checkpoints
NEW_TOKENS = 20
AGGREGATOR_PARTS = ("0.weight", "0.bias", "2.weight", "2.bias")


# ----------------------------------------------------------------------------------------------------------------
# the released format, written from its description


def released_parscale_names(num_layers: int) -> list[str]:
    prefixes = [f"model.layers.{i}.self_attn.prefix_{kind}" for i in range(num_layers) for kind in ("k", "v")]
    return prefixes + [f"model.aggregate_layer.{part}" for part in AGGREGATOR_PARTS]


def released_checkpoint(num_streams=NUM_STREAMS, dtype=torch.float32, seed=0):
    """(backbone, tensors, config) of a released-format checkpoint: a tiny Qwen2 with a tied head (as Qwen2.5-3B),
    random prefixes and aggregator. The backbone model holds exactly the stored values, in float32, for the reference.
    """
    backbone = tiny_model("qwen2", seed=seed, tie_word_embeddings=True)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.copy_(parameter.to(dtype).float())
    config = backbone.config
    hidden, kv_heads, layers = config.hidden_size, config.num_key_value_heads, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    tensors = {name: parameter.detach().to(dtype) for name, parameter in backbone.named_parameters()}  # head tied
    generator = torch.Generator().manual_seed(seed + 100)

    def random(*shape, scale):
        return (torch.randn(shape, generator=generator) * scale).to(dtype)

    if num_streams > 1:
        for i in range(layers):
            for kind in ("k", "v"):
                tensors[f"model.layers.{i}.self_attn.prefix_{kind}"] = random(
                    num_streams, kv_heads, PREFIX_LENGTH, head_dim, scale=0.5
                )
        # Scaled so that the aggregation weights are neither uniform nor one-hot.
        tensors["model.aggregate_layer.0.weight"] = random(hidden, num_streams * hidden, scale=0.1)
        tensors["model.aggregate_layer.0.bias"] = random(hidden, scale=0.1)
        tensors["model.aggregate_layer.2.weight"] = random(num_streams, hidden, scale=0.3)
        tensors["model.aggregate_layer.2.bias"] = random(num_streams, scale=0.3)
    released_config = {  # field names of the released configs (transformers 4.x)
        "architectures": ["Qwen2ParScaleForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
            "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM",
        },
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "max_window_layers": layers,
        "model_type": "qwen2_parscale",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "parscale_attn_smooth": SMOOTHING,
        "parscale_n": num_streams,
        "parscale_n_tokens": PREFIX_LENGTH,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": config.rope_parameters["rope_theta"],
        "sliding_window": config.max_position_embeddings,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.51.3",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": config.vocab_size,
    }
    return backbone, tensors, released_config


def write_checkpoint(directory: Path, tensors: dict, config: dict, shards: int = 2) -> None:
    """Write safetensors weights (sharded in file order with an index, as transformers does) and config.json."""
    directory.mkdir(parents=True)
    names = list(tensors)  # prefixes sit beside their layer's weights, the aggregator at the end
    weight_map = {}
    for index in range(shards):
        file = "model.safetensors" if shards == 1 else f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = names[index * len(names) // shards : (index + 1) * len(names) // shards]
        save_file({name: tensors[name].contiguous() for name in part}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))


def reference_adapter(tensors: dict, num_layers: int) -> dict:
    """The reference's adapter, read from the released tensors by their released names."""

    def get(name):
        return tensors[name].float()

    return {
        "prefix_k": [get(f"model.layers.{i}.self_attn.prefix_k") for i in range(num_layers)],
        "prefix_v": [get(f"model.layers.{i}.self_attn.prefix_v") for i in range(num_layers)],
        "aggregator": [get(f"model.aggregate_layer.{part}") for part in AGGREGATOR_PARTS],
        "smoothing": SMOOTHING,
    }


def read_tensors(directory: Path) -> dict:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def load_imported(result, dtype=torch.float32):
    base = AutoModelForCausalLM.from_pretrained(result.base_dir, dtype=dtype)  # no remote code
    return PeftModel.from_pretrained(base, result.adapter_dir).eval()


def logits_of(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)
        ).logits


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    """A float32 released checkpoint with P=2, for the tests that only need one."""
    directory = tmp_path_factory.mktemp("released") / "ParScale-tiny-P2"
    _, tensors, config = released_checkpoint(num_streams=2)
    write_checkpoint(directory, tensors, config)
    return directory


# ----------------------------------------------------------------------------------------------------------------
# import of a hand-built released checkpoint, against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_imported_checkpoint_matches_reference_on_released_tensors(tmp_path, dtype):
    backbone, tensors, config = released_checkpoint(dtype=dtype)
    write_checkpoint(tmp_path / "released", tensors, config)
    result = import_official(tmp_path / "released", tmp_path / "imported")

    base_config = json.loads((result.base_dir / "config.json").read_text())
    assert base_config["model_type"] == "qwen2" and base_config["architectures"] == ["Qwen2ForCausalLM"]
    assert "auto_map" not in base_config and not any(key.startswith("parscale_") for key in base_config)
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (result.base_dir / name).read_text() == (tmp_path / "released" / name).read_text()
    stored = read_tensors(result.base_dir) | read_tensors(result.adapter_dir)
    assert {tensor.dtype for tensor in stored.values()} == {dtype}  # stored dtype kept

    model = load_imported(result, dtype=torch.float64)  # compared in float64: see reference.LOGIT_TOLERANCE
    backbone = backbone.double()
    num_layers = backbone.config.num_hidden_layers
    adapter = reference_adapter(tensors, num_layers)
    input_ids, attention_mask = left_padded_batch([7, 3, 5])
    logits = logits_of(model, input_ids, attention_mask)
    for row, mask in enumerate(attention_mask):
        tokens = input_ids[row][mask.bool()]
        assert_logits_match(logits[row][mask.bool()], reference_logits(backbone, tokens, adapter))
    # The comparison can tell a wrong mapping: ParScale moves these logits, and so does reading the aggregator's input
    # stream-major ((n h)) instead of hidden-major ((h n)).
    tokens = input_ids[0]
    plain = reference_logits(backbone, tokens, None)
    w1 = adapter["aggregator"][0]
    hidden = w1.shape[0]
    stream_major = w1.view(hidden, NUM_STREAMS, hidden).transpose(1, 2).reshape(hidden, -1)
    permuted = reference_logits(backbone, tokens, {**adapter, "aggregator": [stream_major, *adapter["aggregator"][1:]]})
    assert (logits[0] - plain).abs().max() > 0.5
    assert (logits[0] - permuted).abs().max() > 1e-2

    input_ids, attention_mask = left_padded_batch([6, 3], seed=3)
    with torch.no_grad():
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    for row, mask in enumerate(attention_mask):
        tokens = reference_greedy(backbone, input_ids[row][mask.bool()], adapter, NEW_TOKENS)
        assert torch.equal(generated[row, -NEW_TOKENS:], tokens[-NEW_TOKENS:])


# ----------------------------------------------------------------------------------------------------------------
# export, then import: a round trip


def test_export_then_import_round_trip(tmp_path):
    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base", max_shard_size="100KB")  # sharded: export copies every shard
    assert len(list((tmp_path / "base").glob("*.safetensors"))) == 2
    model = get_peft_model(copy.deepcopy(base), ParScaleConfig(P=3, prefix_length=5, smoothing=0.05))
    randomize_adapter(model)  # the aggregator's zero-initialised output layer included
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    adapter_tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter_tensors["base_model.model.model.streams.parscale_aggregator.2.weight"].abs().min() > 0

    export_official(tmp_path / "base", tmp_path / "adapter", tmp_path / "released")
    config = json.loads((tmp_path / "released" / "config.json").read_text())
    assert config["model_type"] == "qwen2_parscale"
    assert config["architectures"] == ["Qwen2ParScaleForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
        "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM",
    }
    assert (config["parscale_n"], config["parscale_n_tokens"], config["parscale_attn_smooth"]) == (3, 5, 0.05)
    assert config["rope_theta"] == base.config.rope_parameters["rope_theta"]  # the name the authors' code reads
    assert not list((tmp_path / "released").glob("*.py"))
    released = read_tensors(tmp_path / "released")
    backbone = base.state_dict()
    assert set(released) == set(backbone) | set(released_parscale_names(2))
    hidden, kv_heads = base.config.hidden_size, base.config.num_key_value_heads
    head_dim = hidden // base.config.num_attention_heads
    assert released["model.layers.1.self_attn.prefix_v"].shape == (3, kv_heads, 5, head_dim)
    assert released["model.aggregate_layer.0.weight"].shape == (hidden, 3 * hidden)
    assert released["model.aggregate_layer.2.weight"].shape == (3, hidden)

    # The exported tensors, read by their released names, compute what the adapter computes.
    input_ids, attention_mask = left_padded_batch([6, 2, 4])
    logits = logits_of(model, input_ids, attention_mask)
    adapter = {**reference_adapter(released, 2), "smoothing": 0.05}
    logits64, base64 = logits_of(copy.deepcopy(model).double(), input_ids, attention_mask), copy.deepcopy(base).double()
    for row, mask in enumerate(attention_mask):
        expected = reference_logits(base64, input_ids[row][mask.bool()], adapter)
        assert_logits_match(logits64[row][mask.bool()], expected)

    result = import_official(tmp_path / "released", tmp_path / "imported")
    for original, imported in (
        (read_tensors(tmp_path / "base"), read_tensors(result.base_dir)),
        (adapter_tensors, read_tensors(result.adapter_dir)),
    ):
        assert set(imported) == set(original)
        for name, tensor in original.items():
            assert imported[name].dtype == tensor.dtype and torch.equal(imported[name], tensor), name
    saved, imported_config = model.peft_config["default"], result.config
    assert (imported_config.P, imported_config.prefix_length, imported_config.smoothing) == (3, 5, 0.05)
    assert imported_config.base_shape == saved.base_shape
    assert torch.equal(logits_of(load_imported(result), input_ids, attention_mask), logits)


# ----------------------------------------------------------------------------------------------------------------
# refusals


def test_refuses_what_is_not_a_released_parscale_checkpoint(tmp_path, released_dir):
    config = json.loads((released_dir / "config.json").read_text())
    _, tensors, _ = released_checkpoint(num_streams=2)
    write_checkpoint(tmp_path / "plain", tensors, {**config, "model_type": "qwen2"})
    with pytest.raises(ValueError, match="not a released ParScale checkpoint: its model_type is 'qwen2'"):
        import_official(tmp_path / "plain", tmp_path / "out")
    with pytest.raises(ValueError, match="config.json does not exist"):
        import_official(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_p1_checkpoint(tmp_path):
    _, tensors, config = released_checkpoint(num_streams=1)
    write_checkpoint(tmp_path / "p1", tensors, config, shards=1)
    with pytest.raises(ValueError, match="Nothing to import: .* P=1 qwen2_parscale checkpoint is a plain Qwen2 model"):
        import_official(tmp_path / "p1", tmp_path / "out")


def test_refuses_a_sliding_window_configuration(tmp_path):
    # The released checkpoints have no window, and the authors' code under one was never checked against this package.
    _, tensors, config = released_checkpoint(num_streams=2)
    config = {**config, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}
    write_checkpoint(tmp_path / "windowed", tensors, config)
    with pytest.raises(ValueError, match="unsupported Qwen2 configuration: sliding-window layers"):
        import_official(tmp_path / "windowed", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_misshapen_tensor_and_names_it(tmp_path):
    _, tensors, config = released_checkpoint(num_streams=2)
    tensors["model.layers.1.self_attn.prefix_k"] = tensors["model.layers.1.self_attn.prefix_k"][:, :, 1:]
    write_checkpoint(tmp_path / "bad", tensors, config)
    expected = r"model\.layers\.1\.self_attn\.prefix_k has shape \(2, 2, 47, 8\), expected \(2, 2, 48, 8\)"
    with pytest.raises(ValueError, match=expected):
        import_official(tmp_path / "bad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_base_reports_the_first_mismatch(tmp_path, released_dir):
    backbone, _, _ = released_checkpoint(num_streams=2)  # the same backbone as `released_dir`
    backbone.save_pretrained(tmp_path / "base")
    result = import_official(released_dir, tmp_path / "out", write_base=False, verify_base=tmp_path / "base")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["adapter"] and result.base_dir is None
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "base").resolve())

    with torch.no_grad():
        backbone.model.layers[1].mlp.up_proj.weight[3, 5] += 0.25
    backbone.save_pretrained(tmp_path / "changed")
    message = r"model\.layers\.1\.mlp\.up_proj\.weight differs \(float32, shape \(96, 48\)\): max abs difference 0\.25"
    with pytest.raises(ValueError, match=message + ", 1 of 4608 values differ"):
        import_official(released_dir, tmp_path / "out2", write_base=False, verify_base=tmp_path / "changed")
    backbone.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with pytest.raises(ValueError, match="is float32 in SRC and bfloat16 in BASE .max abs difference"):
        import_official(released_dir, tmp_path / "out2", verify_base=tmp_path / "bf16")
    assert not (tmp_path / "out2").exists()

    # A lossless dtype difference is not a mismatch: a float32 copy of a bfloat16 checkpoint's backbone matches it.
    backbone, tensors, config = released_checkpoint(num_streams=2, dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "released_bf16", tensors, config)
    backbone.save_pretrained(tmp_path / "float32_copy")
    import_official(tmp_path / "released_bf16", tmp_path / "out3", verify_base=tmp_path / "float32_copy")


def test_output_is_refused_when_not_empty_and_never_half_written(tmp_path, released_dir, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        import_official(released_dir, tmp_path / "out")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]
    import_official(released_dir, tmp_path / "out", overwrite=True)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["adapter", "base"]

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("peft_parscale.interop.shutil.copyfile", full_disk)  # fails after the adapter is written
    with pytest.raises(OSError, match="No space left"):
        import_official(released_dir, tmp_path / "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no `new`, no leftover staging directory


def test_export_refuses_p1_non_qwen2_and_mismatched_bases(tmp_path):
    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    get_peft_model(copy.deepcopy(base), ParScaleConfig(P=1, prefix_length=4)).save_pretrained(tmp_path / "p1")
    get_peft_model(copy.deepcopy(base), ParScaleConfig(P=2, prefix_length=4)).save_pretrained(tmp_path / "p2")
    with pytest.raises(ValueError, match="A P=1 adapter cannot be exported: the released format has no ParScale"):
        export_official(tmp_path / "base", tmp_path / "p1", tmp_path / "out")
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="Qwen2-only; BASE has model_type 'llama'"):
        export_official(tmp_path / "llama", tmp_path / "p2", tmp_path / "out")
    tiny_model("qwen2", hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"built for a base model with hidden_size=48 \(BASE has 32\)"):
        export_official(tmp_path / "small", tmp_path / "p2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize("command", ["import-official", "export-official"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parscale([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: parscale {command}" in capsys.readouterr().out


def test_cli_export_then_import_with_verification(tmp_path, capsys):
    base = tiny_model("qwen2")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), ParScaleConfig(P=2, prefix_length=4))
    model.save_pretrained(tmp_path / "adapter")
    code_files = []
    for name in ("configuration_qwen2_parscale.py", "modeling_qwen2_parscale.py"):
        (tmp_path / name).write_text(f"# stands for the authors' {name}\n")
        code_files.append(str(tmp_path / name))
    released, imported = str(tmp_path / "released"), str(tmp_path / "imported")
    arguments = ["export-official", str(tmp_path / "base"), str(tmp_path / "adapter"), released]
    assert parscale([*arguments, "--modeling-files", *code_files]) == 0
    assert sorted(path.name for path in Path(released).glob("*.py")) == sorted(Path(path).name for path in code_files)
    arguments = ["import-official", released, imported, "--no-base", "--verify-base", str(tmp_path / "base")]
    assert parscale([*arguments, "--base-model-name-or-path", "tiny/qwen2"]) == 0
    assert "matches the backbone" in capsys.readouterr().out
    adapter_config = json.loads((tmp_path / "imported" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny/qwen2" and adapter_config["P"] == 2

    assert parscale(["import-official", released, imported]) == 1  # exists, not empty
    assert parscale(["import-official", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("parscale import-official: error: ") for line in errors)
    assert "not empty" in errors[0] and "is not a directory" in errors[1]
