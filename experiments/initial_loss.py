"""Where does a fresh text-initialised adapter start? Its validation loss against the base model's, with and without a
document boundary at the end of each stream's text (issue 22).

A fresh adapter with ``prefix_init="text"`` is the base model reading each stream's text just before the input (P=1),
or the average of P such readings (P > 1). Read with no boundary between them, the model takes an arbitrary training
window for the beginning of the input's own document, and a fresh adapter starts above the base model (the recycling
ablation: 1.3479 against 1.3254). This script measures that start on validation files, each window the beginning of
a file, for three kinds of stream text:

- ``window``: the first T tokens of training window p (what ``ParScaleSFTTrainer`` starts stream p from);
- ``window+boundary``: its first T - 1 tokens, then the end-of-text token;
- ``file-end+boundary``: the last T - 1 tokens of training file p, then the end-of-text token (a document's end, as
  the model saw documents joined in pre-training).

Training windows are the training files in the order of a hash of their path, joined by the end-of-text token (as the
recycling ablation built them). The loss is scored on every token of each validation window but the first; its
standard error comes from the per-window differences to the base model (every window has the same length).

    python experiments/initial_loss.py --output results/initial-loss/qwen2.5-coder-0.5b-instruct-cpu.json
    python experiments/initial_loss.py --smoke --output /tmp/initial-loss.json   # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from common import add_model_arguments, leading_files, model_path, packages_corpus  # experiments/ is on the path
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig, init_prefixes_from_token_ids
from peft_parscale.data import packed_windows
from peft_parscale.eval import sequence_nll
from peft_parscale.precision import cpu_has_native_bf16

TEXT_KINDS = ("window", "window+boundary", "file-end+boundary")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, model_cache=None)
    parser.add_argument("--output", required=True, help="the JSON file of raw results")
    parser.add_argument("--P", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prefix-length", type=int, default=48)
    parser.add_argument("--windows", type=int, default=64, help="validation windows, each a file's beginning")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per validation window")
    parser.add_argument("--boundary", default="<|endoftext|>", help="the document boundary token")
    parser.add_argument("--batch-size", type=int, default=4, help="validation windows per forward pass")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and the stdlib (CI)")
    args = parser.parse_args(argv)
    args.output_dir = str(Path(args.output).parent)  # where --smoke makes its tiny model
    if args.smoke:
        args.P, args.windows, args.seq_len, args.prefix_length = [1, 2], 4, 16, 4
    return args


def stream_texts(train_ids: list[list[int]], boundary: int, prefix_length: int, num_streams: int) -> dict:
    """For each kind of text (`TEXT_KINDS`), the token ids of streams 0..P-1."""
    windows = packed_windows(train_ids, boundary, 2048)  # the ablation's training windows
    file_ends = [ids[-(prefix_length - 1) :] for ids in train_ids if len(ids) >= prefix_length - 1]
    return {
        "window": [window[:prefix_length] for window in windows[:num_streams]],
        "window+boundary": [window[: prefix_length - 1] + [boundary] for window in windows[:num_streams]],
        "file-end+boundary": [ids + [boundary] for ids in file_ends[:num_streams]],
    }


def window_losses(model, windows: list[list[int]], batch_size: int, desc: str) -> list[float]:
    """Mean next-token loss of each window."""
    nll, counts = sequence_nll(model, windows, [1] * len(windows), batch_size, progress=False, desc=desc)
    return [total / count for total, count in zip(nll, counts)]


def summarise(losses: list[float], base: list[float]) -> dict:
    differences = [loss - reference for loss, reference in zip(losses, base)]
    return {
        "loss": statistics.fmean(losses),
        "minus_base": statistics.fmean(differences),
        "minus_base_standard_error": statistics.stdev(differences) / len(differences) ** 0.5,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    started = time.time()
    path, corpus = model_path(args), packages_corpus(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    boundary = tokenizer.eos_token_id if args.smoke else tokenizer.convert_tokens_to_ids(args.boundary)
    _, train_ids = leading_files(corpus["train"], tokenizer, 2048 * max(args.P) + 10_000)
    windows, tokens = [], args.windows * args.seq_len
    while len(windows) < args.windows:  # the first files (hash order) of at least seq_len tokens
        _, validation_ids = leading_files(corpus["validation"], tokenizer, tokens)
        windows = [ids[: args.seq_len] for ids in validation_ids if len(ids) >= args.seq_len][: args.windows]
        tokens *= 2
    bf16 = cpu_has_native_bf16() and not args.smoke
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = stream_texts(train_ids, boundary, args.prefix_length, max(args.P))
    results: dict = {"per_window": {}, "summary": {}}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        base = window_losses(model, windows, args.batch_size, "base")
        results["per_window"]["base"] = base
        results["summary"]["base"] = {"loss": statistics.fmean(base)}
        adapted = None
        for kind in TEXT_KINDS:
            for num_streams in args.P:
                name = f"{kind} P={num_streams}"
                config = ParScaleConfig(P=num_streams, prefix_length=args.prefix_length)
                if adapted is None:
                    adapted = get_peft_model(model, config, adapter_name=name)
                else:  # one backbone, one adapter per setting
                    adapted.add_adapter(name, config)
                    adapted.set_adapter(name)
                init_prefixes_from_token_ids(adapted, texts[kind][:num_streams], name)
                losses = window_losses(adapted, windows, max(1, args.batch_size // num_streams), name)
                results["per_window"][name] = losses
                results["summary"][name] = summarise(losses, base)
                print(name, json.dumps(results["summary"][name]), flush=True)
    results["settings"] = {
        "model": str(path),
        "windows": len(windows),
        "seq_len": args.seq_len,
        "prefix_length": args.prefix_length,
        "boundary": tokenizer.convert_ids_to_tokens(boundary),
        "autocast_bf16": bf16,
        "stream_texts": {kind: [tokenizer.decode(ids) for ids in streams] for kind, streams in texts.items()},
    }
    results["environment"] = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "seconds": round(time.time() - started),
    }
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
