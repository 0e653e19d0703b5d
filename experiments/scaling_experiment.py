"""Do more streams help? Recycle a frozen Qwen2.5-Coder-0.5B-Instruct with P = 1, 2, 4, 8 on equal token budgets.

For each P it trains a ParScale adapter with TRL's SFTTrainer on Python source (the interpreter's standard library,
split by file; P = 1 is the prefix-only baseline with the same prefix length), on exactly the same token windows in
the same order, then reloads the saved adapter and measures:

- held-out loss on the held-out files (``peft_parscale.eval.heldout_loss``);
- HumanEval pass@1, greedy, in completion and in chat mode, and pass@1/pass@10 from 10 samples per problem at
  temperature 0.8 in completion mode (``peft_parscale.humaneval``);
- trainable parameters, training tokens and time.

The base model without an adapter is the reference row. The report fits the per-P losses to loss = a − b·ln P
(``peft_parscale.scaling_law.fit_log_linear``) and plots loss and pass@1 against P. Every model's results are written
to ``OUTPUT/<name>/result.json`` as soon as they exist and a rerun skips them, so the work can be split over several
sessions (``--models``); ``--report`` only gathers them.

    python experiments/scaling_experiment.py --save-corpus corpus/          # the stdlib corpus, split, as jsonl.gz
    python experiments/scaling_experiment.py --corpus corpus/ --output-dir runs/scaling      # one GPU, ~40 minutes
    python experiments/scaling_experiment.py --gguf /tmp/q/model.gguf --models base P1 --corpus corpus/ ...
    python experiments/scaling_experiment.py --smoke                        # a tiny random model on the CPU, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import (
    DTYPE,
    add_model_arguments,
    device_name,
    equal_budget_config,
    model_path,
    plot_against_streams,
    pyplot,
    versions,
)
from datasets import Dataset, DatasetDict, load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from trl import SFTTrainer

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig
from peft_parscale.data import packed_windows, python_stdlib_corpus
from peft_parscale.eval import heldout_loss, load_model
from peft_parscale.humaneval import evaluate_humaneval, load_problems
from peft_parscale.prefix_init import document_boundary
from peft_parscale.scaling_law import fit_log_linear


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, model_cache=None)
    parser.add_argument("--corpus", help="folder with train.jsonl.gz and test.jsonl.gz (default: this Python's stdlib)")
    parser.add_argument("--save-corpus", metavar="DIR", help="write the stdlib corpus to DIR and exit")
    parser.add_argument("--models", nargs="+", default=["base", "P1", "P2", "P4", "P8"], help="what to run")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per training and evaluation window")
    parser.add_argument("--train-tokens", type=int, help="training tokens per adapter (default: one pass of the data)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--stream-sequences", type=int, default=8, help="P × sequences per forward pass (memory)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--prefix-length", type=int, default=48)
    parser.add_argument("--compile", action="store_true", help="compile each decoder layer for training (GPU)")
    parser.add_argument("--samples", type=int, default=10, help="HumanEval samples per problem for pass@10 (0: skip)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--generation-rows", type=int, default=2048, help="P × sequences generated together")
    parser.add_argument("--output-dir", default="scaling-output")
    parser.add_argument("--report", action="store_true", help="only gather the results into the report")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, 3 toy problems (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.batch_size, args.stream_sequences, args.prefix_length = 32, 2, 2, 4
        args.train_tokens, args.samples, args.max_new_tokens = 4 * 2 * 32, 2, 8
    return args


def load_corpus(args: argparse.Namespace) -> DatasetDict:
    if args.corpus:
        files = {split: str(Path(args.corpus) / f"{split}.jsonl.gz") for split in ("train", "test")}
        return load_dataset("json", data_files=files)
    corpus = python_stdlib_corpus()
    if args.smoke:
        return DatasetDict({split: corpus[split].select(range(4)) for split in corpus})
    return corpus


def train_adapter(args, path, tokenizer, windows: Dataset, num_streams: int, out: Path) -> dict:
    training_args = equal_budget_config(args, out, num_streams, args.learning_rate)
    steps = training_args.max_steps
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE),
        args=training_args,
        train_dataset=windows,
        processing_class=tokenizer,
        peft_config=ParScaleConfig(P=num_streams, prefix_length=args.prefix_length),
    )
    if args.compile:  # regional compilation: one graph for every layer; the attention keeps sdpa's flash kernel
        for layer in trainer.model.get_base_model().model.layers:
            layer.compile()
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    trainer.save_model(str(out / "adapter"))
    tokens = steps * args.batch_size * args.seq_len
    return {
        "train_tokens": tokens,
        "train_seconds": seconds,
        "train_tokens_per_s": tokens / seconds,
        "train_steps": steps,
        "train_loss_curve": [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log],
    }


def evaluate(args, model: PreTrainedModel, tokenizer, heldout_texts: list[str]) -> dict:
    problems = load_problems()[: 3 if args.smoke else None]
    streams = model.active_peft_config.P if isinstance(model, PeftModel) else 1
    batch = max(1, args.generation_rows // streams)
    common = {"max_new_tokens": args.max_new_tokens, "batch_size": batch, "problems": problems}
    results = {
        "heldout": heldout_loss(model, tokenizer, heldout_texts, args.seq_len, batch_size=max(1, 8 // streams)),
        "completion_greedy": evaluate_humaneval(model, tokenizer, "completion", **common),
        "chat_greedy": evaluate_humaneval(model, tokenizer, "chat", **common),
    }
    if args.samples > 1:
        results["completion_sampled"] = evaluate_humaneval(
            model, tokenizer, "completion", num_samples=args.samples, k=(1, args.samples), temperature=0.8, **common
        )
    return results


def run_model(args, name: str, path, tokenizer, corpus: DatasetDict, windows: Dataset) -> None:
    out = Path(args.output_dir) / name
    if (out / "result.json").is_file():
        print(f"{name}: done already ({out / 'result.json'})")
        return
    result: dict = {"name": name, "P": None}
    if name != "base":
        result["P"] = int(name.removeprefix("P"))
        train_file = out / "train.json"  # a rerun after an interrupted evaluation does not train again
        if not train_file.is_file():
            train_file.write_text(json.dumps(train_adapter(args, path, tokenizer, windows, result["P"], out)))
        result |= json.loads(train_file.read_text())
    # the adapter is evaluated as saved, loaded the way `parscale eval` loads it
    model, _ = load_model(path, out / "adapter" if name != "base" else None, DTYPE)
    if name != "base":
        result["adapter_config"] = json.loads((out / "adapter" / "adapter_config.json").read_text())
    result["trainable_parameters"] = sum(p.numel() for n, p in model.named_parameters() if "parscale_" in n)
    started = time.time()
    result |= evaluate(args, model, tokenizer, list(corpus["test"]["text"]))
    result["eval_seconds"] = time.time() - started
    result["device"] = device_name()
    result["versions"] = versions()
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: loss {result['heldout']['loss']:.4f}, pass@1 {result['completion_greedy']['pass@1']:.3f}")


def scores(result: dict) -> dict:
    """The headline figures of one model's result."""
    sampled = result.get("completion_sampled")
    return {
        "loss": result["heldout"]["loss"],
        "completion_pass@1": result["completion_greedy"]["pass@1"],
        "chat_pass@1": result["chat_greedy"]["pass@1"],
        "sampled_pass@1": sampled["pass@1"] if sampled else None,
        "sampled_pass@k": sampled[f"pass@{sampled['num_samples']}"] if sampled else None,
        "samples": sampled["num_samples"] if sampled else None,
    }


def report(args) -> dict:
    """Gather every result.json into results.json (without the samples), a Markdown table and a plot."""
    output = Path(args.output_dir)
    results = [json.loads(path.read_text()) for path in sorted(output.glob("*/result.json"))]
    results.sort(key=lambda result: result["P"] or 0)
    rows = [
        {key: result.get(key) for key in ("name", "P", "trainable_parameters", "train_tokens", "train_seconds")}
        | scores(result)
        for result in results
    ]
    adapters = [row for row in rows if row["P"]]
    summary: dict = {"rows": rows, "adapter_configs": {r["name"]: r.get("adapter_config") for r in results if r["P"]}}
    if len({row["P"] for row in adapters}) >= 2:
        fit = fit_log_linear([row["P"] for row in adapters], [row["loss"] for row in adapters])
        summary["log_linear_fit"] = {"a": fit.intercept, "b": fit.slope, "r2": fit.r2}
    header = (
        "| model | trainable parameters | training tokens | training time | held-out loss | HumanEval pass@1, "
        "completion | pass@1, chat | pass@1 / pass@10, sampled (completion) |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        trained = row["P"] is not None
        name = f"P={row['P']}" if trained else "base (no adapter)"
        tokens = f"{row['train_tokens']:,}" if trained else "-"
        seconds = f"{row['train_seconds']:.0f} s" if trained else "-"
        sampled = f"{row['sampled_pass@1']:.3f} / {row['sampled_pass@k']:.3f}" if row["samples"] else "not run"
        lines.append(
            f"| {name} | {row['trainable_parameters'] or 0:,} | {tokens} | {seconds} | {row['loss']:.4f} "
            f"| {row['completion_pass@1']:.3f} | {row['chat_pass@1']:.3f} | {sampled} |"
        )
    summary["table"] = "\n".join(lines)
    (output / "results.json").write_text(json.dumps(summary, indent=1))
    (output / "results.md").write_text(summary["table"] + "\n")
    plot(rows, output / "streams.png")
    print(summary["table"])
    if "log_linear_fit" in summary:
        print("loss = {a:.4f} − {b:.4f}·ln P (R² {r2:.3f})".format(**summary["log_linear_fit"]))
    return summary


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    adapters = [row for row in rows if row["P"]]
    base = next((row for row in rows if row["P"] is None), None)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, keys, label in (
        (axes[0], ["loss"], "held-out loss"),
        (axes[1], ["completion_pass@1", "chat_pass@1"], "HumanEval pass@1 (greedy)"),
    ):
        for key in keys:
            line = axis.plot([row["P"] for row in adapters], [row[key] for row in adapters], "o-", label=key)[0]
            if base is not None:
                axis.axhline(base[key], color=line.get_color(), linestyle=":", label=f"{key}, base")
        axis.set(ylabel=label)
    plot_against_streams(figure, axes, [row["P"] for row in adapters], "P (streams)", path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.save_corpus:
        for split, dataset in python_stdlib_corpus().items():
            dataset.to_json(Path(args.save_corpus) / f"{split}.jsonl.gz", compression="gzip")
        return
    if not args.report:
        path = model_path(args)
        tokenizer = AutoTokenizer.from_pretrained(path)
        corpus = load_corpus(args)
        token_ids = tokenizer(list(corpus["train"]["text"]), add_special_tokens=False)["input_ids"]
        # files joined by the document boundary, which was the tokenizer's EOS token when these runs were made
        # (`common.leading_packed_windows` says why it no longer is)
        boundary = document_boundary(tokenizer)
        windows = Dataset.from_dict({"input_ids": packed_windows(token_ids, boundary, args.seq_len)})
        args.train_tokens = args.train_tokens or len(windows) * args.seq_len
        print(f"{len(windows)} training windows of {args.seq_len} tokens; {args.train_tokens:,} tokens per adapter")
        for name in args.models:
            run_model(args, name, path, tokenizer, corpus, windows)
    report(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
