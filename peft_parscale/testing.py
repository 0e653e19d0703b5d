"""Tiny models and a tiny tokenizer for smoke runs and tests: no download, built in a second.

The quickstart's ``--smoke`` mode, the benchmarks' tiny mode and the test suite run the same code paths as real runs
on these, so that CI (no GPU, no network) exercises them end to end.

Example::

    from peft_parscale.testing import save_tiny_checkpoint, temporary_tiny_checkpoint

    path = save_tiny_checkpoint("/tmp/tiny-qwen2")     # a random Qwen2 of ~60k parameters with its tokenizer
    model = AutoModelForCausalLM.from_pretrained(path)
    path = temporary_tiny_checkpoint()                 # the same, in a directory removed when the process exits
"""

from __future__ import annotations

import atexit
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII, newline, tab, and four special tokens) with a chat template.

    A model for it needs ``vocab_size=len(tokenizer)``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    characters = [chr(code) for code in range(32, 127)] + ["\n", "\t"]
    vocabulary = {token: index for index, token in enumerate(specials + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=specials[1:3],
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_checkpoint(directory: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random Qwen2 causal LM and ``tiny_tokenizer()`` to ``directory``, loadable like any checkpoint."""
    tokenizer = tiny_tokenizer()
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{**config, **config_overrides}))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def temporary_tiny_checkpoint(**config_overrides) -> Path:
    """`save_tiny_checkpoint` in a new temporary directory, removed (with anything else written there) when the
    process exits: for smoke runs, which leave nothing behind."""
    scratch = tempfile.TemporaryDirectory(prefix="parscale-tiny-")
    atexit.register(scratch.cleanup)
    return save_tiny_checkpoint(Path(scratch.name) / "tiny-qwen2", **config_overrides)


def save_letter_rows(path: str | os.PathLike, rows: int = 64, length: int = 40, seed: int = 0) -> Path:
    """Write a JSON-lines training file of `rows` texts of `length` random letters, spaces and newlines (``{"text":
    ...}`` per line), for smoke trainings of a tiny checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    alphabet = "abcdefghijk \n"
    with open(path, "w") as file:
        for _ in range(rows):
            letters = torch.randint(len(alphabet), (length,), generator=generator)
            file.write(json.dumps({"text": "".join(alphabet[i] for i in letters)}) + "\n")
    return Path(path)
