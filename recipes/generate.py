"""Writes the recipes in this directory: Qwen2.5 0.5B/1.5B/3B/7B (base and Instruct) x P in {2, 4, 8} x two uses.

The YAML files are what users pass to `parscale sft --config`; this script is how they were sized, so that the rules
live in one place (a test checks that the committed files are its output). Rerun it after changing a rule:

    python recipes/generate.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SEQUENCE_LENGTH = 2048
GLOBAL_BATCH = 64  # sequences per optimizer step for every size and P, so runs compare at equal tokens (131k/step)

# Per model: the hardware it is sized for, and how many stream-sequences (P x per-device batch) one device holds at
# 2048 tokens with gradient checkpointing in bf16 (weights + the checkpointed hidden states of every stream).
SIZES = {
    "0.5B": {"gpus": 1, "streams_per_device": 64},
    "1.5B": {"gpus": 1, "streams_per_device": 32},
    "3B": {"gpus": 8, "streams_per_device": 16},
    "7B": {"gpus": 8, "streams_per_device": 8},
}
USES = {
    # The paper's Section 4.2: recycle a pre-trained model by training only the ParScale weights on Python code.
    "code": {
        "variant": "",
        "title": "continual pre-training on Python code with the backbone frozen (the paper's Section 4.2 use)",
        "settings": {
            "dataset_name": "codeparrot/codeparrot-clean",
            "dataset_streaming": True,
            "dataset_text_field": "content",
            "packing": True,
            "packing_strategy": "bfd_split",
            "max_steps": 2000,
            "save_steps": 500,
        },
    },
    # Chat SFT of an Instruct model, loss on the assistant turns only.
    "chat": {
        "variant": "-Instruct",
        "title": "chat SFT on Capybara conversations, loss on assistant turns only",
        "settings": {
            "dataset_name": "trl-lib/Capybara",
            "assistant_only_loss": True,
            "packing": True,
            "num_train_epochs": 1,
            "save_strategy": "epoch",
        },
    },
}
STREAMS = (2, 4, 8)


def recipe(size: str, use: str, P: int) -> tuple[str, str]:
    sizing, purpose = SIZES[size], USES[use]
    per_device = max(1, sizing["streams_per_device"] // P)
    accumulation = max(1, GLOBAL_BATCH // (per_device * sizing["gpus"]))
    model = f"Qwen/Qwen2.5-{size}{purpose['variant']}"
    name = f"qwen2.5-{size.lower()}{purpose['variant'].lower()}-{use}-p{P}"
    hardware = f"{sizing['gpus']}x H100 80GB" if sizing["gpus"] > 1 else "1x H100 80GB"
    launch = f" --num_processes {sizing['gpus']}" if sizing["gpus"] > 1 else ""
    header = (
        f"# ParScale P={P} on {model}: {purpose['title']}.\n"
        f"# Sized for {hardware} (bf16): {per_device} sequence(s) x {P} streams x {SEQUENCE_LENGTH} tokens per device,\n"
        f"# {GLOBAL_BATCH} sequences per optimizer step. Not run here at this scale: see recipes/README.md.\n"
        f"# parscale sft --config recipes/{name}.yaml{launch}\n"
    )
    settings = {
        "model_name_or_path": model,
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "peft": "parscale",
        "P": P,
        "prefix_length": 48,
        "prefix_init": "text",  # from the training data; see recipes/README.md
        "smoothing": 0.1,
        **purpose["settings"],
        "max_length": SEQUENCE_LENGTH,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": 5.0e-2,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,  # a float below 1 is a fraction of the run (transformers 5)
        "bf16": True,
        "gradient_checkpointing": True,
        "logging_steps": 10,
        "output_dir": name.replace(f"-{use}-", f"-parscale-{use}-"),
    }
    return name, header + yaml.safe_dump(settings, sort_keys=False)


def all_recipes() -> dict[str, str]:
    return dict(recipe(size, use, P) for size in SIZES for use in USES for P in STREAMS)


if __name__ == "__main__":
    for name, text in all_recipes().items():
        (HERE / f"{name}.yaml").write_text(text)
