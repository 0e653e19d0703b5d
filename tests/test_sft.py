"""Training with TRL: SFTTrainer with a ParScaleConfig, resuming, the `parscale sft` command and the model card."""

import dataclasses
import inspect
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, PeftModel
from reference import LENGTH, adapter_tensors, assert_logits_match, randomize_adapter, reference_logits, training_args
from safetensors.torch import load_file
from tiny_models import tiny_model, tiny_tokenizer
from trl import ModelConfig, SFTTrainer

import peft_parscale  # noqa: F401
from peft_parscale import ParScaleConfig
from peft_parscale.cli import main as parscale_main
from peft_parscale.sft import ParScaleSFTTrainer, make_parser, peft_config_from_args
from peft_parscale.testing import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def source_texts() -> list[str]:
    import csv
    import difflib
    import heapq
    import json as json_module
    import shlex
    import textwrap

    return [inspect.getsource(module) for module in (csv, difflib, heapq, json_module, shlex, textwrap)]


def windows(tokenizer, texts, count, offset=0) -> Dataset:
    ids = [token for text in texts for token in tokenizer(text)["input_ids"]]
    start = offset * LENGTH
    return Dataset.from_dict({"input_ids": [ids[start + i * LENGTH : start + (i + 1) * LENGTH] for i in range(count)]})


def make_trainer(output_dir, train, evaluation=None, trainer_cls=SFTTrainer, P=2, dtype=torch.float32, **overrides):
    tokenizer = tiny_tokenizer()
    return trainer_cls(
        model=tiny_model(vocab_size=len(tokenizer), dtype=dtype),
        args=training_args(output_dir, **overrides),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=ParScaleConfig(P=P, prefix_length=4),
    )


def reference_loss(model, dataset: Dataset) -> float:
    """Mean next-token cross-entropy of the plain reference over every window (all windows have equal length)."""
    adapter = adapter_tensors(model)
    backbone = tiny_model(vocab_size=model.config.vocab_size)  # the same weights as the frozen backbone
    total = 0.0
    for row in dataset["input_ids"]:
        tokens = torch.tensor(row)
        logits = reference_logits(backbone, tokens, adapter)
        total += torch.nn.functional.cross_entropy(logits[:-1], tokens[1:]).item()
    return total / len(dataset)


def test_sft_trainer_trains_only_parscale_weights_on_trl_s_loss_path(tmp_path):
    tokenizer = tiny_tokenizer()
    train, heldout = windows(tokenizer, source_texts(), 32), windows(tokenizer, source_texts(), 8, offset=200)
    trainer = make_trainer(tmp_path / "run", train, heldout)
    model = trainer.model
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if "parscale_" not in n}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if "parscale_" in n}
    assert all(p.requires_grad == ("parscale_" in n) for n, p in model.named_parameters())

    # TRL computes the loss from the decoder's hidden states with its own fused LM head: it must equal the loss of
    # the plain reference on the same windows, before and after training
    loss_before = trainer.evaluate()["eval_loss"]
    assert loss_before == pytest.approx(reference_loss(model, heldout), abs=1e-4)
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    assert loss_after == pytest.approx(reference_loss(model, heldout), abs=1e-4)
    assert loss_after < loss_before - 0.01, (loss_before, loss_after)  # 4.95 -> 4.91 here

    assert all(torch.equal(p, backbone[n]) for n, p in model.named_parameters() if n in backbone)
    assert all(not torch.equal(p, adapter_before[n]) for n, p in model.named_parameters() if n in adapter_before)

    trainer.save_model()
    # Compared in float64 (see reference.LOGIT_TOLERANCE); the float32 adapter loads into it exactly.
    float64_base = tiny_model(vocab_size=len(tokenizer), dtype=torch.float64)
    reloaded = PeftModel.from_pretrained(float64_base, tmp_path / "run")
    tokens = torch.tensor(heldout["input_ids"][0])
    expected = reference_logits(
        tiny_model(vocab_size=len(tokenizer), dtype=torch.float64), tokens, adapter_tensors(model)
    )
    with torch.no_grad():
        assert_logits_match(reloaded(input_ids=tokens[None]).logits[0], expected)


def dataset_of_kind(kind: str) -> tuple[Dataset, dict]:
    text = source_texts()[0]
    if kind == "packed-text":  # BFD packing: padding-free batches with position_ids
        return Dataset.from_dict({"text": source_texts()}), {"packing": True}
    if kind == "chat":  # the tokenizer's chat template
        turns = [{"role": "user", "content": text[:40]}, {"role": "assistant", "content": text[40:90]}]
        return Dataset.from_dict({"messages": [turns] * 4}), {}
    # prompt/completion: TRL's completion-only loss
    return Dataset.from_dict({"prompt": ["def f(x):\n"] * 4, "completion": ["    return x + 1\n"] * 4}), {}


def expected_rows(kind: str, tokenizer, dataset: Dataset) -> list[tuple[list[int], list[bool]]]:
    """Written out here from the dataset: the token ids TRL should train on, each with the tokens that carry loss.
    Packed text: each document (with TRL's end-of-sequence token) cut to the window, every token but its first (BFD
    packs whole documents into one row, and a token is never predicted across two). Chat: the chat template's ids, all
    of them (TRL's default). Prompt and completion: the completion only, with its end-of-sequence token."""
    eos = [tokenizer.eos_token_id]
    if kind == "packed-text":
        documents = [(tokenizer(text)["input_ids"] + eos)[:LENGTH] for text in dataset["text"]]
        return [(ids, [False] + [True] * (len(ids) - 1)) for ids in documents]
    if kind == "chat":
        ids = tokenizer.apply_chat_template(dataset["messages"][0], tokenize=True, return_dict=True)["input_ids"]
        return [(ids[:LENGTH], [True] * len(ids[:LENGTH]))]
    prompt = tokenizer(dataset["prompt"][0])["input_ids"]
    ids = (prompt + tokenizer(dataset["completion"][0])["input_ids"] + eos)[:LENGTH]
    return [(ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt)))]


def batch_rows(batch: dict) -> list[tuple[list[int], list[bool]]]:
    """The (token ids, carries loss) of each sequence of a training batch: a padded row each, or, packed, one row
    split where its positions restart."""
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        if "position_ids" in batch:
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [len(ids)]
        else:
            starts = [0, int(batch["attention_mask"][row].sum())]
        rows += [(ids[a:b].tolist(), (labels[a:b] != -100).tolist()) for a, b in itertools.pairwise(starts)]
    return rows


def reference_mean_loss(model, rows: list[tuple[list[int], list[bool]]]) -> float:
    """Mean cross-entropy of the plain float64 reference over the tokens that carry loss, each sequence on its own."""
    adapter = adapter_tensors(model)
    backbone = tiny_model(vocab_size=model.config.vocab_size, dtype=torch.float64)
    total, count = 0.0, 0
    for ids, carries_loss in rows:
        tokens = torch.tensor(ids)
        logits = reference_logits(backbone, tokens, adapter)
        losses = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:], reduction="none")
        scored = torch.tensor(carries_loss[1:])
        total, count = total + losses[scored].sum().item(), count + int(scored.sum())
    return total / count


@pytest.mark.parametrize("kind", ["packed-text", "chat", "prompt-completion"])
def test_trl_dataset_formats_train_on_exactly_the_right_tokens(tmp_path, kind):
    dataset, extra = dataset_of_kind(kind)
    trainer = make_trainer(tmp_path, dataset, max_steps=1, per_device_train_batch_size=2, dtype=torch.float64, **extra)
    randomize_adapter(trainer.model, scale=0.3)  # non-uniform stream weights, prefixes that matter
    batch = next(iter(trainer.get_train_dataloader()))
    rows = batch_rows(batch)
    expected = expected_rows(kind, trainer.processing_class, dataset)
    assert rows and all(row in expected for row in rows), (rows, expected)
    if kind == "packed-text":
        assert len(rows) == 2 and batch["input_ids"].shape[0] == 1  # two documents in one padding-free row

    # TRL's loss for this batch is the reference's over exactly those tokens. Bound: the float64 model's logits are
    # within 1e-5·max(1, |logit|) of the reference (reference.LOGIT_TOLERANCE), and a cross-entropy moves by at most
    # twice its logits' largest change: 6e-5 for these logits of up to 3; 1e-4.
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert loss == pytest.approx(reference_mean_loss(trainer.model, rows), abs=1e-4)
    # Guards (the check can fail): the loss on the prompt too (5e-4 away on this untrained model), or the packed
    # documents read as one sequence, is outside the bound. Chat trains on every token: only its ids can be wrong.
    if kind == "prompt-completion":
        assert abs(reference_mean_loss(trainer.model, [(ids, [True] * len(ids)) for ids, _ in rows]) - loss) > 1e-4
    if kind == "packed-text":
        joined = [token for ids, _ in rows for token in ids]
        one_sequence = [(joined, [scored for _, marks in rows for scored in marks])]
        assert abs(reference_mean_loss(trainer.model, one_sequence) - loss) > 1e-4

    adapter_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [not torch.equal(p, adapter_before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert all(changed)


def test_regional_compilation_trains_as_eager_does(tmp_path, monkeypatch):
    """What ``parscale sft --torch_compile true`` launches: accelerate's regional compilation (its launcher sets this
    variable) compiles each decoder layer, with the ParScale attention inside, and the training losses are eager's.
    float32 on the CPU: inductor reorders sums, about 1e-7 relative per step, far below the 1e-5 bound."""
    train = windows(tiny_tokenizer(), source_texts(), 32)
    eager = make_trainer(tmp_path / "eager", train, trainer_cls=ParScaleSFTTrainer, max_steps=3, logging_steps=1)
    eager.train()
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
    compiled = make_trainer(
        tmp_path / "compiled", train, trainer_cls=ParScaleSFTTrainer, max_steps=3, logging_steps=1, torch_compile=True
    )
    compiled.train()
    layers = compiled.model_wrapped.get_base_model().model.layers
    assert all(type(layer).__name__ == "OptimizedModule" for layer in layers)
    losses = [[log["loss"] for log in run.state.log_history if "loss" in log] for run in (eager, compiled)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_training_leaves_cudnn_attention_out_and_restores_it(tmp_path):
    from torch._functorch import config as functorch_config
    from transformers import TrainerCallback

    class RecordCudnnAttention(TrainerCallback):
        seen: ClassVar[list[tuple[bool, bool]]] = []  # the Trainer makes its own instance: the class keeps the record

        def on_step_begin(self, args, state, control, **kwargs):
            # cuDNN's kernel, and whether compiled layers may take a graph traced under another kernel choice from
            # torch's compile cache (`compile_safe_sdpa_kernel`)
            self.seen.append((torch.backends.cuda.cudnn_sdp_enabled(), functorch_config.enable_autograd_cache))

    dataset, extra = dataset_of_kind("packed-text")
    trainer = make_trainer(
        tmp_path, dataset, trainer_cls=ParScaleSFTTrainer, max_steps=2, per_device_train_batch_size=2, **extra
    )
    trainer.add_callback(RecordCudnnAttention)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the default this test needs in order to be able to fail
    trainer.train()
    assert RecordCudnnAttention.seen == [(False, False), (False, False)]
    assert torch.backends.cuda.cudnn_sdp_enabled() and functorch_config.enable_autograd_cache
    # a plain SFTTrainer keeps torch's default: what the override changes
    plain = make_trainer(tmp_path / "plain", dataset, max_steps=1, per_device_train_batch_size=2, **extra)
    RecordCudnnAttention.seen = []
    plain.add_callback(RecordCudnnAttention)
    plain.train()
    assert RecordCudnnAttention.seen == [(True, True)]


def test_resume_from_checkpoint_ends_at_the_uninterrupted_adapter(tmp_path):
    tokenizer = tiny_tokenizer()
    train = windows(tokenizer, source_texts(), 24)
    uninterrupted = make_trainer(tmp_path / "a", train, max_steps=6, save_strategy="steps", save_steps=3)
    uninterrupted.train()
    # checkpoint-3 is what a run interrupted after step 3 leaves behind; a new process resumes from it
    resumed = make_trainer(tmp_path / "b", train, max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.state.global_step == 6

    def weights(trainer):
        return {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}

    expected, actual = weights(uninterrupted), weights(resumed)
    fresh = weights(make_trainer(tmp_path / "c", train))
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(actual[name], fresh[name])  # training moved every tensor


def test_model_card_is_written_on_save_and_kept_by_the_parscale_trainer(tmp_path):
    tokenizer = tiny_tokenizer()
    base_dir = save_tiny_checkpoint(tmp_path / "base")
    trainer = ParScaleSFTTrainer(
        model=str(base_dir),
        args=training_args(tmp_path / "out", max_steps=1),
        train_dataset=windows(tokenizer, source_texts(), 4),
        processing_class=tokenizer,
        peft_config=ParScaleConfig(P=3, prefix_length=5),
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="tiny")  # TRL rewrites README.md from its template here
    trainer.save_model()  # and saving twice must not repeat the section
    card = (tmp_path / "out" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "peft"
    assert {"parscale", "trl", "sft"} <= set(metadata["tags"])
    assert "base_model" not in metadata or not Path(str(metadata["base_model"])).is_dir()  # no local paths
    assert card.count("<!-- parscale:start -->") == 1
    assert "**P = 3**" in card and "**5**" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]  # the card's first snippet is ParScale's
    assert snippet.splitlines()[0].startswith("import peft_parscale")
    # the snippet runs as written once the adapter's location is filled in
    snippet = snippet.replace('"path/to/this/adapter"', repr(str(tmp_path / "out")))
    exec(compile(snippet, "model-card-snippet", "exec"), {})  # noqa: S102  (the card's own snippet, run as a user would)


def test_model_card_names_a_hub_base_model(tmp_path):
    config = ParScaleConfig(P=2, prefix_length=4, base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    config.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "Qwen/Qwen2.5-0.5B" and "parscale" in metadata["tags"]
    assert 'from_pretrained("Qwen/Qwen2.5-0.5B")' in card


def test_peft_flag_selects_the_adapter():
    parser = make_parser()
    cpu = ["--use_cpu", "true"]  # TRL's bf16 default needs a GPU otherwise
    *_, model_args, _, parscale_args = parser.parse_args_and_config(
        ["--output_dir", "x", "--P", "4", "--prefix_length", "16", "--smoothing", "0.1", *cpu]
    )
    config = peft_config_from_args(parscale_args, model_args)
    assert isinstance(config, ParScaleConfig) and (config.P, config.prefix_length, config.smoothing) == (4, 16, 0.1)
    assert config.init_std == ParScaleConfig().init_std

    *_, model_args, _, parscale_args = parser.parse_args_and_config(
        ["--output_dir", "x", "--peft", "lora", "--lora_r", "4", *cpu]
    )
    lora = peft_config_from_args(parscale_args, model_args)
    assert isinstance(lora, LoraConfig) and lora.r == 4
    *_, model_args, _, parscale_args = parser.parse_args_and_config(["--output_dir", "x", "--peft", "none", *cpu])
    assert peft_config_from_args(parscale_args, model_args) is None
    with pytest.raises(ValueError, match="--peft lora"):
        peft_config_from_args(parscale_args, dataclasses.replace(ModelConfig(), use_peft=True))


def test_help_lists_trl_and_parscale_flags():
    result = subprocess.run(
        [sys.executable, "-m", "peft_parscale.cli", "sft", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ["--P", "--prefix_length", "--smoothing", "--init_std", "--peft"]:  # ParScale's
        assert f"\n  {flag} " in result.stdout, flag
    for flag in ["--model_name_or_path", "--dataset_name", "--learning_rate", "--packing", "--lora_r"]:
        assert f"  {flag} " in result.stdout, flag  # TRL's
    top = subprocess.run(
        [sys.executable, "-m", "peft_parscale.cli", "--help"], check=False, capture_output=True, text=True
    )
    assert top.returncode == 0 and "sft" in top.stdout and "import-official" in top.stdout


def test_parscale_sft_runs_a_recipe_end_to_end_through_accelerate(tmp_path):
    recipe = ROOT / "recipes" / "qwen2.5-0.5b-code-p2.yaml"
    recipe_settings = yaml.safe_load(recipe.read_text())
    base_dir = save_tiny_checkpoint(tmp_path / "base")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    field = recipe_settings.get("dataset_text_field", "text")
    for split, texts in {"train": source_texts()[:4], "test": source_texts()[4:]}.items():
        with open(data_dir / f"{split}.jsonl", "w") as file:
            file.writelines(json.dumps({field: text}) + "\n" for text in texts)
    overrides = {
        "model_name_or_path": str(base_dir),
        "dataset_name": str(data_dir),
        "output_dir": str(tmp_path / "out"),
        "max_steps": "2",
        "max_length": "32",
        "per_device_train_batch_size": "2",
        "gradient_accumulation_steps": "1",
        "dtype": "float32",
        "bf16": "false",
        "use_cpu": "true",
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "prefix_length": "4",
    }
    argv = ["sft", "--config", str(recipe)] + [item for key, value in overrides.items() for item in (f"--{key}", value)]
    assert parscale_main(argv) == 0  # accelerate launches `python -m peft_parscale.sft` in a new process
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PARSCALE" and saved["P"] == recipe_settings["P"] == 2
    assert saved["prefix_length"] == 4  # the command line overrides the recipe
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any("parscale_aggregator" in name for name in weights)
    assert "<!-- parscale:start -->" in (tmp_path / "out" / "README.md").read_text()


def test_every_recipe_parses_with_the_sft_parser():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 24
    parser = make_parser()
    for recipe in recipes:
        *_, model_args, _, parscale_args = parser.parse_args_and_config(["--config", str(recipe), "--use_cpu", "true"])
        config = peft_config_from_args(parscale_args, model_args)
        assert isinstance(config, ParScaleConfig) and config.P in (2, 4, 8), recipe.name
        assert model_args.model_name_or_path.startswith("Qwen/Qwen2.5-"), recipe.name
        assert "sized for" in recipe.read_text().lower(), recipe.name


def test_trl_default_bf16_autocast_trains(tmp_path):
    # TRL trains in bf16 by default: a float32 model then runs under autocast, where queries/keys leave the rotary
    # embedding in float32 and values in bfloat16 until sdpa casts them
    tokenizer = tiny_tokenizer()
    trainer = make_trainer(tmp_path, windows(tokenizer, source_texts(), 8), max_steps=2, bf16=True)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
