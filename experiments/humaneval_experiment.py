"""Does P = 8 write more correct functions than P = 1 and the base model? HumanEval with error bars.

Qwen2.5-Coder-0.5B-Instruct, frozen, gets ParScale adapters with P = 1, 2, 4, 8 trained at equal tokens on
HumanEval-shaped pairs from real code (`peft_parscale.function_pairs`: a function's imports, signature and docstring
as the prompt, its body as the completion, decontaminated against HumanEval), with TRL's completion-only loss and the
recycling ablation's recipe (``prefix_init="text"``, learning rate 5e-2, smoothing 0.1; RESULTS.md). Each adapter,
and the base model, is then measured on all 164 HumanEval problems:

- greedy pass@1 in completion and in chat mode;
- pass@1 and pass@10 from ``--samples`` (20) samples per problem at temperature 0.8, top-p 0.95;
- the completion loss on the held-out pairs (files hashed into the held-out split);
- for every metric a 95% bootstrap interval over problems (over pairs for the loss), and paired comparisons
  (``--compare``, default P8 against P1 and against the base): paired bootstrap p-values, and the exact McNemar test
  for greedy pass/fail (`peft_parscale.stats`).

Besides the ParScale arms, the experiment trains what a user would use instead, through the same trainer on the same
pairs and tokens: single streams with a longer prefix (``P1T192`` and ``P1T384``: P=1 with the prefix count of P=4 and
P=8 at T=48) and LoRA (``lora``: PEFT's ``LoraConfig``, r=16 on every linear layer of the decoder). A learning rate can
be given per arm with ``@``: ``lora@3e-4`` is LoRA trained at 3e-4 (a grid point; ``val:`` scores it on validation
pairs, which come from files hashed into neither split, so that a rate is chosen without looking at the held-out
numbers).

A ParScale arm with ``+div<λ>`` (``P4+div0.1``, ``P4T48+div0.1@5e-2``) trains with ND-LoRA's stream-diversity term
added to the loss, λ times ND-LoRA's Barlow Twins term between the streams' hidden states at ``--diversity-layer``
(`stream_diversity`); its train.json records λ, the layer, and the term's mean and curve. It is a candidate for issue
20's item 6: a variant that keeps the package's shape and beats its prefix-matched single stream (``P1T192`` for P=4)
on validation pairs. ``+div0`` trains the plain arm and records its term.

The work is split into phases so that each fits one command on a GPU; every phase writes its JSON under OUTPUT and a
rerun skips what exists. ``MODEL`` is ``base``, ``P<n>``, ``P<n>T<t>`` or ``lora``, with an optional ``@<rate>``
and then an optional ``#<seed>`` (the arm trained again with another seed; ParScale arms with P >= 2 take an optional
``+div<λ>`` before the rate):

    prepare           the pairs, from this interpreter's standard library and site-packages -> DATA (--data;
                      `humaneval_data.py`)
    train:MODEL       an adapter -> OUTPUT/MODEL/adapter, train.json
    greedy:MODEL      greedy pass@1, completion and chat mode -> OUTPUT/MODEL/greedy.json.gz (every sample and verdict)
    sampled:MODEL     pass@1 and pass@10 from --samples samples -> OUTPUT/MODEL/sampled.json.gz (every sample)
    loss:MODEL        completion loss on the held-out pairs -> OUTPUT/MODEL/loss.json (per pair)
    val:MODEL         completion loss on the validation pairs -> OUTPUT/MODEL/val.json (to choose learning rates)
    eval:MODEL        greedy, sampled and loss

    python experiments/humaneval_experiment.py --only prepare --data he-data           # on the CPU, ~2 min
    python experiments/humaneval_experiment.py --gguf q.gguf --model-cache /tmp/ckpt --data he-data \\
        --output-dir /tmp/he --only train:P1 train:P2 eval:base                      # on the GPU, in pieces
    python experiments/humaneval_experiment.py ... --only train:P4+div0.1 val:P4+div0.1 val:P4    # a variant
    python experiments/humaneval_experiment.py ... --side-by-side 5 --deadline 480 \\
        --only train:P8#1 val:P8#1 train:P1#1 val:P1#1                      # models side by side, stopping in time
    python experiments/humaneval_experiment.py --output-dir /tmp/he --report \\
        --benchmark-results /tmp/he/bench/results.jsonl                                 # results.json/.md, plot
    python experiments/humaneval_experiment.py --smoke                                 # tiny random model, CPU

Without ``--only`` every phase of every ``--models`` runs, then the report (`humaneval_results.py`). Its decode-cost
columns come from the benchmarks' decode sweep at the model's shape, the arms' benchmark variants at batch 1 and 8,
and its training speeds from the benchmarks' training suite, each arm alone on the GPU (`--benchmark-results`):

    python -m benchmarks.run --suites sweep --shapes 0.5b --variants stock,P1,P2,P4,P8,P1T192,P1T384 \\
        --batches 1,8 --lengths 128:512 --out /tmp/he/bench
    python -m benchmarks.run --suites train --train-shapes 0.5b \\
        --train-variants P1,P2,P4,P8,P1T192,P1T384,lora --out /tmp/he/bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from arms import arm_learning_rate, arm_peft_config, parse_arm
from common import (
    DTYPE,
    OUT_OF_GPU_MEMORY,
    add_model_arguments,
    environment,
    equal_budget_config,
    model_path,
    run_side_by_side,
    start_in_own_session,
)
from humaneval_data import prepare, read_pairs
from humaneval_results import EVAL_PHASES, report, result_path, write_result
from stream_diversity import StreamDiversityTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale.eval import completion_loss, load_model
from peft_parscale.humaneval import evaluate_humaneval, load_problems
from peft_parscale.sft import ParScaleSFTTrainer

SPLIT_OF_LOSS_PHASE = {"loss": "test", "val": "validation"}
SMOKE_PROBLEMS = ["HumanEval/0", "HumanEval/53"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, model_cache="humaneval-model")
    parser.add_argument("--output-dir", default="humaneval-output")
    parser.add_argument("--data", help="where `prepare` writes the pairs and the others read them (OUTPUT/data)")
    parser.add_argument("--models", nargs="+", default=["base", "P1", "P2", "P4", "P8", "P1T192", "P1T384", "lora"])
    parser.add_argument("--only", nargs="+", metavar="PHASE[:MODEL]", help="run only these phases (see above)")
    parser.add_argument("--report", action="store_true", help="only gather the results")
    parser.add_argument(
        "--benchmark-results",
        type=Path,
        help="report: decode and training cost from a benchmarks results.jsonl (humaneval_results.py)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=["P8:P1", "P8:base", "P8:P1T384@best", "P8:lora@best", "P4:P1T192@best"],
        help="paired comparisons A:B; <arm>@best is the arm's rate chosen on validation (left out if it has no grid)",
    )
    parser.add_argument("--heldout-percent", type=int, default=5, help="files (by path hash) whose pairs are held out")
    parser.add_argument(
        "--validation-percent", type=int, default=5, help="the next files (by path hash): validation pairs"
    )
    parser.add_argument("--train-format", choices=["completion", "chat"], default="completion")
    parser.add_argument("--train-tokens", type=int, default=2**20, help="training tokens per adapter (equal for all)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per packed training sequence")
    parser.add_argument("--batch-size", type=int, default=16, help="packed sequences per optimizer step")
    parser.add_argument(
        "--stream-sequences", type=int, default=16, help="P x pairs per forward pass when scoring losses"
    )
    parser.add_argument("--learning-rate", type=float, default=5e-2, help="ParScale arms without @<rate>")
    parser.add_argument(
        "--lora-learning-rate", type=float, help="LoRA arms without @<rate> (choose it on validation: lora@<rate>)"
    )
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--prefix-length", type=int, default=48)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument(
        "--diversity-layer",
        type=int,
        default=20,
        help="+div arms: the hidden_states index whose streams are decorrelated (ND-LoRA's 20 of 24; 24: final norm)",
    )
    parser.add_argument("--samples", type=int, default=20, help="samples per problem for pass@1/pass@10")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--generation-rows", type=int, default=2048, help="P x sequences generated together")
    parser.add_argument("--heldout-pairs", type=int, help="score only the first N held-out pairs")
    parser.add_argument("--check-workers", type=int, help="processes running the HumanEval checks")
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false", help="generate with `generate`")
    parser.add_argument(
        "--gpu-shared-by",
        type=int,
        default=1,
        help="trainings running side by side on this GPU (recorded, so that the report shows no tokens/s for them)",
    )
    parser.add_argument(
        "--side-by-side",
        type=int,
        default=1,
        metavar="N",
        help="--only's models in up to N processes at once on the one GPU, each model's phases in order in its own",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="stop what still runs after SECONDS and start nothing new (a stopped phase reruns); each model's phases "
        "then run in a process of their own, as with --side-by-side",
    )
    # Set for the processes `side_by_side` starts: they run their phases themselves.
    parser.add_argument("--group", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, 2 problems, on the CPU (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        # one token per character in the tiny tokenizer: 512 keeps most pairs whole
        args.seq_len, args.batch_size, args.stream_sequences, args.prefix_length = 512, 2, 4, 4
        args.train_tokens, args.max_new_tokens, args.samples, args.heldout_pairs = 2 * 2 * 512, 8, 10, 4
        args.heldout_percent, args.validation_percent, args.check_workers = 40, 20, 2
        args.diversity_layer = 1  # the tiny model has 2 layers
    args.data = Path(args.data or Path(args.output_dir) / "data")
    return args


def phases(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The (phase, model) pairs to run, in order; ``eval`` expands to its three parts."""
    requested = args.only or ["prepare"] + [
        f"{phase}:{name}" for name in args.models for phase in (["train"] if name != "base" else []) + ["eval"]
    ]
    planned = []
    for item in requested:
        phase, _, name = item.partition(":")
        if phase == "prepare":
            planned.append(("prepare", None))
            continue
        if phase not in ("train", "eval", "val", *EVAL_PHASES) or not name:
            raise ValueError(f"unknown phase {item!r}: use prepare, train:MODEL, or greedy|sampled|loss|val|eval:MODEL")
        arm = parse_arm(name)  # refuses a bad model name before any work
        if phase == "train" and arm.kind == "base":
            raise ValueError("the base model is not trained: use eval:base")
        planned += [(part, name) for part in (EVAL_PHASES if phase == "eval" else (phase,))]
    return planned


def chosen_on_validation(args: argparse.Namespace, name: str) -> str:
    """``lora@best`` -> the ``lora@<rate>`` grid point with the lowest validation loss (``val:`` results in OUTPUT);
    ``lora@best#<seed>`` -> that rate trained with another seed. The grid is its seed-0 runs."""
    best, hash_sign, seed = name.partition("#")
    stem = best.removesuffix("@best")
    losses = {}
    for result in Path(args.output_dir).glob(f"{stem}@*/val.json"):
        if "#" in result.parent.name:
            continue
        loss = json.loads(result.read_text())
        losses[result.parent.name] = sum(loss["nll"]) / sum(loss["scored_tokens"])
    if not losses:
        raise FileNotFoundError(f"{name}: no {stem}@<rate> grid point has a val.json yet: run val:{stem}@<rate> first")
    chosen = min(losses, key=losses.get)
    print(f"{name}: {chosen} (validation losses {losses})")
    return chosen + hash_sign + seed


def resolved_comparisons(args: argparse.Namespace) -> list[str]:
    """``--compare``'s pairs with each ``<arm>@best`` replaced by the rate chosen on validation; a pair whose arm has
    no grid point in OUTPUT yet is left out, and said so."""
    pairs = []
    for pair in args.compare:
        try:
            sides = [chosen_on_validation(args, side) if "@best" in side else side for side in pair.split(":")]
        except FileNotFoundError as missing:
            print(f"--compare {pair} left out: {missing}")
            continue
        pairs.append(":".join(sides))
    return pairs


def train(args: argparse.Namespace, path: Path, name: str) -> None:
    out = Path(args.output_dir) / name
    if (out / "train.json").is_file():
        print(f"train:{name}: done already")
        return
    arm = parse_arm(name)
    rate = arm_learning_rate(arm, args.learning_rate, args.lora_learning_rate)
    # TRL's packing of prompt-completion pairs is padding-free: a micro-batch is concatenated into one sequence, which
    # sdpa (no variable-length kernel) attends over as a whole, at a cost that grows with its square. One packed window
    # per micro-batch keeps attention within --seq-len tokens for every arm (see RESULTS.md for what 16 gave).
    training_args = equal_budget_config(
        args,
        out,
        arm.P or 1,
        rate,
        seed=arm.seed,
        per_device_train_batch_size=1,
        packing=True,
        include_num_input_tokens_seen="all",
    )
    # one trainer for every arm: with a LoraConfig, ParScaleSFTTrainer is TRL's SFTTrainer unchanged; a +div arm's
    # trainer adds the stream-diversity term to its loss and changes nothing else
    diversity = {}
    if arm.diversity_weight is not None:
        diversity = {"diversity_weight": arm.diversity_weight, "diversity_layer": args.diversity_layer}
    trainer = (StreamDiversityTrainer if diversity else ParScaleSFTTrainer)(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE),
        args=training_args,
        train_dataset=read_pairs(args, "train"),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=arm_peft_config(arm, args.prefix_length, args.smoothing, args.lora_rank),
        **diversity,
    )
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    diverged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not p.isfinite().all()]
    if diverged:  # nothing is saved, so that a rerun trains this arm again
        raise RuntimeError(
            f"train:{name} diverged: {len(diverged)} trainable tensors are not finite ({diverged[0]}, ...)"
        )
    trainer.save_model(str(out / "adapter"))
    result = {
        "arm": arm.kind,
        "P": arm.P,
        "prefix_length": arm.prefix_length or args.prefix_length if arm.kind == "parscale" else None,
        "train_format": args.train_format,
        "learning_rate": rate,
        "seed": arm.seed,
        "steps": training_args.max_steps,
        # padding-free packing: every token of a batch is a real token, so "all" counts the training tokens
        "train_tokens": trainer.state.num_input_tokens_seen,
        "train_pairs": len(trainer.train_dataset),
        "train_seconds": seconds,
        "gpu_shared_by": args.gpu_shared_by,  # > 1: train_seconds is not this arm's own cost
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "adapter_bytes": sum(f.stat().st_size for f in (out / "adapter").glob("*.safetensors")),
        "train_loss_curve": [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log],
        **environment(),
    }
    if arm.diversity_weight is not None:  # the loss curve above includes λ times the term
        terms = trainer.diversity_terms
        result["diversity"] = {
            "weight": arm.diversity_weight,
            "layer": args.diversity_layer,
            "term_mean": sum(terms) / len(terms),
            "term_curve": [(log["step"], log["diversity"]) for log in trainer.state.log_history if "diversity" in log],
        }
    write_result(out / "train.json", result)
    print(f"train:{name}: {result['train_tokens']:,} tokens in {seconds:.0f} s")


def evaluate(args: argparse.Namespace, path: Path, name: str, phase: str, loaded: dict) -> None:
    """One evaluation phase of one model; ``loaded`` keeps the last model loaded, for the next phase."""
    out = Path(args.output_dir) / name
    if result_path(out, phase).is_file():
        print(f"{phase}:{name}: done already")
        return
    if loaded.get("name") != name:
        adapter = out / "adapter" if name != "base" else None
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} has no adapter: run train:{name} first")
        loaded.clear()  # the previous model is freed before the next is loaded
        # and its compiled decode steps: each model compiles its own, and torch.compile stops compiling a function
        # after `recompile_limit` (8) variants in one process, running it eagerly from then on
        torch._dynamo.reset()
        loaded["model"], loaded["tokenizer"] = load_model(path, adapter, DTYPE)
        if parse_arm(name).kind == "lora":  # merged, LoRA costs what the base model costs, and decodes the same way
            loaded["model"] = loaded["model"].merge_and_unload()
        loaded["name"] = name
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    P = parse_arm(name).P or 1
    problems = load_problems(SMOKE_PROBLEMS if args.smoke else None)
    common = {
        "problems": problems,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": max(1, args.generation_rows // P),
        "workers": args.check_workers,
        "fast_path": args.fast_path,
    }
    started = time.time()
    if phase == "greedy":
        result = {mode: evaluate_humaneval(model, tokenizer, mode, **common) for mode in ("completion", "chat")}
    elif phase == "sampled":
        k = (1, 10) if args.samples >= 10 else (1,)
        result = {
            "completion": evaluate_humaneval(
                model, tokenizer, "completion", num_samples=args.samples, k=k, temperature=0.8, top_p=0.95, **common
            )
        }
    else:
        rows = read_pairs(args, SPLIT_OF_LOSS_PHASE[phase])
        rows = rows.select(range(min(len(rows), args.heldout_pairs or len(rows))))
        result = completion_loss(model, tokenizer, rows, batch_size=max(1, args.stream_sequences // P))
        result["train_format"] = args.train_format
    out.mkdir(parents=True, exist_ok=True)
    write_result(result_path(out, phase), {**result, "seconds": time.time() - started, **environment()})
    scores = {key: value for mode in result.values() if isinstance(mode, dict) for key, value in mode.items()}
    headline = {key: value for key, value in {**result, **scores}.items() if key.startswith("pass@") or key == "loss"}
    print(f"{phase}:{name}: {headline} in {time.time() - started:.0f} s")


def side_by_side(args: argparse.Namespace, argv: list[str]) -> int:
    """Run `--only`'s phases grouped by model, up to ``--side-by-side`` models at once, each group a process of this
    script with the same arguments. Returns the exit status: 1 if a group failed, else 2 if the deadline left work
    undone (a rerun does it), else 0.

    A 0.5B model's training step leaves most of an H200 idle, so several trainings side by side finish sooner than one
    after another; they then share the GPU, which their train.json records (``gpu_shared_by``: at most this many at
    once). The model is converted, `prepare` runs and ``@best`` is resolved here first, so that no two processes
    write the same files. A group's output goes to OUTPUT/logs/. Past ``--deadline`` the running groups are stopped
    (their finished phases stay; every result file is written whole or not at all) and no group is started, so that a
    device call ends in time to bring its results back. If this process is stopped, it stops its groups too. A group
    that runs out of GPU memory beside others runs again alone once they have ended (its log: OUTPUT/logs/
    <model>.alone.log), as ``--gpu-shared-by 1``, skipping the phases it finished: two single-stream sampling runs
    did not fit one H100 together.
    """
    started = time.time()
    groups: dict[str, list[str]] = {}
    for phase, name in phases(args):
        if phase == "prepare":
            prepare(args)
            continue
        name = chosen_on_validation(args, name) if "@best" in name else name
        groups.setdefault(name, []).append(f"{phase}:{name}")
    if groups:
        model_path(args)
    logs = Path(args.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    script = [sys.executable, str(Path(__file__).resolve()), *argv]

    # argparse keeps an option's last occurrence: each group's process runs its own phases (--only), itself (--group)
    def start(name: str, shared_by: int, log: str) -> subprocess.Popen:
        extra = ["--group", "--gpu-shared-by", str(shared_by), "--only", *groups[name]]
        return start_in_own_session([*script, *extra], logs / log)

    def late() -> bool:
        return args.deadline is not None and time.time() - started > args.deadline

    # each group in a session of its own, so that stopping it stops its HumanEval checkers too; a group that ran out
    # of GPU memory beside others runs again alone at the end, skipping the phases it finished
    outcome = run_side_by_side(
        list(groups),
        lambda name: start(name, min(args.side_by_side, len(groups)), f"{name}.log"),
        args.side_by_side,
        too_late_to_start=late,
        too_late_to_run=late,
        start_alone=lambda name: start(name, 1, f"{name}.alone.log"),
    )
    if outcome.failed:
        print(f"see the failed groups' logs in {logs}")
    return 1 if outcome.failed else 2 if outcome.unfinished else 0


def run_phases(args: argparse.Namespace) -> None:
    """Run the planned phases (`phases`) in this process, one after the other."""
    planned = phases(args)
    path = model_path(args) if any(phase != "prepare" for phase, _ in planned) else None
    loaded: dict = {}
    for phase, name in planned:
        name = chosen_on_validation(args, name) if name and "@best" in name else name
        if phase == "prepare":
            prepare(args)
        elif phase == "train":
            train(args, path, name)
        else:
            evaluate(args, path, name, phase, loaded)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if (args.side_by_side > 1 or args.deadline is not None) and not args.group and not args.report:
        if not args.only:
            raise SystemExit("--side-by-side and --deadline run --only's phases: name them")
        raise SystemExit(side_by_side(args, argv))
    if not args.report:
        try:
            run_phases(args)
        except torch.OutOfMemoryError:
            if not args.group:
                raise
            # the scheduler (`side_by_side`) runs this group again alone when other groups shared the GPU
            traceback.print_exc()
            raise SystemExit(OUT_OF_GPU_MEMORY) from None
        if args.only:
            return
    summary = report(
        Path(args.output_dir),
        resolved_comparisons(args),
        args.data,
        args.benchmark_results,
        default_prefix_length=args.prefix_length,
    )
    print(summary["table"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
