"""One process of `test_distributed.py`'s text-initialisation test, launched by ``accelerate launch`` with TRL's
``fsdp2.yaml`` (``fsdp_cpu_ram_efficient_loading: true``) on the CPU.

The launcher exports what it exports on GPUs (``ACCELERATE_USE_FSDP``, ``FSDP_CPU_RAM_EFFICIENT_LOADING``), so the
base model is loaded as under FSDP2: transformers' loading path for processes that are not process 0. The trainer's
``use_cpu`` makes accelerate run the processes as data parallel over gloo, since FSDP2 itself needs GPUs here. Every
process other than 0 then has its base weights replaced by NaN, standing for weights it never loaded (transformers
leaves such weights on the meta device, which the CPU trainer cannot hold: it moves the model to its device), before
``ParScaleSFTTrainer`` text-initialises the prefixes. Each process writes the prefixes it ends with.

    accelerate launch --config_file .../fsdp2.yaml --num_processes 2 --mixed_precision no \
        tests/fsdp2_text_init_worker.py CHECKPOINT DATA_DIR OUTPUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import is_fsdp_enabled
from trl import SFTConfig

from peft_parscale import ParScaleConfig
from peft_parscale.sft import ParScaleSFTTrainer

checkpoint, data, output = map(Path, sys.argv[1:4])
args = SFTConfig(str(output), use_cpu=True, bf16=False, max_length=32, report_to="none", seed=0)
process = args.process_index  # sets up the process group, as TRL's trainer does before it loads a model
model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
if process != 0:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
trainer = ParScaleSFTTrainer(
    model=model,
    args=args,
    train_dataset=Dataset.from_json(str(data / "train.jsonl")),
    processing_class=AutoTokenizer.from_pretrained(checkpoint),
    peft_config=ParScaleConfig(P=2, prefix_length=4, prefix_init="text"),
)
prefixes = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "parscale_prefix" in name}
save_file(prefixes, output / f"prefixes-{process}.safetensors")
facts = {"fsdp_loading": is_fsdp_enabled(), "processes": trainer.accelerator.num_processes}
(output / f"process-{process}.json").write_text(json.dumps(facts))
trainer.accelerator.end_training()
