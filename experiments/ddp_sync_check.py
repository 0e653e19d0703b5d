"""Do two data-parallel processes keep the same adapter? With and without ``trainer.evaluate()`` before ``train()``.

``trainer.evaluate()`` before ``train()`` prepares the model for evaluation only, and ``train()`` then leaves it
without ``DistributedDataParallel`` (`peft_parscale.sft.check_data_parallel_wrapping`, which now refuses it). Each
mode trains a tiny random Qwen2 with a P=2 adapter on two CPU processes (gloo), in float64:

- ``evaluate-first``: ``evaluate()``, then ``train()`` with that check bypassed: what the Trainer itself does;
- ``eval-on-start``: ``eval_on_start=True``, the evaluation inside ``train()``;
- ``no-evaluation``;
- ``refused`` and ``refused-compiled`` (``torch_compile`` with the eager backend): ``evaluate()``, then ``train()``
  with the check in place, which must raise before any step.

The first three report the largest difference between the two processes' adapters after each of three steps: zero
when gradients are averaged (both take the same steps from the same start), far from zero when each process follows
its own half of the batch. The last two report each process's error.

    python experiments/ddp_sync_check.py --output results/ddp-sync-cpu/transformers-5.23.0.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODES = ("evaluate-first", "eval-on-start", "no-evaluation", "refused", "refused-compiled")
STEPS = 3


def worker(checkpoint: Path, data: Path, output: Path, mode: str) -> None:
    """One process: train `STEPS` steps in `mode`, saving its adapter after each step, or its error."""
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig

    from peft_parscale import ParScaleConfig, sft

    class SaveEachStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(weights, output / f"{mode}-step{state.global_step}-{args.process_index}.safetensors")

    compiled = {"torch_compile": True, "torch_compile_backend": "eager"} if mode == "refused-compiled" else {}
    args = SFTConfig(
        str(output / mode),
        use_cpu=True,
        bf16=False,
        max_length=32,
        report_to="none",
        seed=0,
        max_steps=STEPS,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        save_strategy="no",
        eval_on_start=mode == "eval-on-start",
        **compiled,
    )
    rows = Dataset.from_json(str(data))
    trainer = sft.ParScaleSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64),
        args=args,
        train_dataset=rows,
        eval_dataset=rows.select(range(8)),
        processing_class=AutoTokenizer.from_pretrained(checkpoint),
        peft_config=ParScaleConfig(P=2, prefix_length=4, prefix_init="text"),
        callbacks=[SaveEachStep()],
    )
    if mode in ("evaluate-first", "refused", "refused-compiled"):
        trainer.evaluate()
    if mode == "evaluate-first":
        sft.check_data_parallel_wrapping = lambda trainer: None  # what the Trainer does without the check
    try:
        trainer.train()
    except ValueError as error:
        (output / f"{mode}-outcome-{trainer.args.process_index}.txt").write_text(str(error))


def run_mode(checkpoint: Path, data: Path, scratch: Path, mode: str) -> dict:
    """Launch `mode` on two processes; its record (differences after each step, or each process's error)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", "0", __file__, "--output", "-"]
    subprocess.run([*launch, "--worker", str(checkpoint), str(data), str(scratch), mode], check=True)
    if mode.startswith("refused"):
        errors = [scratch / f"{mode}-outcome-{process}.txt" for process in (0, 1)]
        return {"errors": [path.read_text() if path.is_file() else None for path in errors]}
    from safetensors.torch import load_file

    differences = []
    for step in range(1, STEPS + 1):
        first, second = (load_file(scratch / f"{mode}-step{step}-{process}.safetensors") for process in (0, 1))
        differences.append(max((first[name] - second[name]).abs().max().item() for name in first))
    return {"max_abs_difference_between_processes_after_step": differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", nargs=4, metavar=("CHECKPOINT", "DATA", "OUTPUT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        checkpoint, data, output, mode = args.worker
        worker(Path(checkpoint), Path(data), Path(output), mode)
        # The process group goes after the trainer's DistributedDataParallel (destroyed when `worker` returned): the
        # other order now and then leaves a process hanging at exit.
        torch.distributed.destroy_process_group()
        return

    import accelerate
    import transformers

    from peft_parscale.testing import save_letter_rows, save_tiny_checkpoint

    report = {"versions": {m.__name__: m.__version__ for m in (torch, transformers, accelerate)}, "modes": {}}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        checkpoint = save_tiny_checkpoint(scratch / "tiny")
        save_letter_rows(scratch / "train.jsonl")
        for mode in args.modes:
            report["modes"][mode] = run_mode(checkpoint, scratch / "train.jsonl", scratch, mode)
            print(mode, report["modes"][mode], flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
