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
from datasets import Dataset
from tiny_models import tiny_model, tiny_tokenizer
from trl import SFTConfig, SFTTrainer

import peft_parscale  # noqa: F401  (registers the PEFT type)
from peft_parscale import ParScaleConfig
from peft_parscale.data import document_windows
from peft_parscale.function_pairs import DROP_REASONS

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart_smoke(tmp_path):
    stdout = run_example("quickstart.py", "--smoke", "--output-dir", "out", cwd=tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["P"] for row in results["rows"]] == [None, 1, 2]
    assert results["rows"][0]["trainable"] == 0 and results["rows"][2]["trainable"] > results["rows"][1]["trainable"]
    assert all(row["loss"] > 0 for row in results["rows"])
    assert "| ParScale P=2 |" in stdout and set(results["completions"]) == {"base", "P=1", "P=2"}
    for P in (1, 2):
        assert json.loads((tmp_path / "out" / f"P{P}" / "adapter_config.json").read_text())["P"] == P


def test_scaling_experiment_smoke(tmp_path):
    stdout = run_example(
        "scaling_experiment.py", "--smoke", "--models", "base", "P1", "P2", "--output-dir", "out", cwd=tmp_path
    )
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["P"] for row in summary["rows"]] == [None, 1, 2]
    assert summary["rows"][0]["trainable_parameters"] == 0 < summary["rows"][1]["trainable_parameters"]
    assert {row["train_tokens"] for row in summary["rows"][1:]} == {256}  # equal token budgets
    assert summary["adapter_configs"]["P2"]["P"] == 2
    assert "log_linear_fit" in summary and (tmp_path / "out" / "streams.png").is_file()
    assert "| P=2 |" in stdout


def test_humaneval_experiment_smoke(tmp_path):
    stdout = run_example(
        "humaneval_experiment.py", "--smoke", "--models", "base", "P2", "--compare", "P2:base",
        "--output-dir", "out", cwd=tmp_path,
    )  # fmt: skip
    out = tmp_path / "out"
    stats = json.loads((out / "data" / "stats.json").read_text())["stats"]
    assert stats["train"] > 0 and stats["test"] > 0
    kept = stats["train"] + stats["validation"] + stats["test"]
    assert stats["validation"] > 0 and stats["functions"] == sum(stats[reason] for reason in DROP_REASONS) + kept
    summary = json.loads((out / "results.json").read_text())
    rows = {row["name"]: row for row in summary["rows"]}
    assert list(rows) == ["base", "P2"] and rows["base"]["train_tokens"] is None and rows["P2"]["train_tokens"] > 0
    metrics = ["completion_pass@1", "chat_pass@1", "sampled_pass@1", "sampled_pass@10", "heldout_loss"]
    for row in rows.values():
        assert all(row[metric]["low"] <= row[metric]["value"] <= row[metric]["high"] for metric in metrics)
    # raw samples: every generated text with its checker's verdict, 10 per problem when sampling
    sampled = json.loads((out / "P2" / "sampled.json").read_text())["completion"]
    assert [sample["task_id"] for sample in sampled["samples"]] == ["HumanEval/0"] * 10 + ["HumanEval/53"] * 10
    assert all(
        isinstance(sample["generated"], str) and isinstance(sample["passed"], bool) for sample in sampled["samples"]
    )
    # with n samples, pass@1 is the mean pass rate (c/n per problem, averaged)
    passed = [sample["passed"] for sample in sampled["samples"]]
    assert rows["P2"]["sampled_pass@1"]["value"] == pytest.approx(sum(passed) / len(passed))
    greedy = json.loads((out / "P2" / "greedy.json").read_text())
    assert [len(greedy[mode]["samples"]) for mode in ("completion", "chat")] == [2, 2]
    loss = json.loads((out / "P2" / "loss.json").read_text())
    assert loss["pairs"] == 4 and rows["P2"]["heldout_loss"]["value"] == pytest.approx(loss["loss"])
    comparisons = {(c["first"], c["second"], c["metric"]): c for c in summary["comparisons"]}
    assert set(comparisons) == {("P2", "base", metric) for metric in metrics}
    assert all(0 <= c["bootstrap_pvalue"] <= 1 for c in comparisons.values())
    assert (
        "mcnemar" in comparisons["P2", "base", "chat_pass@1"]
        and "mcnemar" not in comparisons["P2", "base", "heldout_loss"]
    )
    assert "| P2 − base |" in stdout and (out / "pass_at_k.png").is_file()


def test_humaneval_experiment_phases():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import humaneval_experiment as experiment
    finally:
        sys.path.pop(0)
    plan = experiment.phases(experiment.parse_args(["--only", "prepare", "train:P8", "eval:base", "loss:P8"]))
    assert plan == [
        ("prepare", None),
        ("train", "P8"),
        ("greedy", "base"),
        ("sampled", "base"),
        ("loss", "base"),
        ("loss", "P8"),
    ]
    everything = experiment.phases(experiment.parse_args(["--models", "base", "P2"]))
    assert everything == [("prepare", None)] + [(phase, "base") for phase in ("greedy", "sampled", "loss")] + [
        ("train", "P2"),
        *[(phase, "P2") for phase in ("greedy", "sampled", "loss")],
    ]
    for bad in ["train:base", "eval:Q3", "greedy", "eval:P0", "score:P2", "train:base@1e-3", "val:lora@x", "eval:P1T0"]:
        with pytest.raises(ValueError):
            experiment.phases(experiment.parse_args(["--only", bad]))
    Arm = experiment.Arm
    assert [experiment.parse_arm(name) for name in ("base", "P8", "P1T384", "P1T384@0.015", "lora@3e-4", "lora")] == [
        Arm("base"),
        Arm("parscale", 8),
        Arm("parscale", 1, 384),
        Arm("parscale", 1, 384, 0.015),
        Arm("lora", learning_rate=3e-4),
        Arm("lora"),
    ]
    with pytest.raises(ValueError, match="LoRA needs its own learning rate"):
        experiment.learning_rate(experiment.parse_args([]), Arm("lora"))


def test_humaneval_experiment_chooses_learning_rate_on_validation(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import humaneval_experiment as experiment
    finally:
        sys.path.pop(0)
    args = experiment.parse_args(["--output-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="run val:lora@<rate> first"):
        experiment.chosen_on_validation(args, "lora@best")
    # per-token mean over pairs: 3e-4 has the lower mean (7/5 = 1.4 against 3/2 = 1.5) though its first pair is worse
    for name, nll, tokens in (("lora@1e-4", [1.0, 2.0], [1, 1]), ("lora@3e-4", [3.0, 4.0], [1, 4])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "val.json").write_text(json.dumps({"nll": nll, "scored_tokens": tokens}))
    (tmp_path / "P1T384@1").mkdir()  # another arm's grid is not looked at
    (tmp_path / "P1T384@1" / "val.json").write_text(json.dumps({"nll": [0.0], "scored_tokens": [1]}))
    assert experiment.chosen_on_validation(args, "lora@best") == "lora@3e-4"


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


def test_stream_sweep_smoke_two_processes_interrupted_and_resumed(tmp_path):
    common = ("--smoke", "--num-processes", "2", "--output-dir", "out")
    # Past its deadline before it starts, P2 trains one step, saves a checkpoint and stops; the next call resumes it.
    run_example(
        "stream_sweep.py", *common, "--runs", "P2", "--time-limit", "0", "--launch-margin", "-600", cwd=tmp_path
    )
    assert not (tmp_path / "out" / "P2" / "result.json").exists()
    assert [path.name for path in (tmp_path / "out" / "P2").glob("checkpoint-*")] == ["checkpoint-1"]
    stdout = run_example("stream_sweep.py", *common, cwd=tmp_path)  # base, P1, P2, P4

    results = {P: json.loads((tmp_path / "out" / f"P{P}" / "result.json").read_text()) for P in (1, 2, 4)}
    for result in results.values():
        assert result["processes"] == 2 and result["steps"] == 6 and result["train_tokens"] == 6 * 4 * 32
        assert [tokens for tokens, _ in result["heldout_curve"]] == [0, 256, 512, 768]
    assert [segment["resumed_from"] is not None for segment in results[2]["segments"]] == [False, True]
    assert [segment["resumed_from"] for segment in results[1]["segments"]] == [None]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["log_linear_fit"]["r2"] <= 1 and [tokens for tokens, _ in report["gaps"]["4"]] == [0, 256, 512, 768]
    assert report["gap_fit"]["P"] == 4 and (tmp_path / "out" / "curves.png").is_file()
    assert "| base (no adapter) |" in stdout and "| P=2 | 768 |" in stdout
