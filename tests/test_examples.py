"""The examples run end to end in their smoke modes (a tiny random model), as they would on a real one."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SUBPROCESS_TIMEOUT
from datasets import Dataset
from tiny_models import tiny_model, tiny_tokenizer
from trl import SFTConfig, SFTTrainer

import peft_parscale  # noqa: F401  (registers the PEFT type)
from peft_parscale import ParScaleConfig
from peft_parscale.data import document_windows

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, cwd: Path, folder: str = "examples", succeeds: bool = True) -> str:
    """Run ``python FOLDER/NAME ARGS`` in `cwd`; its standard output, once it has succeeded (with ``succeeds=False``:
    both its streams, once it has failed)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / folder / name), *args],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert (result.returncode == 0) == succeeds, result.stderr[-3000:]
    return result.stdout if succeeds else result.stdout + result.stderr


def test_quickstart_smoke(tmp_path):
    stdout = run_example("quickstart.py", "--smoke", "--output-dir", "out", cwd=tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["P"] for row in results["rows"]] == [None, 1, 2]
    assert results["rows"][0]["trainable"] == 0 and results["rows"][2]["trainable"] > results["rows"][1]["trainable"]
    assert all(row["loss"] > 0 for row in results["rows"])
    assert "| ParScale P=2 |" in stdout and set(results["completions"]) == {"base", "P=1", "P=2"}
    for P in (1, 2):
        assert json.loads((tmp_path / "out" / f"P{P}" / "adapter_config.json").read_text())["P"] == P


def test_inference_smoke_switches_adapters(tmp_path):
    stdout = run_example("inference.py", "--smoke", "--max-new-tokens", "4", cwd=tmp_path)
    assert [line for line in stdout.splitlines() if line.startswith("adapter ")] == [
        "adapter p2: P=2, T=4",
        "adapter p4: P=4, T=4",
        "adapter p8: P=8, T=4",
    ]
    for served in ("p2", "p8", "p4", "base"):
        assert f"=== request served by {served} " in stdout


def test_hub_example_saves_the_card(tmp_path):
    stdout = run_example("hub.py", "--smoke", "--save-dir", "card", cwd=tmp_path)
    card = (tmp_path / "card" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "peft"
    assert "import peft_parscale" in stdout and "adapter_model.safetensors" in stdout


def test_committed_recipes_are_the_generator_s_output():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    expected = generate.all_recipes()
    committed = {path.stem: path.read_text() for path in (ROOT / "recipes").glob("*.yaml")}
    assert committed == expected


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quickstart"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quickstart_plan_fits_the_budget(monkeypatch):
    quickstart = load_quickstart()
    # 6 s per training step and 2 s per evaluation batch of 4, both measured at P=1
    monkeypatch.setattr(quickstart, "seconds_per_batch", lambda trainer: (6.0, 2.0))
    args = argparse.Namespace(P=[1, 2], batch_size=4, steps=None, eval_sequences=None)
    plan = quickstart.plan_run(args, trainer=None, seconds_left=1000.0)
    # 900 s after the 10% reserve. Evaluation: base once and each adapter twice = 1 + 2·(1 + 2) = 7 single-stream
    # passes at 0.5 s per window; its 25% share (225 s) fits 64 windows, capped at 32, so 112 s. Training: 1 + 2 = 3
    # single-stream steps of 6 s per step, (900 - 112) / 18 = 43.8, so 43 steps.
    assert (plan.steps, plan.eval_sequences) == (43, 32)
    assert plan.predicted_seconds == pytest.approx(112 + 43 * 18)
    given = quickstart.plan_run(argparse.Namespace(**{**vars(args), "steps": 40}), trainer=None, seconds_left=1000.0)
    # 40 steps take 720 s, leaving 180 s: 180 / 3.5 = 51 windows, capped at 32
    assert (given.steps, given.eval_sequences) == (40, 32)
    tight = quickstart.plan_run(args, trainer=None, seconds_left=100.0)
    # 90 s: the evaluation share (22.5 s) fits 6 windows, rounded down to a batch (4); training (90 - 14) / 18 = 4.2
    assert (tight.steps, tight.eval_sequences) == (4, 4)


def test_quickstart_timing_probe_leaves_the_adapter_unchanged(tmp_path):
    quickstart = load_quickstart()
    tokenizer = tiny_tokenizer()
    token_ids = tokenizer(["def f(x):\n    return x + 1\n" * 20])["input_ids"]
    windows = Dataset.from_dict({"input_ids": document_windows(token_ids, 32, min_length=32)})
    trainer = SFTTrainer(
        model=tiny_model(vocab_size=len(tokenizer)),
        args=SFTConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            max_length=32,
            report_to="none",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
        ),
        train_dataset=windows,
        processing_class=tokenizer,
        peft_config=ParScaleConfig(P=2, prefix_length=4),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    train_seconds, eval_seconds = quickstart.seconds_per_batch(trainer)
    assert train_seconds > 0 and eval_seconds > 0
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert all(p.grad is None for p in trainer.model.parameters())
