"""Trainer callbacks that keep a training run's time, for runs on machines lent for minutes at a time: the deadline a
run checkpoints and stops at, and the wall time of its steps (what its speed is read from).

Example::

    clock = StepClock()  # created first: the seconds before training count as setup
    trainer = ParScaleSFTTrainer(..., callbacks=[StopAtDeadline(time.time() + 540), clock])
    trainer.train()
    print(clock.segment())  # steps, seconds, the steady step time, setup and the first steps' seconds
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class StopAtDeadline(TrainerCallback):
    """Save a checkpoint and stop when the time is up, in every process at the same step (a process that went on
    alone would wait forever in the next gradient all-reduce): process 0's clock decides, broadcast each step."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.deadline is None or state.global_step >= state.max_steps:
            return
        late = torch.tensor([float(time.time() > self.deadline)], device=args.device)
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(late, src=0)
        if late.item():
            control.should_save = control.should_training_stop = True


class StepClock(TrainerCallback):
    """The wall time of every optimizer step (process 0), the steps that also evaluated or saved, and what came
    before the steps: loading the model and data, from the clock's creation."""

    def __init__(self) -> None:
        self.created = time.perf_counter()
        self.step_ends: list[tuple[int, float]] = []
        self.busy_steps: set[int] = set()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.step_ends.append((state.global_step, time.perf_counter()))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.step_ends.append((state.global_step, time.perf_counter()))

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.busy_steps.add(state.global_step)

    def segment(self) -> dict[str, int | float | None]:
        """Steps and seconds of this process's share of the run, and its steady step time: the median step,
        leaving out the first three (compilation) and those that evaluated or saved. Also the seconds before training
        (``setup_s``) and of the first three steps (``first_steps_s``: compiling, and an evaluation at the start),
        which running several runs side by side overlaps with the others' training."""
        (first_step, started), (last_step, ended) = self.step_ends[0], self.step_ends[-1]
        third = self.step_ends[min(3, len(self.step_ends) - 1)][1]
        durations = [
            end - start
            for (_, start), (step, end) in zip(self.step_ends[3:], self.step_ends[4:])
            if step not in self.busy_steps and step - 1 not in self.busy_steps
        ]
        steady = sorted(durations)[len(durations) // 2] if durations else None
        return {
            "first_step": first_step,
            "last_step": last_step,
            "seconds": ended - started,
            "steady_step_s": steady,
            "setup_s": started - self.created,
            "first_steps_s": third - started,
        }
