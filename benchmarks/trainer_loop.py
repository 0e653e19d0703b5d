"""Adapter training steps as the experiments take them: ``ParScaleSFTTrainer``, one step per batch.

The plain training step (`benchmarks.training.train_throughput`, loop "plain") calls the model and AdamW directly. The
experiments train through TRL's `SFTTrainer` instead, which adds its loss (a fused LM head that never builds the logits,
with entropy and token accuracy for its logs, each read back to the host), bfloat16 autocast around a bfloat16 model
(``bf16=True``), fused AdamW, gradient clipping and the Trainer's own bookkeeping, and TRL turns gradient checkpointing
on unless told not to (the sweep's runs until 2026-12-06 took it). The 20 M-token sweep's P=8 steps took longer per
sequence than the plain step on the same kind of GPU (BENCHMARKS.md), which this loop is here to take apart: "trainer"
is the experiments' step, "trainer_model_loss" the same Trainer with the loss transformers' `Trainer` computes (the
model's own cross-entropy over the full logits, no TRL metrics), and the plain step under autocast ("autocast", in
`train_throughput`) the third point between them.

Each Trainer step is one batch (no gradient accumulation), so that it compares with one plain step; the sweep
accumulates 16 such batches per optimizer step, which only spreads the optimizer's share thinner.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import Trainer, TrainerCallback
from trl import SFTConfig

from peft_parscale.sft import ParScaleSFTTrainer
from peft_parscale.testing import tiny_tokenizer

from .measure import Clock, reset_peak_memory


class ModelLossSFTTrainer(ParScaleSFTTrainer):
    """The loss as transformers' `Trainer` computes it: the model's own cross-entropy over the full logits, without
    TRL's fused LM head and the metrics it logs."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


class StepEnds(TrainerCallback):
    """Marks the device's clock as training begins and as each step ends; resets the peak memory once
    `untimed_steps` have ended, so that it is the timed steps' peak, as in the plain loop."""

    def __init__(self, clock: Clock, device: torch.device, untimed_steps: int) -> None:
        self.clock, self.device, self.untimed_steps, self.marks = clock, device, untimed_steps, []

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.marks.append(self.clock.mark())

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.marks.append(self.clock.mark())
        if len(self.marks) == 1 + self.untimed_steps:
            reset_peak_memory(self.device)


def sft_trainer(
    model: PeftModel,
    batches: torch.Tensor,
    output_dir: str,
    model_loss: bool,
    gradient_checkpointing: bool,
    callbacks: tuple = (),
) -> ParScaleSFTTrainer:
    """A Trainer that trains `model` (its adapter) for one epoch, one step a batch: the first batch of `batches`
    (steps, batch, length), then every batch, as the plain loop takes them. It trains as the experiments do
    (`sweep_config` in experiments/stream_sweep.py: fused AdamW, bf16 on a GPU, data already token ids) but at a
    constant learning rate.
    `model_loss`: the model's own loss instead of TRL's. `gradient_checkpointing`: recompute each layer's forward in
    the backward pass, which TRL does unless told not to (the sweep's runs until 2026-12-06 did)."""
    steps, batch_size, length = batches.shape
    device = batches.device
    # the Trainer shuffles the rows: each step is still `batch_size` rows of `length` tokens
    rows = Dataset.from_dict({"input_ids": torch.cat([batches[:1], batches]).reshape(-1, length).tolist()})
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=1 + steps,
        gradient_checkpointing=gradient_checkpointing,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        bf16=device.type == "cuda" and model.dtype == torch.bfloat16,
        use_cpu=device.type == "cpu",
        max_length=length,
        save_strategy="no",
        logging_steps=1 + steps,  # one log, at the end: its host read-back is not in the timed steps
        report_to="none",
        dataloader_num_workers=0,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer_class = ModelLossSFTTrainer if model_loss else ParScaleSFTTrainer
    # the tokenizer only gives the collator its padding id: every row is `length` tokens, none is padded
    return trainer_class(
        model=model, args=args, train_dataset=rows, processing_class=tiny_tokenizer(), callbacks=list(callbacks)
    )


def trainer_step_times(
    model: PeftModel, batches: torch.Tensor, warmup: int, model_loss: bool, gradient_checkpointing: bool
) -> tuple[float, list[float], float]:
    """Train `model` through `sft_trainer` for one step, `warmup` steps and then one step for each batch of
    `batches` after the first `warmup`. Returns the first step's seconds (compilation included), the timed steps'
    milliseconds and the mean training loss."""
    device = batches.device
    clock = Clock(device)
    ends = StepEnds(clock, device, untimed_steps=1 + warmup)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = sft_trainer(model, batches, output_dir, model_loss, gradient_checkpointing, callbacks=(ends,))
        mean_loss = trainer.train().training_loss
    durations = [clock.elapsed_ms(start, end) for start, end in zip(ends.marks, ends.marks[1:])]
    return durations[0] / 1e3, durations[1 + warmup :], mean_loss
