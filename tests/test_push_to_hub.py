"""Pushing to the Hub: what a ParScale adapter's push uploads, recorded by a local stand-in for the Hub's API.

No network is needed: ``hub_recorder.RecordingHub`` answers on 127.0.0.1, and the ``hub`` fixture points
huggingface_hub (and transformers' cached ``HfApi``) at it with a fake token.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers.utils.hub
import yaml
from datasets import Dataset
from hub_recorder import RecordingHub
from huggingface_hub import constants, hf_api
from peft import PeftModel, get_peft_model
from reference import randomize_adapter
from safetensors.torch import load as load_safetensors
from tiny_models import VOCAB, tiny_model, tiny_tokenizer
from trl import SFTConfig

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig
from peft_parscale.model_card import SECTION_END, SECTION_START
from peft_parscale.sft import ParScaleSFTTrainer

TOKEN = "hf_fake"
BASE_ID = "user/tiny-base"  # what from_pretrained would have recorded; the card names it
INPUT_IDS = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A ``RecordingHub`` that huggingface_hub and transformers talk to, with a fake token; no other endpoint."""
    with RecordingHub(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(variable, raising=False)
        # huggingface_hub reads these into constants when it is imported, before this fixture runs
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # a README lookup caches a miss
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)
        # transformers keeps one HfApi, with the endpoint it saw first: drop it so that the next one is built here
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
        yield server


def named_tiny_model(**overrides):
    """``tiny_model`` as if loaded from the Hub repository BASE_ID (PEFT and TRL read the name from the model)."""
    model = tiny_model(**overrides)
    model.name_or_path = model.config.name_or_path = BASE_ID
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def uploaded(hub: RecordingHub, repo_id: str) -> dict[str, bytes]:
    assert repo_id in hub.files, f"nothing committed to {repo_id}; requests: {hub.requests}, unhandled: {hub.unhandled}"
    return hub.files[repo_id]


def assert_uploaded_weights_are_the_adapter(files: dict[str, bytes], model) -> dict[str, torch.Tensor]:
    """The uploaded safetensors hold exactly the trainable weights, named without the adapter name ("default")."""
    tensors = load_safetensors(files["adapter_model.safetensors"])
    expected = {
        name.replace(".default", ""): parameter.detach()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    assert tensors.keys() == expected.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, expected[name]), name
    return tensors


def front_matter(readme: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", readme, re.DOTALL)
    assert match, f"README.md has no YAML metadata block:\n{readme[:300]}"
    return yaml.safe_load(match[1])


def assert_parscale_section(readme: str, P: int, prefix_length: int, tensors: dict[str, torch.Tensor]) -> None:
    """One ParScale section, whose table gives P, T and the uploaded weights' count, with a runnable snippet."""
    sections = re.findall(re.escape(SECTION_START) + "(.*?)" + re.escape(SECTION_END), readme, re.DOTALL)
    assert len(sections) == 1, f"expected one ParScale section in README.md, found {len(sections)}:\n{readme}"
    section = sections[0]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|") and not line.startswith("| ---")
    ]
    assert len(rows) == 2, rows  # header and values
    table = dict(zip(*rows))
    assert table["streams P"] == str(P)
    assert table["prefix length T"] == str(prefix_length)
    assert table["adapter parameters"] == f"{sum(tensor.numel() for tensor in tensors.values()):,}"
    snippets = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(snippets) == 1
    assert snippets[0].splitlines()[0].startswith("import peft_parscale")
    assert f'from_pretrained("{BASE_ID}")' in snippets[0]


def push_tiny_adapter(hub: RecordingHub, repo_id: str = "user/tiny-parscale"):
    model = get_peft_model(named_tiny_model(), ParScaleConfig(P=2, prefix_length=4))
    randomize_adapter(model)
    model.push_to_hub(repo_id)
    return model, uploaded(hub, repo_id)


def test_push_uploads_the_adapter_config_and_weights_which_reload_to_identical_logits(hub, tmp_path):
    model, files = push_tiny_adapter(hub)

    assert [(repo["organization"], repo["name"]) for repo in hub.created_repos] == [("user", "tiny-parscale")]
    assert [(commit.repo_id, commit.revision) for commit in hub.commits] == [("user/tiny-parscale", "main")]
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert hub.commits[0].other_operations == []  # every file came inline: no LFS pointer, no deletion
    config = json.loads(files["adapter_config.json"])
    assert (config["peft_type"], config["P"], config["prefix_length"]) == ("PARSCALE", 2, 4)
    assert_uploaded_weights_are_the_adapter(files, model)

    directory = tmp_path / "downloaded"
    directory.mkdir()
    for name, content in files.items():
        (directory / name).write_bytes(content)
    reloaded = PeftModel.from_pretrained(named_tiny_model(), directory)
    assert torch.equal(logits(reloaded), logits(model))
    assert not torch.allclose(logits(reloaded), logits(tiny_model()), atol=1e-3)  # the adapter changes the output


def test_push_uploads_a_model_card_with_the_parscale_section(hub):
    _, files = push_tiny_adapter(hub)

    readme = files["README.md"].decode()
    metadata = front_matter(readme)
    assert metadata.get("library_name") == "peft", metadata
    assert "parscale" in metadata.get("tags", []), metadata
    assert metadata.get("base_model") == BASE_ID, metadata
    assert_parscale_section(readme, P=2, prefix_length=4, tensors=load_safetensors(files["adapter_model.safetensors"]))


def test_sft_trainer_push_uploads_trl_card_with_the_parscale_section(hub, tmp_path):
    tokenizer = tiny_tokenizer()
    texts = ["def add(a, b):\n    return a + b\n", "print('hello, world')\n", "x = [i * i for i in range(9)]\n"]
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=3,
        max_length=64,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        push_to_hub=True,
        hub_model_id="user/tiny-parscale-sft",
    )
    trainer = ParScaleSFTTrainer(
        model=named_tiny_model(vocab_size=len(tokenizer)),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=ParScaleConfig(P=2, prefix_length=4),
    )
    trainer.train()
    trainer.push_to_hub()
    files = uploaded(hub, "user/tiny-parscale-sft")

    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files)
    assert "model.safetensors" not in files  # the frozen base model is not uploaded
    assert json.loads(files["adapter_config.json"])["peft_type"] == "PARSCALE"
    tensors = assert_uploaded_weights_are_the_adapter(files, trainer.model)
    readme = files["README.md"].decode()
    metadata = front_matter(readme)
    assert {"trl", "sft", "parscale"} <= set(metadata.get("tags", [])), metadata
    assert metadata.get("library_name") == "peft", metadata
    assert "trained using [TRL]" in readme  # TRL's own card is kept, with the section added to it
    assert_parscale_section(readme, P=2, prefix_length=4, tensors=tensors)
