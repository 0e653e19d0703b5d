"""Does the gain from more streams grow with training tokens? P = 1, 2, 4, 8 on 20 M tokens each, against a single
stream with a longer prefix and LoRA.

Each run trains one adapter on a frozen Qwen2.5-Coder-0.5B-Instruct with the package's training path
(`ParScaleSFTTrainer`, TRL's SFTTrainer) under ``accelerate launch`` (data parallel, one process per GPU), on the same
windows of real Python code in the same order, with the same batch and schedule: the installed packages' source
(`peft_parscale.data.python_packages_corpus`, split by a hash of each file's path), files joined by end-of-text
tokens into windows of 2,048 tokens. The held-out loss on windows of the *test* files is measured before training and
every ``--eval-every`` tokens, so every run has a learning curve; nothing is chosen from it.

Runs are named after their arm (`arms.parse_arm`): ``P<n>`` (ParScale with the recycling defaults: text-initialised
prefixes of T = ``--prefix-length``, learning rate ``--learning-rate`` 5e-2, smoothing 0.1), ``P<n>T<t>`` (prefix
length t: ``P1T192`` has P=4's prefix count), ``lora`` (PEFT's LoRA, r = ``--lora-rank`` on every linear layer of the
decoder), each with an optional ``@<learning rate>``; ``base`` is the model without an adapter. LoRA has no default
rate: ``lora@<rate>`` or ``--lora-learning-rate``.

**How a learning rate is chosen.** ``--prepare`` also builds validation windows from the files in neither split (the
corpus's ``validation`` hash buckets), and every run ends by measuring its loss on them (``validation_loss`` in
result.json). A grid is a set of short runs under a tag, with ``--eval-every 0`` so that they never evaluate on the
held-out windows; ``--report`` lists each arm's grid with its validation losses and names the lowest, and that rate
is the one the full run is named with:

    python experiments/stream_sweep.py ... --runs lora@2e-4 lora@6e-4 lora@2e-3 --train-tokens 2523136 \
        --eval-every 0 --tag grid                                                      # then --report
    python experiments/stream_sweep.py ... --runs lora@6e-4                            # the lowest, at 20 M tokens

``--side-by-side N`` trains up to N runs at once on one GPU, each in its own process (its output in
OUTPUT/logs/<run>.log), so that one run's loading and compiling overlap the others' training. Each segment records
how many runs shared the GPU (``gpu_shared_by``) and which GPU it ran on, and the report gives speeds only from
segments that ran alone on the GPU the run ended on. A run
trained side by side computes what it would compute alone: the same windows, order, batch and schedule. After a
failed run no new one starts; the call fails once the others have ended.

A run whose time runs out (``--time-limit``, for machines lent for a few minutes at a time) saves a checkpoint
(adapter, optimizer, scheduler, random states) and the next invocation resumes it; a finished run writes
``OUTPUT/<run>/result.json`` and is skipped afterwards. ``--tag`` names variants of a run (a grid, another number of
processes, ``--max-steps``, float32, ``--accelerate-config fsdp2``): ``--tag fp32-2gpu`` names them
``P8-fp32-2gpu``, ... The report (`sweep_results.py`) fits the final held-out loss in ln P over the ``P<n>`` runs at
the default prefix length and rate; every other arm is a row and a learning curve beside them.

    python experiments/stream_sweep.py --gguf qwen.gguf --prepare                      # the windows, once
    python experiments/stream_sweep.py --gguf qwen.gguf --runs base P1 P8 P2 P4 --num-processes 2 --time-limit 540
    python experiments/stream_sweep.py --gguf qwen.gguf --runs lora@2e-4 lora@6e-4 lora@2e-3 --side-by-side 3 ...
    python experiments/stream_sweep.py --report                                        # table, fits, curves
    python experiments/stream_sweep.py --smoke                                         # tiny model, CPU, a minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from arms import arm_learning_rate, arm_peft_config, parse_arm
from common import (
    add_model_arguments,
    device_name,
    leading_packed_windows,
    model_path,
    packages_corpus,
    run_side_by_side,
    start_in_own_session,
)
from datasets import Dataset
from sweep_results import WINDOW_LOSSES, compare_adapters, report, write_result
from trainer_clock import StepClock, StopAtDeadline
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig
from window_losses import window_losses

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale.sft import ParScaleSFTTrainer

WINDOW_SETS = ("heldout", "validation")  # the windows every finished run is scored on, one loss per window
# the window sets --prepare builds: name -> (corpus split, the argument giving their tokens)
WINDOWS = {
    "train": ("train", "train_tokens"),
    "heldout": ("test", "heldout_tokens"),
    "validation": ("validation", "validation_tokens"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, model_cache="sweep-model")
    parser.add_argument("--output-dir", default="sweep-output")
    parser.add_argument(
        "--runs", nargs="*", default=["base", "P1", "P8", "P2", "P4"], help="base, P<n>, P<n>T<t>, lora, with @<rate>"
    )
    parser.add_argument(
        "--tag", type=run_suffix, default="", help="a variant's name: --tag fp32 names its runs P8-fp32, ..."
    )
    parser.add_argument("--num-processes", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument(
        "--side-by-side", type=int, default=1, metavar="N", help="train up to N runs at once on the one GPU (or CPU)"
    )
    parser.add_argument("--gpu-shared-by", type=int, default=1, help=argparse.SUPPRESS)  # recorded by the workers
    parser.add_argument("--accelerate-config", help="an accelerate config file or TRL's name for one (fsdp2)")
    parser.add_argument("--train-tokens", type=int, default=616 * 16 * 2048, help="training tokens per adapter")
    parser.add_argument("--heldout-tokens", type=int, default=256 * 2048, help="held-out tokens (whole windows)")
    parser.add_argument("--validation-tokens", type=int, default=256 * 2048, help="validation tokens (whole windows)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=77 * 16 * 2048,
        help="training tokens between held-out evaluations; 0: none (grid runs: validation loss only)",
    )
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (speed checks)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step, all processes")
    parser.add_argument("--stream-sequences", type=int, default=16, help="P × sequences per forward pass, per GPU")
    parser.add_argument("--prefix-length", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=5e-2, help="ParScale runs without @<rate>")
    parser.add_argument("--lora-learning-rate", type=float, help="LoRA runs without @<rate> (no default)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--float32", action="store_true", help="float32 weights, no autocast (1-vs-2-GPU check)")
    parser.add_argument(
        "--optim", default="adamw_torch_fused", choices=["adamw_torch_fused", "adamw_torch", "sgd"], help="optimizer"
    )
    parser.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW's epsilon")
    parser.add_argument(
        "--parity-bound",
        type=float,
        default=1e-3,
        help="--compare: a tensor whose difference exceeds this share of its movement is reported (SGD runs)",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="keep the decoder layers eager")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each decoder layer's forward pass in the backward pass (TRL's default, which this sweep took "
        "until 2026-12-06: the same values, more time, less memory)",
    )
    parser.add_argument("--time-limit", type=float, help="seconds from now; runs checkpoint and stop by then")
    parser.add_argument(
        "--launch-margin", type=float, default=120, help="start no run with less time left (loading and compiling)"
    )
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # the absolute time, for the workers
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the run this process trains, under accelerate launch
    parser.add_argument("--prepare", action="store_true", help="only build the windows")
    parser.add_argument("--report", action="store_true", help="only gather the results")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="only compare these runs' adapters with the first")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and the stdlib, on the CPU")
    argv = sys.argv[1:] if argv is None else argv
    for flag, value in itertools.pairwise(argv):
        if flag == "--tag" and value.startswith("-") and not value.startswith("--"):  # argparse reads it as a flag
            parser.error(f"write the tag without its dash: --tag {value[1:]} names the runs P8{value}, ...")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.batch_size, args.prefix_length = 32, 4, 4
        args.stream_sequences = args.stream_sequences if "--stream-sequences" in argv else 8
        args.train_tokens, args.heldout_tokens, args.validation_tokens = 6 * 4 * 32, 8 * 32, 8 * 32
        args.eval_every = 2 * 4 * 32 if args.eval_every else 0
        args.runs = args.runs if "--runs" in argv else ["base", "P1", "P2", "P4", "P1T8", "lora@1e-3"]
    for name in args.runs:
        check_run(parser, args, name)
    if args.side_by_side < 1 or (args.side_by_side > 1 and args.num_processes > 1):
        parser.error("--side-by-side N (N >= 1) trains runs side by side on one device: use it with --num-processes 1")
    if not torch.cuda.is_available():
        args.compile = False
    return args


def check_run(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> None:
    """Refuse a run the sweep cannot train, before anything is prepared or launched."""
    try:
        arm = parse_arm(name)
    except ValueError as error:
        parser.error(f"--runs {name}: {error}")
    if name.endswith("@best"):
        parser.error(
            f"--runs {name}: the sweep names its rates: choose one by a grid's validation loss (--report) and run "
            f"{name.removesuffix('@best')}@<rate>"
        )
    if arm.diversity_weight is not None:
        parser.error(f"--runs {name}: the sweep trains no stream-diversity term (+div); humaneval_experiment.py does")
    try:
        if arm.kind != "base":
            arm_learning_rate(arm, args.learning_rate, args.lora_learning_rate)
    except ValueError as error:
        parser.error(f"--runs {name}: {error}")


def run_suffix(tag: str) -> str:
    """What ``--tag`` adds to the run names: the tag after a dash (``fp32`` gives ``P8-fp32``; ``-fp32``, as
    ``--tag=-fp32`` was written before tags took no dash, gives the same)."""
    name = tag.removeprefix("-")
    if not name:
        return ""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise argparse.ArgumentTypeError(f"{tag!r}: a tag is letters, digits, '.', '_' and '-' (it names folders)")
    return f"-{name}"


def prepare(args: argparse.Namespace, tokenizer) -> dict:
    """Training, held-out and validation windows in OUTPUT/data (`WINDOWS`), built once and read by every process of
    every run; OUTPUT/data/corpus.json says what they hold. Data prepared before the validation windows existed gets
    them added, from the same corpus (the same files in each split, or a clear error)."""
    data = Path(args.output_dir) / "data"
    summary = json.loads((data / "corpus.json").read_text()) if (data / "corpus.json").is_file() else {}
    missing = [part for part in WINDOWS if f"{part}_windows" not in summary]
    if not missing:
        return summary
    corpus = packages_corpus(args)
    files = {split: len(corpus[split]) for split in corpus}
    if summary and (summary.get("heldout_split") != "test" or summary["files"] != files):
        raise ValueError(
            f"{data} was prepared from other files ({summary['files']}, held out: {summary.get('heldout_split')}) "
            f"than this corpus has ({files}): rerun --prepare with a new --output-dir"
        )
    for part in missing:
        split, tokens = WINDOWS[part]
        windows = leading_packed_windows(corpus[split], tokenizer, args.seq_len, getattr(args, tokens))
        windows.save_to_disk(str(data / part))
        summary |= {f"{part}_windows": len(windows), f"{part}_tokens": len(windows) * args.seq_len}
    summary |= {"files": files, "heldout_split": "test", "validation_split": "validation"}
    (data / "corpus.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_windows(args: argparse.Namespace, part: str) -> Dataset:
    path = Path(args.output_dir) / "data" / part
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: rerun --prepare (with the same --output-dir)")
    return Dataset.load_from_disk(str(path))


def run_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.output_dir) / f"{name}{args.tag}"


def sweep_config(args: argparse.Namespace, out: Path, num_streams: int, learning_rate: float) -> SFTConfig:
    """The same global batch and schedule for every arm and number of processes: each process runs at most
    ``stream_sequences`` stream rows per forward pass (one stream for LoRA) and accumulates gradients up to its share
    of the batch."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % processes:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of {processes} processes")
    share = args.batch_size // processes
    micro_batch = max(1, min(share, args.stream_sequences // num_streams))
    while share % micro_batch:
        micro_batch -= 1
    steps = args.train_tokens // (args.batch_size * args.seq_len)
    eval_steps = max(1, args.eval_every // (args.batch_size * args.seq_len))
    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=share // micro_batch,
        learning_rate=learning_rate,
        optim=args.optim,
        adam_epsilon=args.adam_epsilon,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        max_length=args.seq_len,
        eval_strategy="steps" if args.eval_every else "no",
        eval_steps=eval_steps,
        logging_steps=max(1, eval_steps // 4),
        save_strategy="no",  # checkpoints are written when the time runs out (`StopAtDeadline`)
        report_to="none",
        seed=0,
        bf16=on_gpu and not args.float32,
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,  # every adapter weight has a gradient (P = 1 has no aggregator)
        # TRL turns it on unless told otherwise. The frozen backbone's step is a forward and an input-gradient backward
        # of about the forward's FLOPs, so recomputing the forward adds about half again; a 0.5B model's activations
        # fit without it
        gradient_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0,
        # The windows are token ids of exactly `seq_len`: nothing to tokenise, add or truncate, and TRL's passes over
        # 20 M tokens would cost every launch (and every process) a minute.
        dataset_kwargs={"skip_prepare_dataset": True},
    )


def train_worker(args: argparse.Namespace, name: str) -> None:
    """One process of a run under ``accelerate launch``; process 0 writes the results."""
    clock = StepClock()
    arm = parse_arm(name)
    rate = arm_learning_rate(arm, args.learning_rate, args.lora_learning_rate)
    out = run_dir(args, name)
    path = model_path(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, heldout, validation = (load_windows(args, part) for part in WINDOWS)
    training_args = sweep_config(args, out, arm.P or 1, rate)
    training_args.seed = arm.seed
    if args.max_steps:
        training_args.max_steps = args.max_steps
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    # one trainer for every arm: with a LoraConfig, ParScaleSFTTrainer is TRL's SFTTrainer unchanged, which seeds
    # PEFT's initialisation of A (B starts at zero) with the run's seed, the same in every process and run
    trainer = ParScaleSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
        args=training_args,
        train_dataset=train,
        eval_dataset=heldout if args.eval_every else None,
        processing_class=tokenizer,
        peft_config=arm_peft_config(arm, args.prefix_length, args.smoothing, args.lora_rank),
        callbacks=[StopAtDeadline(args.deadline), clock],
    )
    # Regional compilation: one graph serves every decoder layer; attention keeps sdpa's kernels. ParScale's prefixes
    # and LoRA's low-rank layers live inside the decoder layers, so they are compiled with them.
    if args.compile:
        for layer in trainer.model.get_base_model().model.layers:
            layer.compile()
    main = trainer.accelerator.is_main_process
    checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
    if checkpoint is None and main:
        trainer.model.save_pretrained(str(out / "initial_adapter"))  # what training moved the adapter from
    # The held-out loss at step 0, evaluated inside train(): `trainer.evaluate()` before train() would leave several
    # processes without DistributedDataParallel (`peft_parscale.sft.check_data_parallel_wrapping`).
    trainer.args.eval_on_start = checkpoint is None and args.max_steps is None and bool(args.eval_every)
    trainer.train(resume_from_checkpoint=checkpoint)
    if main:
        segment = {
            **clock.segment(),
            "resumed_from": checkpoint,
            "gpu_shared_by": args.gpu_shared_by,
            # a segment without this key trained with it on (TRL's default, before the sweep set it)
            "gradient_checkpointing": training_args.gradient_checkpointing,
        }
        segment["device"] = device_name()  # a run resumed in a later session may land on another kind of GPU
        (out / f"segment-{segment['first_step']}.json").write_text(json.dumps(segment))
    state = trainer.state
    if state.global_step < state.max_steps:
        return  # out of time: the checkpoint is saved, and the next invocation resumes
    if args.eval_every and not any(
        log.get("step") == state.global_step and "eval_loss" in log for log in state.log_history
    ):
        trainer.evaluate()
    # the loss learning rates are chosen by: on files in neither the training nor the held-out split
    validation_loss = trainer.evaluate(eval_dataset=validation, metric_key_prefix="validation")["validation_loss"]
    trainer.save_model(str(out / "adapter"))
    if main:
        if args.eval_every and args.max_steps is None:  # grids and --max-steps runs stay off the held-out windows
            # the trainer's own batch, so that compiled decoder layers reuse the graphs its evaluations made
            write_window_losses(args, trainer.model, out, training_args.per_device_eval_batch_size)
        write_result(args, arm, name, rate, out, trainer, validation_loss)
    trainer.accelerator.wait_for_everyone()


def write_window_losses(args: argparse.Namespace, model, out: Path, batch_size: int) -> dict[str, list[float]]:
    """Each held-out and validation window's loss under `model`, in OUTPUT/<run>/window_losses.json, from which the
    report compares arms window by window (`window_losses.py`)."""
    losses = {part: window_losses(model, load_windows(args, part)["input_ids"], batch_size) for part in WINDOW_SETS}
    out.mkdir(parents=True, exist_ok=True)
    (out / WINDOW_LOSSES).write_text(json.dumps(losses))
    return losses


def base_loss(args: argparse.Namespace) -> None:
    """The frozen model's held-out and validation losses on the same windows: the mean of its window losses, which is
    the token mean the trainer's evaluation computes (every window has the same number of tokens)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and not args.float32 else torch.float32
    out = run_dir(args, "base")
    model = AutoModelForCausalLM.from_pretrained(model_path(args), dtype=dtype).to(device)
    losses = write_window_losses(args, model, out, batch_size=8)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs train in processes of their own, on the same GPU
    result = {
        "name": "base" + args.tag,
        "arm": "base",
        "kind": "base",
        "P": None,
        "heldout_loss": sum(losses["heldout"]) / len(losses["heldout"]),
        "validation_loss": sum(losses["validation"]) / len(losses["validation"]),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


def launch(args: argparse.Namespace, name: str, argv: list[str], log: Path | None) -> subprocess.Popen:
    """Start training one run under ``accelerate launch`` (torchrun for several processes, also on the CPU: gloo), its
    output to `log` (None: this process's), in a session of its own; return its process."""
    if args.accelerate_config:
        from trl.cli.accelerate_config import resolve_accelerate_config_argument

        flags = resolve_accelerate_config_argument(["--accelerate_config", args.accelerate_config])
    else:
        flags = ["--multi_gpu"] if args.num_processes > 1 else []
    if args.float32:
        flags += ["--mixed_precision", "no"]  # TRL's configs ask for bf16
    flags += ["--main_process_port", "0"]  # a free port: two runs on one machine never meet on the default 29500
    command = [
        *[sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", str(args.num_processes)],
        *[
            str(Path(__file__).resolve()),
            *argv,
            "--worker",
            name,
            *(["--deadline", str(args.deadline)] if args.deadline else []),
            *["--gpu-shared-by", str(args.gpu_shared_by)],
        ],
    ]
    environment = dict(os.environ)
    if 0 < torch.cuda.device_count() != args.num_processes and "CUDA_VISIBLE_DEVICES" not in environment:
        # One process seeing several GPUs would get `nn.DataParallel` from the Trainer, which ParScale refuses.
        environment["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in range(args.num_processes))
    return start_in_own_session(command, log, environment)


def launch_side_by_side(args: argparse.Namespace, names: list[str], argv: list[str]) -> None:
    """Train `names` up to ``--side-by-side`` at a time, each under its own ``accelerate launch`` (`run_side_by_side`);
    none is started with less than ``--launch-margin`` seconds left, nor after a run has failed. Raises once all
    have ended if one failed. A run that is still going at the deadline checkpoints at its own."""
    args.gpu_shared_by = max(1, min(args.side_by_side, len(names)))
    logs = Path(args.output_dir) / "logs"
    if args.side_by_side > 1:
        logs.mkdir(parents=True, exist_ok=True)
    tagged = {f"{name}{args.tag}": name for name in names}  # the jobs are named as their output folders are
    outcome = run_side_by_side(
        list(tagged),
        lambda job: launch(args, tagged[job], argv, logs / f"{job}.log" if args.side_by_side > 1 else None),
        args.side_by_side,
        too_late_to_start=lambda: bool(args.deadline) and time.time() > args.deadline - args.launch_margin,
        stop_after_failure=True,
    )
    if outcome.failed:
        where = f"; see {logs}" if args.side_by_side > 1 else ""
        raise RuntimeError(f"runs failed: {', '.join(outcome.failed)}{where}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.worker:
        train_worker(args, args.worker)
        # Leave the process group before exiting: torn down at interpreter exit instead, its threads abort a process
        # now and then ("terminate called without an active exception"), after its work is done.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return
    if args.compare:
        compare_adapters(output, args.compare, args.parity_bound)
        return
    if not args.report:
        if args.time_limit is not None:
            args.deadline = time.time() + args.time_limit
        tokenizer = AutoTokenizer.from_pretrained(model_path(args))
        print(json.dumps(prepare(args, tokenizer)), flush=True)
        if args.prepare:
            return
        # each run once (a name given twice would train twice, over its own files)
        to_train = [name for name in dict.fromkeys(args.runs) if not (run_dir(args, name) / "result.json").is_file()]
        if "base" in to_train:  # no training: scored first, alone on the device
            to_train.remove("base")
            if args.deadline and time.time() > args.deadline - args.launch_margin:
                print(f"not starting base{args.tag}: too little time left", flush=True)
            else:
                base_loss(args)
        launch_side_by_side(args, to_train, argv)
    report(output, args.prefix_length, args.learning_rate)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
