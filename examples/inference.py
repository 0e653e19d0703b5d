"""Serve several ParScale adapters from one backbone: load it once, attach adapters with different P, switch per request.

An adapter is a few MB to a few tens of MB next to a backbone of GBs, so one process can hold many and pick one per
request; ``set_adapter`` only changes which prefixes and aggregator the next forward pass uses.

    python examples/inference.py                                   # the quickstart's adapters on its base model
    python examples/inference.py --model Qwen/Qwen2.5-0.5B --adapters p2=DIR_A p4=DIR_B p8=DIR_C
    python examples/inference.py --smoke                           # a tiny random model with fresh P=2/4/8 adapters
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig
from peft_parscale.pretrained import QWEN2_5_CODER_0_5B_INSTRUCT, load_causal_lm, load_tokenizer
from peft_parscale.testing import temporary_tiny_checkpoint

REQUESTS = [  # (adapter, prompts): each request is one batch, served with one adapter
    ("p2", ["def fibonacci(n):\n", "import json\n\ndef load(path):\n"]),
    ("p8", ["class Stack:\n    def __init__(self):\n"]),
    ("p4", ["def quicksort(items):\n", "def gcd(a, b):\n"]),
    ("base", ["def fibonacci(n):\n"]),
]


def fresh_adapters(model_path: Path, directory: Path) -> dict[str, str]:
    """Untrained P=2/4/8 adapters for the smoke run (their outputs are the base model's plus random prefixes)."""
    adapters = {}
    for P in (2, 4, 8):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), ParScaleConfig(P=P, prefix_length=4))
        model.save_pretrained(directory / f"p{P}")
        adapters[f"p{P}"] = str(directory / f"p{P}")
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model: Hub id or local path (default: the quickstart's)")
    parser.add_argument("--adapters", nargs="+", metavar="NAME=DIR", help="default: quickstart-output/P*/")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and fresh adapters (CI)")
    args = parser.parse_args()

    if args.smoke:
        model_name = temporary_tiny_checkpoint()
        adapters = fresh_adapters(model_name, model_name.parent)  # removed with it
    else:  # the adapters are checked before the model is loaded (or converted, the first time)
        found = args.adapters or [f"p{d.name[1:]}={d}" for d in sorted(Path("quickstart-output").glob("P*"))]
        if not found:
            parser.error("no adapters: pass --adapters NAME=DIR ..., or run examples/quickstart.py first")
        adapters = dict(item.split("=", 1) for item in found)
        missing = [path for path in adapters.values() if not Path(path, "adapter_config.json").is_file()]
        if missing:
            parser.error(f"no adapter (adapter_config.json) in {', '.join(missing)}")
        model_name = args.model or QWEN2_5_CODER_0_5B_INSTRUCT.hub_id  # its packaged copy, as in the quickstart

    tokenizer = load_tokenizer(model_name, padding_side="left")  # left padding for batched generation
    base = load_causal_lm(model_name)
    (first_name, first_dir), *others = adapters.items()
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first_name)
    for name, directory in others:
        model.load_adapter(directory, adapter_name=name)
    for name, config in model.peft_config.items():
        print(f"adapter {name}: P={config.P}, T={config.prefix_length}")

    for adapter, prompts in REQUESTS:
        if adapter != "base" and adapter not in adapters:
            continue
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        started = time.perf_counter()
        with torch.no_grad():
            if adapter == "base":
                with model.disable_adapter():  # exactly the backbone
                    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            else:
                model.set_adapter(adapter)
                output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - started
        print(f"\n=== request served by {adapter} ({len(prompts)} prompt(s), {seconds:.2f} s)")
        for prompt, row in zip(prompts, output):
            print(prompt + tokenizer.decode(row[inputs["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
