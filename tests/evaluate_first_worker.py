"""One process of `test_distributed.py`'s evaluation-before-training test, launched by ``accelerate launch --multi_gpu
--num_processes 2`` on the CPU (gloo).

MODE ``evaluate-first``: ``trainer.evaluate()``, then ``trainer.train()``, which `ParScaleSFTTrainer` must refuse;
each process writes the error it got (or that it trained) to OUTPUT/outcome-<process>.txt. MODE ``eval-on-start``:
``SFTConfig(eval_on_start=True)`` and a short training; each process writes its adapter weights and log history.

    accelerate launch --multi_gpu --num_processes 2 tests/evaluate_first_worker.py CHECKPOINT DATA_DIR OUTPUT_DIR MODE
"""

import json
import sys
from pathlib import Path

from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from peft_parscale import ParScaleConfig
from peft_parscale.sft import ParScaleSFTTrainer

checkpoint, data, output = map(Path, sys.argv[1:4])
mode = sys.argv[4]
args = SFTConfig(
    str(output),
    use_cpu=True,
    bf16=False,
    max_length=32,
    report_to="none",
    seed=0,
    max_steps=3,
    learning_rate=1e-2,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=2,
    save_strategy="no",
    eval_on_start=mode == "eval-on-start",
)
rows = Dataset.from_json(str(data / "train.jsonl"))
trainer = ParScaleSFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(checkpoint),
    args=args,
    train_dataset=rows,
    eval_dataset=rows.select(range(8)),
    processing_class=AutoTokenizer.from_pretrained(checkpoint),
    peft_config=ParScaleConfig(P=2, prefix_length=4, prefix_init="text"),
)
process = trainer.accelerator.process_index
if mode == "evaluate-first":
    trainer.evaluate()
    try:
        trainer.train()
        outcome = "trained"
    except ValueError as error:
        outcome = str(error)
    (output / f"outcome-{process}.txt").write_text(outcome)
else:
    trainer.train()
    trained = {name: p.detach().contiguous() for name, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(trained, output / f"adapter-{process}.safetensors")
    (output / f"log-{process}.json").write_text(json.dumps(trainer.state.log_history))
trainer.accelerator.end_training()
