"""The HumanEval experiment's data folder (``--data``): HumanEval-shaped function pairs from real code
(`peft_parscale.function_pairs`, which holds out the files of the first hash buckets), the next buckets' files taken
as validation pairs, all written as json lines with the run's environment in ``stats.json``, and read back in the
training format.

    prepare(args)                       # once: OUTPUT/data/{train,validation,test}.jsonl and stats.json
    train_pairs = read_pairs(args, "train")
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import chain
from pathlib import Path

from common import environment
from datasets import Dataset

from peft_parscale.data import path_bucket, python_packages_corpus, python_stdlib_corpus
from peft_parscale.function_pairs import as_conversations, function_pairs

SMOKE_FILES = 120  # stdlib files read in smoke runs


def prepare(args: argparse.Namespace) -> None:
    """Write the training, validation and held-out pairs to ``--data`` once (a folder with ``stats.json`` is done)."""
    if (args.data / "stats.json").is_file():
        print(f"prepare: done already ({args.data})")
        return
    started = time.time()
    if args.smoke:
        corpora = [python_stdlib_corpus()["train"].select(range(SMOKE_FILES))]
    else:
        corpora = [*python_stdlib_corpus().values(), *python_packages_corpus().values()]
    pairs, stats = function_pairs(chain(*corpora), heldout_percent=args.heldout_percent)
    # the files in the next hash buckets after the held-out ones give the validation pairs (as in the corpora)
    validation_buckets = range(args.heldout_percent, args.heldout_percent + args.validation_percent)
    in_validation = [path_bucket(path) in validation_buckets for path in pairs["train"]["path"]]
    pairs["validation"] = pairs["train"].select([i for i, flag in enumerate(in_validation) if flag])
    pairs["train"] = pairs["train"].select([i for i, flag in enumerate(in_validation) if not flag])
    stats["validation"], stats["train"] = len(pairs["validation"]), len(pairs["train"])
    args.data.mkdir(parents=True, exist_ok=True)
    for split, rows in pairs.items():
        write_jsonl(args.data / f"{split}.jsonl", rows)
    summary = {"stats": stats, "python": sys.version.split()[0], "seconds": time.time() - started, **environment()}
    (args.data / "stats.json").write_text(json.dumps(summary, indent=1))
    print(f"prepare: {stats['train']} training and {stats['test']} held-out pairs -> {args.data}")


def write_jsonl(path: Path, rows: Dataset) -> None:
    """One JSON object per row."""
    with path.open("w") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


def read_pairs(args: argparse.Namespace, split: str) -> Dataset:
    """A split of the prepared pairs in the training format (json lines read directly: no `datasets` cache)."""
    path = args.data / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `--only prepare` (with the same --data) first")
    with path.open() as file:
        rows = [json.loads(line) for line in file]
    pairs = Dataset.from_list([{"prompt": row["prompt"], "completion": row["completion"]} for row in rows])
    return as_conversations(pairs) if args.train_format == "chat" else pairs
