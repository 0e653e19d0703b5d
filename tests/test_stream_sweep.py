"""The stream sweep (experiments/stream_sweep.py) trains, interrupts, resumes and reports as its docstring says, on a
tiny random model; and the device transfer of its runs (experiments/device_transfer.py)."""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CPU_RESUME_FAILS_UPSTREAM, UPSTREAM_RESUME_ERROR
from safetensors.torch import load_file
from test_experiments import import_experiment, run_experiment
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_parscale.testing import save_tiny_checkpoint


def lora_parameters(config: dict, rank: int) -> int:
    """LoRA's trainable parameters on every linear layer of a Qwen2 decoder: rank · (inputs + outputs) for the query,
    key, value and output projections and the MLP's gate, up and down projections of each layer (not the head)."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    query, key_value = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = [(hidden, query), (hidden, key_value), (hidden, key_value), (query, hidden)]
    shapes += [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return config["num_hidden_layers"] * sum(rank * (inputs + outputs) for inputs, outputs in shapes)


def test_stream_sweep_smoke_every_arm_two_processes_interrupted_and_resumed(tmp_path):
    common = ("--smoke", "--num-processes", "2", "--output-dir", "out")
    # Past its deadline before it starts, LoRA trains one step, saves a checkpoint and stops; the next call resumes it
    # (ParScale's checkpoints resume as the trainer's do: test_sft.py).
    run_experiment(
        "stream_sweep.py", *common, "--runs", "lora@1e-3", "--time-limit", "0", "--launch-margin", "-600", cwd=tmp_path
    )
    assert not (tmp_path / "out" / "lora@1e-3" / "result.json").exists()
    assert [path.name for path in (tmp_path / "out" / "lora@1e-3").glob("checkpoint-*")] == ["checkpoint-1"]
    # as between two device sessions: the run goes away in chunks and comes back (`device_transfer.py`)
    transfer = import_experiment("device_transfer")
    transfer.pack(tmp_path / "out" / "lora@1e-3", tmp_path / "pack", chunk_bytes=2**16)
    shutil.rmtree(tmp_path / "out" / "lora@1e-3")
    transfer.unpack(tmp_path / "pack", tmp_path / "out" / "lora@1e-3")
    if CPU_RESUME_FAILS_UPSTREAM:  # the known upstream failure of resuming on two CPU processes (conftest), no other
        assert UPSTREAM_RESUME_ERROR in run_experiment("stream_sweep.py", *common, cwd=tmp_path, succeeds=False)
        return
    stdout = run_experiment("stream_sweep.py", *common, cwd=tmp_path)  # base, P1, P2, P4, P1T8, lora@1e-3

    names = ["P1", "P2", "P4", "P1T8", "lora@1e-3"]
    results = {name: json.loads((tmp_path / "out" / name / "result.json").read_text()) for name in names}
    for result in results.values():
        assert result["processes"] == 2 and result["steps"] == 6 and result["train_tokens"] == 6 * 4 * 32
        assert result["gradients_averaged"]  # the model was wrapped in DDP
        assert [tokens for tokens, _ in result["heldout_curve"]] == [0, 256, 512, 768]
        assert math.isfinite(result["validation_loss"]) and result["trainable_parameters"] > 0
        # the adapter file holds the trainable parameters in float32, and a header
        assert 0 < result["adapter_bytes"] - 4 * result["trainable_parameters"] < 2**16
    assert [segment["resumed_from"] is not None for segment in results["lora@1e-3"]["segments"]] == [False, True]
    for name, result in results.items():  # each window's loss, scored after training: its mean is the trainer's last
        # held-out evaluation (float32 sums of 256 token losses near 4.6 in other orders: < 256 · 1.2e-7 · 4.6 < 2e-4)
        losses = json.loads((tmp_path / "out" / name / "window_losses.json").read_text())
        assert len(losses["heldout"]) == 8 and len(losses["validation"]) == 8
        assert sum(losses["heldout"]) / 8 == pytest.approx(result["heldout_curve"][-1][1], abs=2e-4), name
    assert [segment["resumed_from"] for segment in results["P1"]["segments"]] == [None]
    assert (results["P1T8"]["P"], results["P1T8"]["prefix_length"], results["P1"]["prefix_length"]) == (1, 8, 4)
    # P=1 has no aggregator: twice the prefix length, twice the prefix parameters
    assert results["P1T8"]["trainable_parameters"] == 2 * results["P1"]["trainable_parameters"]
    config = json.loads((tmp_path / "out" / "tiny-qwen2" / "config.json").read_text())
    lora = results["lora@1e-3"]
    assert (lora["kind"], lora["lora_rank"], lora["learning_rate"]) == ("lora", 16, 1e-3)
    assert lora["trainable_parameters"] == lora_parameters(config, 16)
    # LoRA starts as the base model (B = 0): the trainer's held-out loss at the start is the base model's, up to
    # float32 summation of 256 token losses near 4.6 in another order (256 · 1.2e-7 · 4.6 < 2e-4)
    base = json.loads((tmp_path / "out" / "base" / "result.json").read_text())
    assert lora["heldout_curve"][0][1] == pytest.approx(base["heldout_loss"], abs=2e-4)
    assert math.isfinite(base["validation_loss"]) and base["validation_loss"] != base["heldout_loss"]

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["log_linear_fit"]["P"] == [1, 2, 4] and report["log_linear_fit"]["r2"] <= 1  # P<n> at T=4 only
    assert ("P2", "P1T8") in [(row["first"], row["second"]) for row in report["paired"]]  # T=4: P=2's prefix count
    assert [tokens for tokens, _ in report["gaps"]["4"]] == [0, 256, 512, 768]
    # three evaluations after the start: too few for the gap's fit once the first is left out (next test)
    assert "gap_fit" not in report and (tmp_path / "out" / "curves.png").is_file()
    assert list(report["curves"]) == ["P1", "P1T8", "P2", "P4", "lora@1e-3"]
    assert "| base (no adapter) |" in stdout
    for name in names:
        assert f"| {name} | {results[name]['learning_rate']:g} |" in stdout


def fake_run(run: Path) -> dict[str, bytes]:
    """A run folder as the sweep leaves it after two segments, with random contents; returns every file's bytes."""
    generator = torch.Generator().manual_seed(0)
    names = ["segment-0.json", "segment-2.json", "initial_adapter/adapter_model.safetensors"]
    for step in (2, 5):
        names += [f"checkpoint-{step}/{name}" for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")]
        names += [f"checkpoint-{step}/{name}" for name in ("rng_state.pth", "trainer_state.json", "tokenizer.json")]
        names += [f"checkpoint-{step}/README.md"]
    contents = {}
    for name in names:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        contents[name] = bytes(torch.randint(256, (3000,), generator=generator, dtype=torch.uint8).tolist())
        (run / name).write_bytes(contents[name])
    return contents


def test_device_transfer_carries_the_latest_checkpoint_and_the_run_s_own_files(tmp_path):
    transfer = import_experiment("device_transfer")
    contents = fake_run(tmp_path / "run")
    manifest = transfer.pack(tmp_path / "run", tmp_path / "pack", chunk_bytes=10_000)
    assert len(manifest["chunks"]) > 2  # several chunks, joined in order on the way back
    assert all(chunk["bytes"] <= 10_000 for chunk in manifest["chunks"])
    transfer.unpack(tmp_path / "pack", tmp_path / "back")
    wanted = ["segment-0.json", "segment-2.json"]
    wanted += [f"checkpoint-5/{name}" for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")]
    wanted += ["checkpoint-5/rng_state.pth", "checkpoint-5/trainer_state.json"]
    files = [path for path in (tmp_path / "back").rglob("*") if path.is_file()]
    back = {str(path.relative_to(tmp_path / "back")): path.read_bytes() for path in files}
    assert back == {name: contents[name] for name in wanted}


def test_device_transfer_checks_every_chunk_before_writing_anything(tmp_path):
    transfer = import_experiment("device_transfer")
    fake_run(tmp_path / "run")
    transfer.pack(tmp_path / "run", tmp_path / "pack", chunk_bytes=10_000)
    chunk = tmp_path / "pack" / "chunk-01"
    intact = chunk.read_bytes()
    chunk.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    with pytest.raises(ValueError, match="chunk-01 does not match its SHA-256"):
        transfer.unpack(tmp_path / "pack", tmp_path / "back")
    chunk.unlink()
    with pytest.raises(ValueError, match="chunk-01 is missing"):
        transfer.unpack(tmp_path / "pack", tmp_path / "back")
    assert not (tmp_path / "back").exists()
    chunk.write_bytes(intact)
    with pytest.raises(ValueError, match="already holds a checkpoint"):  # a run's own checkpoints are never replaced
        transfer.unpack(tmp_path / "pack", tmp_path / "run")
    with pytest.raises(ValueError, match="nothing to resume"):
        transfer.pack(tmp_path / "pack", tmp_path / "pack-of-pack")
    with pytest.raises(ValueError, match="is not empty"):  # a newer pack never lands beside an older one's chunks
        transfer.pack(tmp_path / "run", tmp_path / "pack")


def stream_sweep_adapter(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(folder / name / "adapter" / "adapter_model.safetensors")


def test_stream_sweep_trains_runs_side_by_side_as_it_trains_them_alone(tmp_path):
    """Two runs at once on one device train what each trains alone: on the CPU, the same computation by one process
    with the same threads, so the same adapter bit for bit. They record that they shared it, and the report shows no
    speed for them."""
    common = ("--smoke", "--num-processes", "1", "--eval-every", "0", "--runs", "P2", "lora@1e-3")
    run_experiment("stream_sweep.py", *common, "--output-dir", "alone", cwd=tmp_path)
    stdout = run_experiment("stream_sweep.py", *common, "--side-by-side", "2", "--output-dir", "together", cwd=tmp_path)
    for name in ("P2", "lora@1e-3"):
        alone, together = (stream_sweep_adapter(tmp_path / folder, name) for folder in ("alone", "together"))
        assert alone.keys() == together.keys() and alone
        assert all(torch.equal(alone[key], together[key]) for key in alone), name
        results = [
            json.loads((tmp_path / folder / name / "result.json").read_text()) for folder in ("alone", "together")
        ]
        assert [result["gpu_shared_by"] for result in results] == [1, 2]
        assert [segment["gpu_shared_by"] for segment in results[1]["segments"]] == [2]
        (segment,) = results[1]["segments"]  # what side by side overlaps: loading, then the first steps' compiling
        assert segment["setup_s"] > 0 and 0 < segment["first_steps_s"] <= segment["seconds"]
        assert segment["device"] == import_experiment("common").device_name()
        assert results[0]["steady_tokens_per_s"] is not None and results[1]["steady_tokens_per_s"] is None
        row = next(
            line for line in stdout.splitlines() if line.startswith(f"| {name} | {results[1]['learning_rate']:g} |")
        )
        assert row.endswith("| - |")  # the arms table's last column: steady tokens/s
        assert (tmp_path / "together" / "logs" / f"{name}.log").is_file()
    with pytest.raises(SystemExit):  # one device, so one process per run
        import_experiment("stream_sweep").parse_args(["--side-by-side", "2", "--num-processes", "2"])


def test_stream_sweep_micro_batch_changes_no_gradient(tmp_path):
    """--stream-sequences sets the sequences per forward pass, and gradient accumulation makes up the same batch of
    windows in the same order (all of one length, so a mean per micro-batch and over the batch agree), so SGD moves
    the adapter the same way. Micro-batches of 4 and 1 sum the same float32 terms in other orders: about 1e-7
    relative per step, far below the 1e-5 bound after 6 steps on weights of order 0.01 to 1."""
    common = ("--smoke", "--num-processes", "1", "--eval-every", "0", "--optim", "sgd", "--runs", "P2")
    for sequences in ("8", "2"):  # P=2: 4 sequences per forward pass (the whole batch), then 1
        run_experiment(
            "stream_sweep.py", *common, "--stream-sequences", sequences, "--output-dir", sequences, cwd=tmp_path
        )
    results = [json.loads((tmp_path / folder / "P2" / "result.json").read_text()) for folder in ("8", "2")]
    assert [result["micro_batch"] for result in results] == [4, 1]
    whole, split = (stream_sweep_adapter(tmp_path / folder, "P2") for folder in ("8", "2"))
    initial = load_file(tmp_path / "8" / "P2" / "initial_adapter" / "adapter_model.safetensors")
    assert whole.keys() == split.keys() == initial.keys()
    assert any(not torch.equal(whole[key], initial[key]) for key in whole)  # training moved it
    for key in whole:
        assert torch.allclose(whole[key], split[key], rtol=0, atol=1e-5), key


def test_stream_sweep_gradient_checkpointing_changes_no_value(tmp_path):
    """The sweep trains without recomputation unless --gradient-checkpointing asks for it (TRL's default, which the
    finished runs took); each segment records which. Recomputation runs each decoder layer's forward pass again
    inside the backward pass, ParScale's prefix attention included, and must compute the same values: on the CPU the
    same float32 operations in the same order, so the same adapter bit for bit after 6 steps."""
    common = ("--smoke", "--num-processes", "1", "--eval-every", "0", "--runs", "P2")
    run_experiment("stream_sweep.py", *common, "--output-dir", "plain", cwd=tmp_path)
    run_experiment("stream_sweep.py", *common, "--gradient-checkpointing", "--output-dir", "recomputed", cwd=tmp_path)
    results = [json.loads((tmp_path / folder / "P2" / "result.json").read_text()) for folder in ("plain", "recomputed")]
    assert [[segment["gradient_checkpointing"] for segment in result["segments"]] for result in results] == [
        [False],
        [True],
    ]
    plain, recomputed = (stream_sweep_adapter(tmp_path / folder, "P2") for folder in ("plain", "recomputed"))
    initial = load_file(tmp_path / "plain" / "P2" / "initial_adapter" / "adapter_model.safetensors")
    assert plain.keys() == recomputed.keys() == initial.keys()
    assert any(not torch.equal(plain[key], initial[key]) for key in plain)  # training moved it
    assert all(torch.equal(plain[key], recomputed[key]) for key in plain)


def test_stream_sweep_tags_name_variants_after_a_dash(capsys):
    sweep = import_experiment("stream_sweep")
    # --tag fp32 names the runs as --tag=-fp32 did (the results already in results/stream-sweep/ keep their names)
    for argv in (["--tag", "fp32"], ["--tag=-fp32"], ["--tag=fp32"]):
        assert sweep.run_dir(sweep.parse_args(argv), "P8").name == "P8-fp32"
    assert sweep.run_dir(sweep.parse_args(["--tag", "fp32-2gpu"]), "P8").name == "P8-fp32-2gpu"
    assert sweep.run_dir(sweep.parse_args([]), "P8").name == "P8"
    # argparse reads "-fp32" after a space as a flag: the error says what to write
    with pytest.raises(SystemExit):
        sweep.parse_args(["--runs", "P8", "--tag", "-fp32", "--float32"])
    assert "write the tag without its dash: --tag fp32 names the runs P8-fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.parse_args(["--tag", "fp32/2gpu"])  # it names a folder
    assert "a tag is letters, digits" in capsys.readouterr().err


def test_stream_sweep_refuses_runs_it_cannot_train_before_anything_starts(tmp_path, capsys, monkeypatch):
    sweep = import_experiment("stream_sweep")

    def started(*args, **kwargs):
        raise AssertionError("a run the sweep cannot train got as far as preparing data")

    monkeypatch.setattr(sweep, "model_path", started)  # what preparing, the base model and training start with
    refused = {
        "lora": "LoRA needs its own learning rate",
        "P4+div0.1": "the sweep trains no stream-diversity term",
        "lora@best": "choose one by a grid's validation loss",
        "base@1e-3": "models are named base",
        "P0": "models are named base",
    }
    for name, message in refused.items():
        with pytest.raises(SystemExit):
            sweep.main(["--runs", "P1", name, "--output-dir", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    args = sweep.parse_args(["--runs", "lora", "P1T192@1.5e-2", "--lora-learning-rate", "2e-4", "--tag", "grid"])
    assert [sweep.run_dir(args, name).name for name in args.runs] == ["lora-grid", "P1T192@1.5e-2-grid"]


def write_sweep_result(folder: Path, **result) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"name": folder.name, **result}))


def test_stream_sweep_report_fits_ln_p_over_the_default_p_runs_and_picks_rates_on_validation(tmp_path):
    sweep_results = import_experiment("sweep_results")
    finals = {1: 1.40, 2: 1.38, 4: 1.37, 8: 1.33}
    common = {"train_tokens": 1024, "steady_tokens_per_s": None, "prefix_length": 48, "learning_rate": 0.05}
    for P, final in finals.items():  # P1 as the first runs wrote it: no arm, kind or validation loss
        extra = {} if P == 1 else {"arm": f"P{P}", "kind": "parscale", "validation_loss": final + 0.1}
        write_sweep_result(tmp_path / f"P{P}", P=P, heldout_curve=[(0, 1.5), (1024, final)], **common, **extra)
    others = {  # not the sweep's P<n>: another rate, another prefix length, LoRA
        "P8@0.02": {"P": 8, "kind": "parscale", "learning_rate": 0.02},
        "P1T192": {"P": 1, "kind": "parscale", "prefix_length": 192},
        "lora@6e-4": {"P": None, "kind": "lora", "prefix_length": None, "learning_rate": 6e-4},
    }
    for name, changes in others.items():
        result = {**common, "arm": name, "heldout_curve": [(0, 1.5), (1024, 1.2)], "validation_loss": 1.3, **changes}
        write_sweep_result(tmp_path / name, **result)
    grid = {"lora@2e-4": 1.31, "lora@6e-4": 1.29, "lora@2e-3": 1.35, "P1T192@0.015": 1.4}
    for name, validation in grid.items():  # a grid under --tag grid, never evaluated on held-out windows
        rate = float(name.partition("@")[2])
        kind = "lora" if name.startswith("lora") else "parscale"
        result = {**common, "arm": name, "kind": kind, "learning_rate": rate, "heldout_curve": []}
        result["validation_loss"] = validation
        write_sweep_result(tmp_path / f"{name}-grid", **result)
    write_sweep_result(tmp_path / "P8-1gpu", P=8, heldout_curve=[(1024, 1.0)], **common)  # a speed check
    write_sweep_result(tmp_path / "base", P=None, heldout_loss=1.45)

    summary = sweep_results.report(tmp_path, default_prefix_length=48, default_learning_rate=0.05)
    fit = summary["log_linear_fit"]
    assert fit["P"] == [1, 2, 4, 8]
    # the least-squares line through (ln P, loss), written out: slope = cov / var, loss = intercept - slope · ln P;
    # both in float64, so they differ by rounding only, far below 1e-9
    x, y = [math.log(P) for P in finals], list(finals.values())
    mean_x, mean_y = sum(x) / 4, sum(y) / 4
    slope = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / sum((a - mean_x) ** 2 for a in x)
    assert fit["slope"] == pytest.approx(-slope, rel=1e-9)
    assert fit["intercept"] == pytest.approx(mean_y - slope * mean_x, rel=1e-9)
    assert list(summary["curves"]) == ["P1", "P1T192", "P2", "P4", "P8@0.02", "P8", "lora@6e-4"]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in summary["table"].splitlines()[2:]]
    assert rows == ["base (no adapter)", "P1", "P1T192", "P2", "P4", "P8@0.02", "P8", "lora@6e-4"]
    assert "| P1 | 0.05 | - | - | 1,024 | 1.5000 | 1.4000 | -0.0500 | - | - |" in summary["table"]
    assert summary["grids"]["lora-grid"]["lowest"]["run"] == "lora@6e-4-grid"
    assert summary["grids"]["P1T192-grid"]["lowest"]["learning_rate"] == 0.015
    assert set(summary["grids"]) == {"lora-grid", "P1T192-grid"}  # not P8-1gpu, a speed check of the first runs
    assert "| lora-grid | lora@6e-4-grid | 0.0006 | 1.2900 | yes |" in summary["grid_table"]
    # runs named P<n> but trained at another prefix length or rate than the defaults are not the sweep
    for prefix_length, learning_rate in ((64, 0.05), (48, 0.02)):
        assert "log_linear_fit" not in sweep_results.report(tmp_path, prefix_length, learning_rate)


def test_stream_sweep_report_compares_arms_window_by_window(tmp_path):
    sweep_results = import_experiment("sweep_results")
    common = {"train_tokens": 1024, "steady_tokens_per_s": None, "learning_rate": 0.05, "heldout_curve": [(0, 1.5)]}
    arms = {"P1": (1, 48), "P4": (4, 48), "P8": (8, 48), "P1T192@0.02": (1, 192), "P1T96": (1, 96), "P4T12": (4, 12)}
    for name, (P, prefix_length) in arms.items():
        write_sweep_result(tmp_path / name, arm=name, kind="parscale", P=P, prefix_length=prefix_length, **common)
    write_sweep_result(tmp_path / "lora@6e-4", arm="lora@6e-4", kind="lora", P=None, prefix_length=None, **common)
    write_sweep_result(tmp_path / "base", P=None, heldout_loss=1.45)
    generator = torch.Generator().manual_seed(0)
    windows = 1.0 + torch.rand(12, generator=generator, dtype=torch.float64)  # each window's difficulty, shared
    shifts = {"base": 0.1, "P1": 0.0, "P4": -0.004, "P8": -0.006, "P1T192@0.02": -0.005, "lora@6e-4": -0.08}
    noise = {name: 0.002 * torch.randn(12, generator=generator, dtype=torch.float64) for name in shifts}
    losses = {name: windows + shift + noise[name] for name, shift in shifts.items()}
    for name, values in losses.items():  # P1T96 and P4T12 have no window losses: left out of the comparisons
        (tmp_path / name / "window_losses.json").write_text(json.dumps({"heldout": values.tolist(), "validation": []}))

    summary = sweep_results.report(tmp_path, default_prefix_length=48, default_learning_rate=0.05)
    assert [(row["first"], row["second"]) for row in summary["paired"]] == [
        ("P1", "base"),
        ("P1T192@0.02", "base"),
        ("P4", "base"),
        ("P8", "base"),
        ("lora@6e-4", "base"),
        ("P4", "P1"),
        ("P8", "P1"),
        ("P1T192@0.02", "P1"),  # what the longer prefix alone buys
        ("P4", "P1T192@0.02"),  # the single stream with P=4's prefix count, 4 · 48
        ("lora@6e-4", "P8"),
    ]
    for row in summary["paired"]:
        difference = losses[row["first"]] - losses[row["second"]]
        assert row["windows"] == 12
        assert row["difference"] == pytest.approx(difference.mean().item(), abs=1e-12)
        low, high = row["interval"]  # percentile bootstrap of the mean: inside the differences' own range
        assert difference.min() <= low <= row["difference"] <= high <= difference.max()
    lora = summary["paired"][-1]
    assert lora["p_value"] < 1e-4  # 0.074 apart, window by window, against noise of 0.003
    assert "| lora@6e-4 − P8 | 12 | -0.07" in summary["paired_table"]
    assert "< 0.0001 |" in summary["paired_table"].splitlines()[-1]
    assert summary["unscored"] == ["P1T96", "P4T12"]  # finished, but scored window by window nowhere


def test_window_losses_are_each_window_s_own_loss(tmp_path):
    window_losses = import_experiment("window_losses")
    model = AutoModelForCausalLM.from_pretrained(save_tiny_checkpoint(tmp_path / "tiny")).eval()
    windows = torch.randint(0, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    losses = window_losses.window_losses(model, windows.tolist(), batch_size=2)  # batches of 2, 2 and 1
    # the model's own loss for each window alone; float32 sums over 23 tokens in another order differ by ~1e-7
    expected = [model(input_ids=window[None], labels=window[None]).loss.item() for window in windows]
    assert losses == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="different windows"):
        window_losses.paired_differences({"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]}, [("a", "b")])


def test_packed_windows_join_files_by_the_document_boundary_not_the_chat_eos_token():
    from datasets import Dataset

    from peft_parscale.testing import tiny_tokenizer

    common = import_experiment("common")
    tokenizer = tiny_tokenizer()  # EOS <|im_end|> (a chat turn's end), as Qwen2.5-Instruct's
    tokenizer.bos_token = "<|endoftext|>"  # the pre-training document boundary, as the aligned Qwen2.5 copy has
    files = Dataset.from_dict({"path": ["a.py", "b.py", "c.py"], "text": ["ab", "cde", "fgh"]})
    boundary = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ordered = sorted(zip(files["path"], files["text"]), key=lambda row: hashlib.sha256(row[0].encode()).hexdigest())
    stream = [t for _, text in ordered for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [boundary]]
    windows = common.leading_packed_windows(files, tokenizer, length=4, tokens=8)["input_ids"]
    assert windows == [stream[:4], stream[4:8]]


def test_a_corpus_is_tokenised_with_the_tokenizer_s_threads_and_the_setting_put_back(monkeypatch):
    from datasets import Dataset

    from peft_parscale.testing import tiny_tokenizer

    common = import_experiment("common")
    tokenizer, seen = tiny_tokenizer(), []

    def tokenize(texts, **kwargs):  # what `tokenizers` would read at this call
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return tokenizer(texts, **kwargs)

    files = Dataset.from_dict({"path": [f"{i}.py" for i in range(300)], "text": ["abc"] * 300})
    needed = 256 * len(tokenizer("abc", add_special_tokens=False)["input_ids"]) + 1  # more than a batch of 256 holds
    for before in ("false", None):
        if before is None:
            monkeypatch.delenv("TOKENIZERS_PARALLELISM")
        else:
            monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
        seen.clear()
        _, ids = common.leading_files(files, tokenize, tokens=needed)  # two batches of up to 256 files
        assert seen == ["true", "true"] and sum(map(len, ids)) >= needed
        assert os.environ.get("TOKENIZERS_PARALLELISM") == before


def test_stream_sweep_prepare_adds_validation_windows_from_files_in_neither_split(tmp_path):
    sweep = import_experiment("stream_sweep")
    args = sweep.parse_args(["--smoke", "--output-dir", str(tmp_path)])
    tokenizer = AutoTokenizer.from_pretrained(import_experiment("common").model_path(args))
    corpus = import_experiment("common").packages_corpus(args)
    paths = {split: set(corpus[split]["path"]) for split in ("train", "validation", "test")}
    assert all(paths.values()) and not paths["validation"] & (paths["train"] | paths["test"])
    summary = sweep.prepare(args, tokenizer)
    assert (summary["validation_windows"], summary["validation_tokens"]) == (8, 8 * 32)
    # the windows are the validation files' tokens, joined by end-of-text tokens, in the order of a hash of the path
    ordered = sorted(corpus["validation"], key=lambda row: hashlib.sha256(row["path"].encode()).hexdigest())
    stream = [token for row in ordered for token in tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]]
    windows = sweep.load_windows(args, "validation")["input_ids"]
    assert [token for window in windows for token in window] == stream[: 8 * 32]

    # data prepared before the validation windows existed: they are added, the rest is left as it is
    data = tmp_path / "data"
    earlier = {key: value for key, value in summary.items() if not key.startswith("validation")}
    (data / "corpus.json").write_text(json.dumps(earlier))
    shutil.rmtree(data / "validation")
    train_written = (data / "train" / "state.json").stat().st_mtime_ns
    assert sweep.prepare(args, tokenizer) == summary and sweep.load_windows(args, "validation")["input_ids"] == windows
    assert (data / "train" / "state.json").stat().st_mtime_ns == train_written
    # ... unless they came from other files: then the message says what to do
    (data / "corpus.json").write_text(json.dumps({**earlier, "heldout_split": "validation"}))
    shutil.rmtree(data / "validation")
    with pytest.raises(ValueError, match="rerun --prepare with a new --output-dir"):
        sweep.prepare(args, tokenizer)
    with pytest.raises(FileNotFoundError, match="rerun --prepare"):
        sweep.load_windows(args, "validation")


def test_stream_sweep_compare_reports_tensors_over_the_parity_bound(tmp_path):
    from safetensors.torch import save_file

    sweep = import_experiment("stream_sweep")
    start = {"moved": torch.zeros(3), "still": torch.ones(2)}
    runs = {  # "still" does not move in the reference; "moved" moves by 1
        "one": {"moved": torch.tensor([1.0, 0.0, 0.0]), "still": torch.ones(2)},
        "close": {"moved": torch.tensor([1.0, 5e-4, 0.0]), "still": torch.ones(2)},  # 5e-4 of the movement
        "far": {"moved": torch.tensor([1.0, 2e-3, 0.0]), "still": torch.tensor([1.0, 1.5])},
    }
    for name, weights in runs.items():
        for folder, tensors in (("initial_adapter", start), ("adapter", weights)):
            (tmp_path / name / folder).mkdir(parents=True, exist_ok=True)
            save_file(tensors, tmp_path / name / folder / "adapter_model.safetensors")
    comparison = sweep.compare_adapters(tmp_path, ["one", "close", "far"], bound=1e-3)
    assert comparison["runs"]["close"]["over_bound"] == []
    assert comparison["runs"]["far"]["over_bound"] == ["moved", "still"]  # 2e-3 of its movement; moved where 0 did not
    assert comparison["runs"]["far"]["per_tensor"]["moved"]["relative"] == pytest.approx(2e-3)


def test_device_transfer_sends_every_pack_file_once_within_a_call_s_limits(tmp_path):
    transfer = import_experiment("device_transfer")
    for run in ("P4", "P8"):
        fake_run(tmp_path / run)
        transfer.pack(tmp_path / run, tmp_path / "packs" / run, chunk_bytes=7_000)

    def on_disk() -> dict[str, bytes]:  # the reference: every file under packs/, listed with os.walk
        files = {}
        for folder, _, names in os.walk(tmp_path / "packs"):
            for name in names:
                path = Path(folder) / name
                files[str(path.relative_to(tmp_path / "packs"))] = path.read_bytes()
        return files

    def send_all(calls_so_far: int) -> list[list[str]]:
        calls = []
        while chosen := transfer.send(
            tmp_path / "packs", tmp_path / f"out-{calls_so_far + len(calls)}", max_files=3, max_bytes=16_000
        ):
            assert len(chosen) <= 3 and sum(len(on_disk()[name]) for name in chosen) <= 16_000
            calls.append(chosen)
            assert len(calls) < 50, "send keeps sending"
        return calls

    calls = send_all(0)
    assert calls[0][:2] == ["P4/manifest.json", "P8/manifest.json"]  # manifests go first
    sent = [name for chosen in calls for name in chosen]
    assert sorted(sent) == sorted(on_disk())  # each file once
    returned = {
        name: (tmp_path / f"out-{index}" / name).read_bytes() for index, chosen in enumerate(calls) for name in chosen
    }
    assert returned == on_disk()
    # P8 packed again (its run trained on): what changed goes again, though the names are those already sent
    shutil.rmtree(tmp_path / "packs" / "P8")
    (tmp_path / "P8" / "segment-2.json").write_text("{}")
    transfer.pack(tmp_path / "P8", tmp_path / "packs" / "P8", chunk_bytes=7_000)
    again = [name for chosen in send_all(len(calls)) for name in chosen]
    assert "P8/manifest.json" in again and not any(name.startswith("P4/") for name in again)

    (tmp_path / "out-busy").mkdir()
    (tmp_path / "out-busy" / "sweep.tgz").write_bytes(b"x")
    with pytest.raises(ValueError, match="is not empty"):  # one send a call
        transfer.send(tmp_path / "packs", tmp_path / "out-busy")
    with pytest.raises(ValueError, match="not a folder of packs"):
        transfer.send(tmp_path / "no-packs", tmp_path / "out-none")
    (tmp_path / "packs" / "lora@6e-4").mkdir()  # a name the device does not return
    (tmp_path / "packs" / "lora@6e-4" / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="named in letters, digits"):
        transfer.send(tmp_path / "packs", tmp_path / "out-name")
    shutil.rmtree(tmp_path / "packs" / "lora@6e-4")
    (tmp_path / "packs" / "P2").mkdir()
    (tmp_path / "packs" / "P2" / "chunk-00").write_bytes(bytes(20_000))
    with pytest.raises(ValueError, match="larger than a call may return"):
        transfer.send(tmp_path / "packs", tmp_path / "out-large", max_bytes=16_000)
    assert not any((tmp_path / name).exists() for name in ("out-none", "out-name", "out-large"))  # nothing copied


def test_gap_fit_leaves_out_the_first_evaluation():
    results = import_experiment("sweep_results")
    tokens = [0, 1e6, 2e6, 4e6, 8e6, 16e6]
    p1 = [2.0, 1.9, 1.6, 1.5, 1.45, 1.42]
    # P=4's gain over P=1: 0.3 at the first evaluation (a warm-up transient), then exactly 0.01 + 0.002·ln(t / 2e6)
    gains = [0.0, 0.3] + [0.01 + 0.002 * math.log(t / 2e6) for t in tokens[2:]]
    sweep = [
        {"P": 1, "heldout_curve": [[t, loss] for t, loss in zip(tokens, p1)]},
        {"P": 4, "heldout_curve": [[t, loss - gain] for t, loss, gain in zip(tokens, p1, gains)]},
    ]
    fit = results.gap_analysis(sweep)["gap_fit"]
    assert fit["P"] == 4 and fit["from_tokens"] == 2e6
    # the line through the last four points: gain = (0.01 − 0.002·ln 2e6) + 0.002·ln t, exactly (float64 rounding)
    assert fit["slope_per_ln_tokens"] == pytest.approx(0.002, abs=1e-9)
    assert fit["intercept"] == pytest.approx(0.01 - 0.002 * math.log(2e6), abs=1e-8)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-9)


def test_a_runs_speed_comes_from_segments_alone_on_its_last_device():
    """A run resumed on another kind of GPU: its speed is the best median step of the segments that ran alone on the
    device it ended on; segments recorded before segments named their device count as on it."""
    steady_tokens_per_s = import_experiment("sweep_results").steady_tokens_per_s
    segments = [
        {"steady_step_s": 0.5, "gpu_shared_by": 3},  # shared: no speed of its own
        {"steady_step_s": 2.0, "gpu_shared_by": 1},  # before segments named their device
        {"steady_step_s": 1.0, "gpu_shared_by": 1, "device": "NVIDIA H100 80GB HBM3"},
        {"steady_step_s": 4.0, "gpu_shared_by": 1, "device": "NVIDIA H200"},
        {"steady_step_s": None, "gpu_shared_by": 1, "device": "NVIDIA H200"},  # too few steps for a median
    ]
    assert steady_tokens_per_s(segments, 32768, "NVIDIA H200") == 32768 / 2.0
    assert steady_tokens_per_s(segments, 32768, "NVIDIA H100 80GB HBM3") == 32768 / 1.0
    assert steady_tokens_per_s(segments[:1], 32768, "NVIDIA H200") is None
