"""The examples run end to end in their smoke modes (a tiny random model), as they would on a real one."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

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
