"""One process of `test_distributed.py`'s FSDP2 tests, launched by ``accelerate launch`` with TRL's ``fsdp2.yaml``
(``fsdp_cpu_ram_efficient_loading: true``) on the CPU.

Text initialisation. The launcher exports what it exports on GPUs (``ACCELERATE_USE_FSDP``,
``FSDP_CPU_RAM_EFFICIENT_LOADING``), so the base model is loaded as under FSDP2: transformers' loading path for
processes that are not process 0. Every process other than 0 then has its base weights replaced by NaN, standing for
weights it never loaded (transformers leaves such weights on the meta device, which the CPU trainer cannot hold: it
moves the model to its device), before ``ParScaleSFTTrainer`` text-initialises the prefixes. Each process writes the
adapter it starts from.

Training. On the CPU accelerate runs the processes as data parallel: it settles on MULTI_CPU (``accelerate/state.py``
:769) and never reaches the branch that, on GPUs, sets the state's ``distributed_type`` to FSDP and its
``fsdp_plugin`` (``:971-976``), from which the Trainer takes ``is_fsdp_enabled`` (``transformers/trainer.py:875``,
5.17: 843). The worker sets those three after the trainer is built, with the plugin accelerate builds from the
launcher's variables, so that ``train()`` takes the Trainer's own FSDP2 path: ``_prepare_for_training``,
``accelerator.prepare``, ``fsdp2_prepare_model`` (``fully_shard`` on CPU tensors, over gloo, and process 0's state
dict broadcast to the others). Each process writes its FSDP units and the training loss.

Saving. A checkpoint every STEPS/2 steps and the final ``trainer.save_model`` (as ``parscale sft`` saves) take the
Trainer's FSDP branches: accelerate's ``get_state_dict`` (FSDP2: full state dict on process 0) for the adapter file,
``save_fsdp_model``/``save_fsdp_optimizer`` for what resuming needs. Given RESUME_FROM (a checkpoint folder), the run
resumes from it through ``load_fsdp_model``/``load_fsdp_optimizer``.

    accelerate launch --config_file .../fsdp2.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp2_worker.py CHECKPOINT DATA_DIR OUTPUT_DIR STEPS LEARNING_RATE PER_DEVICE_BATCH [RESUME_FROM]
"""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.integrations import is_fsdp_enabled
from trl import SFTConfig

from peft_parscale import ParScaleConfig
from peft_parscale.sft import ParScaleSFTTrainer


class StepCounter(TrainerCallback):
    """Counts the optimizer steps this launch runs (a resumed run runs only those after its checkpoint)."""

    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def main() -> None:
    """The run, in a function: its trainer is gone when it returns (see the end of this file)."""
    checkpoint, data, output = map(Path, sys.argv[1:4])
    steps, learning_rate, batch = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    resume_from = sys.argv[7] if len(sys.argv) > 7 else None
    args = SFTConfig(
        str(output),
        use_cpu=True,
        bf16=False,
        max_length=32,
        report_to="none",
        seed=0,
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch,
        save_strategy="steps",
        save_steps=steps // 2,
        logging_nan_inf_filter=False,  # the loss reported is every step's, NaN included
    )
    process = args.process_index  # sets up the process group, as TRL's trainer does before it loads a model
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
    if process != 0:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
    step_counter = StepCounter()
    trainer = ParScaleSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_json(str(data / "train.jsonl")),
        processing_class=AutoTokenizer.from_pretrained(checkpoint),
        peft_config=ParScaleConfig(P=2, prefix_length=4, prefix_init="text"),
        callbacks=[step_counter],
    )
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(initial, output / f"initial-{process}.safetensors")
    facts = {"fsdp_loading": is_fsdp_enabled(), "processes": trainer.accelerator.num_processes}

    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    # Every later `AcceleratorState()` (accelerate's saving and loading make some) copies PartialState's fields over its
    # own, distributed_type included; on GPUs accelerate writes FSDP there too (`accelerate/state.py`:998).
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    trainer.is_fsdp_enabled = True
    facts["loss"] = trainer.train(resume_from_checkpoint=resume_from).training_loss
    facts["steps_run"] = step_counter.steps
    facts["units"] = {}
    for name, module in trainer.model.named_modules():
        if isinstance(module, FSDPModule):
            parameters = list(module.parameters())  # nested units' included
            frozen = [p for p in parameters if not p.requires_grad]
            facts["units"][name] = {
                "trainable": sum(p.requires_grad for p in parameters),
                "frozen": len(frozen),
                "sharded": all(isinstance(p, DTensor) for p in parameters),
                "frozen_local_elements": sum(p.to_local().numel() for p in frozen),
                "frozen_elements": sum(p.numel() for p in frozen),
            }
    (output / f"process-{process}.json").write_text(json.dumps(facts))
    trainer.save_model(str(output))  # every process: gathering the full state dict is collective


main()
# The process group goes after the trainer's FSDP model (destroyed when `main` returned): the other order now and
# then aborts a process at exit ("terminate called without an active exception").
torch.distributed.destroy_process_group()
# Even in this order a process still aborted so at exit now and then (1 of 6 CI runs on 2026-12-05, after training,
# its JSON and the saved adapter were all written): a C++ thread destroyed during the interpreter's own teardown.
# Everything the tests read is on disk by now, so the process leaves without that teardown.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
