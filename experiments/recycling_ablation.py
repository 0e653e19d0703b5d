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

    CUDA_VISIBLE_DEVICES=0 python experiments/recycling_ablation.py --runs ... --shard 0/2 &
    CUDA_VISIBLE_DEVICES=1 python experiments/recycling_ablation.py --runs ... --shard 1/2 &
    python experiments/recycling_ablation.py --report --output-dir OUTPUT
    python experiments/recycling_ablation.py --smoke       # a tiny random model on the CPU, under a minute
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from common import (
    add_model_arguments,
    device_name,
    equal_budget_config,
    leading_files,
    leading_packed_windows,
    model_path,
    packages_corpus,
    versions,
)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig
from peft_parscale.eval import heldout_loss
from peft_parscale.sft import ParScaleSFTTrainer

RUN_NAME = re.compile(r"(?P<init>random|text)-lr(?P<lr>[0-9.e-]+)-P(?P<P>\d+)(?:-eps(?P<eps>[0-9.]+))?")
NAME_SMOOTHING = 0.01  # the smoothing of a name without -eps: the package default when the ablation ran


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, model_cache="ablation-model")
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


def prepared_data(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, list[str]]:
    """The training windows and validation files, built once into OUTPUT/data (``--prepare``) and read by every run,
    so that every process trains on the same windows."""
    data = Path(args.output_dir) / "data"
    if not (data / "validation.json").is_file():
        corpus = packages_corpus(args)
        windows = leading_packed_windows(corpus["train"], tokenizer, args.seq_len, args.train_tokens)
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
        "device": device_name(),
        "versions": versions(),
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
        path = model_path(args)
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
