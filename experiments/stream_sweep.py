"""Does the gain from more streams grow with training tokens? P = 1, 2, 4, 8 on 20 M tokens each, on several GPUs.

Each run trains one ParScale adapter on a frozen Qwen2.5-Coder-0.5B-Instruct with the package's training path
(`ParScaleSFTTrainer`, TRL's SFTTrainer) under ``accelerate launch`` (data parallel, one process per GPU), with the
recycling defaults (text-initialised prefixes, learning rate 5e-2, smoothing 0.1), on the same windows of real
Python code in the same order: the installed packages' source (`peft_parscale.data.python_packages_corpus`, split
by a hash of each file's path), files joined by end-of-text tokens into windows of 2,048 tokens. The held-out loss
on windows of the *test* files is measured before training and every ``--eval-every`` tokens, so every P has a
learning curve; nothing is chosen from it.

Runs are named ``P1``, ``P2``, ... (``base`` is the model without an adapter). A run whose time runs out
(``--time-limit``, for machines lent for a few minutes at a time) saves a checkpoint (adapter, optimizer, scheduler,
random states) and the next invocation resumes it; a finished run writes ``OUTPUT/<run>/result.json`` and is
skipped afterwards. ``--tag`` names variants of a run (another number of processes, ``--max-steps``, float32,
``--accelerate-config fsdp2``), used for the speed and 1-vs-2-GPU checks: ``--tag fp32-2gpu`` names them
``P8-fp32-2gpu``, ...

    python experiments/stream_sweep.py --gguf qwen.gguf --prepare                      # the windows, once
    python experiments/stream_sweep.py --gguf qwen.gguf --runs base P1 P8 P2 P4 --num-processes 2 --time-limit 540
    python experiments/stream_sweep.py --report                                        # table, fits, curves
    python experiments/stream_sweep.py --smoke                                         # tiny model, CPU, a minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import add_model_arguments, leading_packed_windows, model_path, packages_corpus, pyplot
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig
from peft_parscale.scaling_law import PAPER_STACK_V2_PYTHON, fit_log_linear
from peft_parscale.sft import ParScaleSFTTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, model_cache="sweep-model")
    parser.add_argument("--output-dir", default="sweep-output")
    parser.add_argument("--runs", nargs="*", default=["base", "P1", "P8", "P2", "P4"])
    parser.add_argument(
        "--tag", type=run_suffix, default="", help="a variant's name: --tag fp32 names its runs P8-fp32, ..."
    )
    parser.add_argument("--num-processes", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--accelerate-config", help="an accelerate config file or TRL's name for one (fsdp2)")
    parser.add_argument("--train-tokens", type=int, default=616 * 16 * 2048, help="training tokens per adapter")
    parser.add_argument("--heldout-tokens", type=int, default=256 * 2048, help="held-out tokens (whole windows)")
    parser.add_argument("--eval-every", type=int, default=77 * 16 * 2048, help="training tokens between evaluations")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (speed checks)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step, all processes")
    parser.add_argument("--stream-sequences", type=int, default=16, help="P × sequences per forward pass, per GPU")
    parser.add_argument("--prefix-length", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=5e-2)
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
        args.seq_len, args.batch_size, args.stream_sequences, args.prefix_length = 32, 4, 8, 4
        args.train_tokens, args.heldout_tokens, args.eval_every = 6 * 4 * 32, 8 * 32, 2 * 4 * 32
        args.runs = args.runs if "--runs" in argv else ["base", "P1", "P2", "P4"]
    if not torch.cuda.is_available():
        args.compile = False
    return args


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
    """Training and held-out windows in OUTPUT/data, built once and read by every process of every run."""
    data = Path(args.output_dir) / "data"
    if not (data / "corpus.json").is_file():
        corpus = packages_corpus(args)
        heldout_split = "test" if "test" in corpus else "validation"  # the smoke corpus has train/validation only
        train = leading_packed_windows(corpus["train"], tokenizer, args.seq_len, args.train_tokens)
        heldout = leading_packed_windows(corpus[heldout_split], tokenizer, args.seq_len, args.heldout_tokens)
        train.save_to_disk(str(data / "train"))
        heldout.save_to_disk(str(data / "heldout"))
        summary = {
            "files": {split: len(corpus[split]) for split in corpus},
            "heldout_split": heldout_split,
            "train_windows": len(train),
            "train_tokens": len(train) * args.seq_len,
            "heldout_windows": len(heldout),
            "heldout_tokens": len(heldout) * args.seq_len,
        }
        (data / "corpus.json").write_text(json.dumps(summary, indent=1))
    return json.loads((data / "corpus.json").read_text())


def run_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.output_dir) / f"{name}{args.tag}"


def sweep_config(args: argparse.Namespace, out: Path, num_streams: int) -> SFTConfig:
    """The same global batch and schedule for every P and number of processes: each process runs at most
    ``stream_sequences`` stream rows per forward pass and accumulates gradients up to its share of the batch."""
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
        learning_rate=args.learning_rate,
        optim=args.optim,
        adam_epsilon=args.adam_epsilon,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        max_length=args.seq_len,
        eval_strategy="steps",
        eval_steps=eval_steps,
        logging_steps=max(1, eval_steps // 4),
        save_strategy="no",  # checkpoints are written when the time runs out (`StopAtDeadline`)
        report_to="none",
        seed=0,
        bf16=on_gpu and not args.float32,
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,  # every adapter weight has a gradient (P = 1 has no aggregator)
        dataloader_num_workers=0,
        # The windows are token ids of exactly `seq_len`: nothing to tokenise, add or truncate, and TRL's passes over
        # 20 M tokens would cost every launch (and every process) a minute.
        dataset_kwargs={"skip_prepare_dataset": True},
    )


class StopAtDeadline(TrainerCallback):
    """Save a checkpoint and stop when the time is up, in every process at the same step (a process that went on
    alone would wait forever in the next gradient all-reduce): process 0's clock decides, broadcast each step."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def on_step_end(self, args, state, control, **kwargs):
        if self.deadline is None or state.global_step >= state.max_steps:
            return
        late = torch.tensor([float(time.time() > self.deadline)], device=args.device)
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(late, src=0)
        if late.item():
            control.should_save = control.should_training_stop = True


class StepClock(TrainerCallback):
    """The wall time of every optimizer step (process 0), and the steps that also evaluated or saved."""

    def __init__(self) -> None:
        self.step_ends: list[tuple[int, float]] = []
        self.busy_steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_ends.append((state.global_step, time.perf_counter()))

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append((state.global_step, time.perf_counter()))

    def on_evaluate(self, args, state, control, **kwargs):
        self.busy_steps.add(state.global_step)

    def segment(self) -> dict:
        """Steps and seconds of this process's share of the run, and its steady step time: the median step,
        leaving out the first three (compilation) and those that evaluated or saved."""
        (first_step, started), (last_step, ended) = self.step_ends[0], self.step_ends[-1]
        durations = [
            end - start
            for (_, start), (step, end) in zip(self.step_ends[3:], self.step_ends[4:])
            if step not in self.busy_steps and step - 1 not in self.busy_steps
        ]
        steady = sorted(durations)[len(durations) // 2] if durations else None
        return {"first_step": first_step, "last_step": last_step, "seconds": ended - started, "steady_step_s": steady}


def train_worker(args: argparse.Namespace, name: str) -> None:
    """One process of a run under ``accelerate launch``; process 0 writes the results."""
    num_streams = int(name.removeprefix("P"))
    out = run_dir(args, name)
    path = model_path(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = Path(args.output_dir) / "data"
    train, heldout = Dataset.load_from_disk(str(data / "train")), Dataset.load_from_disk(str(data / "heldout"))
    training_args = sweep_config(args, out, num_streams)
    if args.max_steps:
        training_args.max_steps = args.max_steps
    dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    clock = StepClock()
    trainer = ParScaleSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
        args=training_args,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=ParScaleConfig(
            P=num_streams, prefix_length=args.prefix_length, smoothing=args.smoothing, prefix_init="text"
        ),
        callbacks=[StopAtDeadline(args.deadline), clock],
    )
    if args.compile:  # regional compilation: one graph serves every decoder layer; attention keeps sdpa's kernels
        for layer in trainer.model.get_base_model().model.layers:
            layer.compile()
    main = trainer.accelerator.is_main_process
    checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
    if checkpoint is None:
        if main:
            trainer.model.save_pretrained(str(out / "initial_adapter"))  # what training moved the adapter from
        if args.max_steps is None:
            initial = trainer.evaluate()  # train() starts a new log history, so this one is kept in a file
            if main:
                (out / "initial_eval.json").write_text(json.dumps(initial))
    trainer.train(resume_from_checkpoint=checkpoint)
    if main:
        segment = {**clock.segment(), "resumed_from": checkpoint}
        (out / f"segment-{segment['first_step']}.json").write_text(json.dumps(segment))
    state = trainer.state
    if state.global_step < state.max_steps:
        return  # out of time: the checkpoint is saved, and the next invocation resumes
    if not any(log.get("step") == state.global_step and "eval_loss" in log for log in state.log_history):
        trainer.evaluate()
    trainer.save_model(str(out / "adapter"))
    if main:
        write_result(args, name, out, trainer, num_streams)


def write_result(args, name: str, out: Path, trainer, num_streams: int) -> None:
    tokens_per_step = args.batch_size * args.seq_len
    segments = [json.loads(path.read_text()) for path in sorted(out.glob("segment-*.json"))]
    initial = out / "initial_eval.json"
    curve = [(0, json.loads(initial.read_text())["eval_loss"])] if initial.is_file() else []
    curve += [
        (log["step"] * tokens_per_step, log["eval_loss"]) for log in trainer.state.log_history if "eval_loss" in log
    ]
    train_seconds = sum(segment["seconds"] for segment in segments)
    steady = [segment["steady_step_s"] for segment in segments if segment["steady_step_s"] is not None]
    result = {
        "name": name + args.tag,
        "P": num_streams,
        "processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "dtype": "float32" if args.float32 else ("bfloat16" if trainer.args.bf16 else "float32"),
        "compiled_layers": args.compile,
        "steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step * tokens_per_step,
        "train_seconds": train_seconds,  # the segments' steps, evaluations and checkpoints included
        "steady_tokens_per_s": tokens_per_step / min(steady) if steady else None,  # the best segment's median step
        "segments": segments,
        "learning_rate": args.learning_rate,
        "optim": args.optim,
        "adam_epsilon": args.adam_epsilon,
        "smoothing": args.smoothing,
        "prefix_length": args.prefix_length,
        "heldout_curve": curve,  # (training tokens, held-out loss)
        "train_loss_curve": [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {module.__name__: module.__version__ for module in (torch, __import__("transformers"))},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({key: value for key, value in result.items() if "curve" not in key}), flush=True)


def base_loss(args: argparse.Namespace) -> None:
    """The frozen model's held-out loss on the same windows, the token-mean loss as the trainer's evaluation computes
    it (every window is full, so the mean of equal-sized batch means is the mean over tokens)."""
    out = run_dir(args, "base")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and not args.float32 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path(args), dtype=dtype).to(device).eval()
    heldout = Dataset.load_from_disk(str(Path(args.output_dir) / "data" / "heldout"))["input_ids"]
    losses = []
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        for start in range(0, len(heldout), 8):
            input_ids = torch.tensor(heldout[start : start + 8], device=device)
            losses.append(model(input_ids=input_ids, labels=input_ids).loss.item() * len(input_ids))
    out.mkdir(parents=True, exist_ok=True)
    result = {"name": "base" + args.tag, "P": None, "heldout_loss": sum(losses) / len(heldout)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


def launch(args: argparse.Namespace, name: str, argv: list[str]) -> None:
    """Train one run under ``accelerate launch`` (torchrun for several processes, also on the CPU: gloo)."""
    if args.accelerate_config:
        from trl.cli.accelerate_config import resolve_accelerate_config_argument

        flags = resolve_accelerate_config_argument(["--accelerate_config", args.accelerate_config])
    else:
        flags = ["--multi_gpu"] if args.num_processes > 1 else []
    if args.float32:
        flags += ["--mixed_precision", "no"]  # TRL's configs ask for bf16
    command = [
        *[sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", str(args.num_processes)],
        *[
            str(Path(__file__).resolve()),
            *argv,
            "--worker",
            name,
            *(["--deadline", str(args.deadline)] if args.deadline else []),
        ],
    ]
    environment = dict(os.environ)
    if 0 < torch.cuda.device_count() != args.num_processes and "CUDA_VISIBLE_DEVICES" not in environment:
        # One process seeing several GPUs would get `nn.DataParallel` from the Trainer, which ParScale refuses.
        environment["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in range(args.num_processes))
    subprocess.run(command, check=True, env=environment)


def report(args: argparse.Namespace) -> dict:
    """The final table with the base model, the log-linear fit in ln P, and the gap L(P=1) − L(P) against tokens."""
    output = Path(args.output_dir)
    results = {r["name"]: r for r in (json.loads(p.read_text()) for p in sorted(output.glob("*/result.json")))}
    sweep = sorted((r for r in results.values() if r["P"] and r["name"] == f"P{r['P']}"), key=lambda r: r["P"])
    base = results.get("base")
    lines = [
        "| model | training tokens | held-out loss at init | final held-out loss | vs base | steady tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    if base:
        lines.append(f"| base (no adapter) | - | - | {base['heldout_loss']:.4f} | - | - |")
    for r in sweep:
        initial, final = r["heldout_curve"][0][1], r["heldout_curve"][-1][1]
        versus = f"{final - base['heldout_loss']:+.4f}" if base else "-"
        speed = f"{r['steady_tokens_per_s']:,.0f}" if r["steady_tokens_per_s"] else "-"
        lines.append(f"| P={r['P']} | {r['train_tokens']:,} | {initial:.4f} | {final:.4f} | {versus} | {speed} |")
    summary: dict = {"table": "\n".join(lines)}
    if len(sweep) >= 3:  # two points always fit a line: R² says something from three
        fit = fit_log_linear([r["P"] for r in sweep], [r["heldout_curve"][-1][1] for r in sweep])
        summary["log_linear_fit"] = {"intercept": fit.intercept, "slope": fit.slope, "r2": fit.r2}
    summary |= gap_analysis(sweep)
    (output / "report.json").write_text(json.dumps(summary, indent=1))
    print(summary["table"])
    print(json.dumps({key: value for key, value in summary.items() if key != "table"}, indent=1))
    plot_curves(sweep, base, output / "curves.png")
    return summary


def gap_analysis(sweep: list[dict]) -> dict:
    """Gap L(P=1) − L(P) at each evaluation, a fit gap = a + b·ln(tokens) for the largest P, and the tokens at which
    that fit reaches the gap the paper's Stack-V2-Python law predicts for the same P at this model's size."""
    by_p = {r["P"]: dict(r["heldout_curve"]) for r in sweep}
    if 1 not in by_p or len(by_p) < 2:
        return {}
    gaps = {
        P: {tokens: by_p[1][tokens] - loss for tokens, loss in curve.items() if tokens in by_p[1]}
        for P, curve in by_p.items()
        if P > 1
    }
    largest = max(gaps)
    points = sorted((tokens, gap) for tokens, gap in gaps[largest].items() if tokens > 0)
    analysis: dict = {"gaps": {str(P): sorted(gap.items()) for P, gap in gaps.items()}}
    if len(points) >= 3:
        # The package's fit in ln x: gap = intercept − fit.slope·ln(tokens), so the gap grows by −fit.slope per ln.
        fit = fit_log_linear([tokens for tokens, _ in points], [gap for _, gap in points])
        intercept, slope = fit.intercept, -fit.slope
        non_embedding = 494_032_768 - 151_936 * 896  # Qwen2.5-0.5B: all parameters minus the (tied) embedding
        paper_gap = PAPER_STACK_V2_PYTHON.predict(non_embedding, 1) - PAPER_STACK_V2_PYTHON.predict(
            non_embedding, largest
        )
        analysis["gap_fit"] = {
            "P": largest,
            "intercept": intercept,
            "slope_per_ln_tokens": slope,
            "r2": fit.r2,
            "paper_law_gap": paper_gap,
            "tokens_to_paper_gap": math.exp((paper_gap - intercept) / slope) if slope > 0 else None,
        }
    return analysis


def compare_adapters(output: Path, names: list[str], bound: float) -> dict:
    """How far each run's adapter is from the first run's, against how far training moved the first from its start
    (the same start in every run: text windows and the seeded aggregator), per tensor; ``over_bound`` lists the
    tensors whose difference exceeds `bound` times their movement.

    With SGD the update is linear in the gradient, so two runs that differ only in the order of their sums stay
    within a small share of the movement, and a wrong data split or gradient average moves a tensor by a share of
    order one. With Adam the aggregator's first layer exceeds any such bound by design: its gradients start at
    zero, and Adam turns their rounding noise into steps of order the learning rate (BENCHMARKS.md, "Same adapter on
    one GPU and two")."""
    from safetensors.torch import load_file

    def weights(name: str, folder: str) -> dict[str, torch.Tensor]:
        return {k: v.double() for k, v in load_file(output / name / folder / "adapter_model.safetensors").items()}

    reference, start = weights(names[0], "adapter"), weights(names[0], "initial_adapter")
    moved = {key: (reference[key] - start[key]).abs().max().item() for key in reference}
    comparison = {"reference": names[0], "max_abs_moved": max(moved.values()), "runs": {}}
    for name in names[1:]:
        if not (output / name / "adapter").is_dir():
            comparison["runs"][name] = "no adapter: the run did not finish"
            continue
        other, other_start = weights(name, "adapter"), weights(name, "initial_adapter")
        difference = {key: (other[key] - reference[key]).abs().max().item() for key in reference}
        relative = {
            key: difference[key] / moved[key] if moved[key] > 0 else (math.inf if difference[key] else 0.0)
            for key in reference
        }
        comparison["runs"][name] = {
            "same_start_max_abs": max((other_start[key] - start[key]).abs().max().item() for key in start),
            "max_abs_difference": max(difference.values()),
            "max_relative_to_movement": max(relative.values()),
            "bound": bound,
            "over_bound": sorted(key for key in reference if relative[key] > bound),
            "per_tensor": {
                key: {"difference": difference[key], "moved": moved[key], "relative": relative[key]}
                for key in sorted(reference)
            },
        }
    (output / "compare.json").write_text(json.dumps(comparison, indent=1))
    print(json.dumps(comparison, indent=1))
    return comparison


def plot_curves(sweep: list[dict], base: dict | None, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, (losses, gaps) = plt.subplots(1, 2, figsize=(11, 4))
    by_p = {r["P"]: dict(r["heldout_curve"]) for r in sweep}
    for P, curve in by_p.items():
        tokens = sorted(curve)
        losses.plot([t / 1e6 for t in tokens], [curve[t] for t in tokens], "o-", markersize=3, label=f"P={P}")
        if P > 1 and 1 in by_p:
            shared = [t for t in tokens if t in by_p[1] and t > 0]
            gaps.plot([t / 1e6 for t in shared], [by_p[1][t] - curve[t] for t in shared], "o-", label=f"P={P}")
    if base:
        losses.axhline(base["heldout_loss"], color="gray", linestyle=":", label="base")
    losses.set(xlabel="training tokens (M)", ylabel="held-out loss (nats/token)", title="learning curves")
    gaps.set(xscale="log", xlabel="training tokens (M)", ylabel="L(P=1) − L(P)", title="gain over one stream")
    gaps.axhline(0, color="gray", linewidth=0.5)
    losses.legend()
    gaps.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.worker:
        train_worker(args, args.worker)
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
        for name in args.runs:
            if (run_dir(args, name) / "result.json").is_file():
                continue
            if args.deadline and time.time() > args.deadline - args.launch_margin:
                print(f"not starting {name}{args.tag}: too little time left", flush=True)
                break
            base_loss(args) if name == "base" else launch(args, name, argv)
    report(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
