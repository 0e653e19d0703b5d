"""The HumanEval experiment (experiments/humaneval_experiment.py) runs end to end in its smoke mode (a tiny random
model), plans its phases and learning rates as its docstring says, and its report compares arms as stated."""

import gzip
import json
import math
import subprocess
import sys

import pytest
from conftest import SUBPROCESS_TIMEOUT
from test_examples import ROOT
from test_experiments import import_experiment, run_experiment

from peft_parscale.function_pairs import DROP_REASONS


def test_humaneval_experiment_smoke(tmp_path):
    stdout = run_experiment(
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
    # raw samples: every generated text with its checker's verdict, 10 per problem when sampling, gzip-compressed
    sampled = json.loads(gzip.decompress((out / "P2" / "sampled.json.gz").read_bytes()))["completion"]
    assert [sample["task_id"] for sample in sampled["samples"]] == ["HumanEval/0"] * 10 + ["HumanEval/53"] * 10
    assert all(
        isinstance(sample["generated"], str) and isinstance(sample["passed"], bool) for sample in sampled["samples"]
    )
    # with n samples, pass@1 is the mean pass rate (c/n per problem, averaged)
    passed = [sample["passed"] for sample in sampled["samples"]]
    assert rows["P2"]["sampled_pass@1"]["value"] == pytest.approx(sum(passed) / len(passed))
    greedy = json.loads(gzip.decompress((out / "P2" / "greedy.json.gz").read_bytes()))
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

    # the stream-diversity variant trains end to end and is scored on validation pairs
    run_experiment(
        "humaneval_experiment.py", "--smoke", "--only", "train:P2+div0.1", "val:P2+div0.1", "--output-dir", "out",
        cwd=tmp_path,
    )  # fmt: skip
    diversity = json.loads((out / "P2+div0.1" / "train.json").read_text())["diversity"]
    assert diversity["weight"] == 0.1 and diversity["layer"] == 1 and math.isfinite(diversity["term_mean"])
    assert diversity["term_mean"] > 0 and [step for step, _ in diversity["term_curve"]] == [1, 2]
    assert json.loads((out / "P2+div0.1" / "val.json").read_text())["pairs"] > 0


def test_humaneval_experiment_runs_models_side_by_side(tmp_path):
    script = [sys.executable, str(ROOT / "experiments" / "humaneval_experiment.py"), "--smoke", "--output-dir", "out"]
    phases = ["prepare", "train:P1", "val:P1", "train:lora@1e-3", "val:lora@1e-3", "val:P3"]  # P3 has no adapter
    result = subprocess.run(
        [*script, "--side-by-side", "2", "--only", *phases],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    out = tmp_path / "out"
    for arm in ("P1", "lora@1e-3"):
        assert json.loads((out / arm / "train.json").read_text())["gpu_shared_by"] == 2
        assert (out / arm / "val.json").is_file() and f"{arm}: done" in result.stdout
    # a group that fails makes the run fail, and says where its log is
    assert result.returncode == 1 and "P3: failed" in result.stdout
    assert "has no adapter" in (out / "logs" / "P3.log").read_text()
    # past the deadline nothing is started, and what would have run is named (one model at a time too)
    late = subprocess.run(
        [*script, "--deadline", "0", "--only", "train:P2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
    )  # fmt: skip
    assert late.returncode == 2 and "not starting P2: too little time left" in late.stdout  # 2: rerun to go on
    assert not (out / "P2").exists()


def test_a_group_out_of_gpu_memory_asks_to_run_again_alone(tmp_path, monkeypatch):
    """A group's process that runs out of GPU memory exits with `OUT_OF_GPU_MEMORY` (outside a group it raises), and
    the scheduler is given a way to start that group again alone: as ``--gpu-shared-by 1``, into a log of its own.
    (The scheduler's side, starting it once the others have ended: tests/test_experiments.py.)"""
    import torch

    experiment = import_experiment("humaneval_experiment")

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(experiment, "run_phases", out_of_memory)
    argv = ["--smoke", "--output-dir", str(tmp_path), "--only", "val:P1", "val:P2"]
    with pytest.raises(SystemExit) as exit_status:
        experiment.main([*argv, "--group"])
    assert exit_status.value.code == experiment.OUT_OF_GPU_MEMORY == 75
    with pytest.raises(torch.OutOfMemoryError):
        experiment.main(argv)
    scheduled = {}

    def schedule(jobs, start, at_once, **options):
        scheduled.update(options, jobs=jobs, start=start)
        return import_experiment("common").SideBySide()

    monkeypatch.setattr(experiment, "run_side_by_side", schedule)
    monkeypatch.setattr(experiment, "start_in_own_session", lambda command, log: (command, log))
    monkeypatch.setattr(experiment, "model_path", lambda args: None)
    argv += ["--side-by-side", "2"]
    assert experiment.side_by_side(experiment.parse_args(argv), argv) == 0 and scheduled["jobs"] == ["P1", "P2"]
    command, log = scheduled["start"]("P2")
    assert command[-5:] == ["--group", "--gpu-shared-by", "2", "--only", "val:P2"] and log.name == "P2.log"
    command, log = scheduled["start_alone"]("P2")
    assert command[-5:] == ["--group", "--gpu-shared-by", "1", "--only", "val:P2"] and log.name == "P2.alone.log"


def test_humaneval_experiment_phases():
    experiment = import_experiment("humaneval_experiment")
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
    bad_names = ["train:base", "eval:Q3", "greedy", "eval:P0", "score:P2", "train:base@1e-3", "val:lora@x", "eval:P1T0"]
    bad_names += ["train:P1+div0.1", "train:lora+div0.1", "train:P4+div", "train:P4@1e-2+div0.1"]
    bad_names += ["train:P8#x", "train:P8#1@5e-2", "greedy:base#1", "train:P8#0"]  # P8#0 would be P8 again
    for bad in bad_names:
        with pytest.raises(ValueError):
            experiment.phases(experiment.parse_args(["--only", bad]))
    arms = import_experiment("arms")
    Arm = arms.Arm
    names = ("base", "P8", "P1T384", "P1T384@0.015", "lora@3e-4", "lora", "P4+div0.1", "P4T48+div1e-2@5e-2")
    names += ("P8#2", "lora@3e-4#1")
    assert [experiment.parse_arm(name) for name in names] == [
        Arm("base"),
        Arm("parscale", 8),
        Arm("parscale", 1, 384),
        Arm("parscale", 1, 384, 0.015),
        Arm("lora", learning_rate=3e-4),
        Arm("lora"),
        Arm("parscale", 4, diversity_weight=0.1),
        Arm("parscale", 4, 48, 0.05, 0.01),
        Arm("parscale", 8, seed=2),
        Arm("lora", learning_rate=3e-4, seed=1),
    ]
    assert arms.seedless("lora@3e-4#1") == "lora@3e-4" and arms.seedless("P8") == "P8"
    with pytest.raises(ValueError, match="LoRA needs its own learning rate"):
        arms.arm_learning_rate(Arm("lora"), learning_rate=5e-2, lora_learning_rate=None)


def test_humaneval_experiment_chooses_learning_rate_on_validation(tmp_path):
    experiment = import_experiment("humaneval_experiment")
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
    # the grid is its seed-0 runs: another seed's run of a grid point does not take part; @best#<seed> keeps the seed
    (tmp_path / "lora@1e-4#1").mkdir()
    (tmp_path / "lora@1e-4#1" / "val.json").write_text(json.dumps({"nll": [0.0], "scored_tokens": [1]}))
    assert experiment.chosen_on_validation(args, "lora@best#2") == "lora@3e-4#2"
    # the report's comparisons: @best resolved; a pair whose arm has no grid point yet is left out
    args = experiment.parse_args(["--output-dir", str(tmp_path), "--compare", "P8:lora@best", "P4:P1T192@best"])
    assert experiment.resolved_comparisons(args) == ["P8:lora@3e-4"]


def test_humaneval_report_takes_each_arm_s_decode_and_training_cost_from_its_benchmark_variant(tmp_path):
    results = import_experiment("humaneval_results")
    records = [  # (suite, shape, variant, mode, batch, new tokens, ms/token)
        ("decode", "0.5b", "stock", "fast", 1, 64, 9.0),
        ("decode", "0.5b", "stock", "fast", 1, 512, 2.5),  # the longest generation of a case is the one reported
        ("decode", "0.5b", "stock", "eager", 1, 1024, 7.0),  # not the fast path
        ("targets", "0.5b", "P8", "fast", 1, 1024, 7.0),  # another suite
        ("decode", "0.5b", "P8", "fast", 1, 512, 3.0),
        ("decode", "0.5b", "P8", "fast", 8, 512, 3.5),
        ("decode", "0.5b", "P1T384", "fast", 8, 512, 4.0),
        ("decode", "0.5b", "P1", "fast", 1, 512, 2.75),
        ("decode", "1.5b", "P4", "fast", 1, 512, 9.0),  # another model's shape
    ]
    keys = ("suite", "shape", "variant", "mode", "batch", "new_tokens", "decode_ms_per_token")
    lines = [json.dumps(dict(zip(keys, record))) for record in records]
    training = [  # (shape, length, variant, compile, gradient checkpointing, tokens/s)
        ("0.5b", 2048, "P8", "none", False, 100.0),
        ("0.5b", 2048, "P8", "layers", False, 999.0),  # compiled: the experiment trains eagerly
        ("0.5b", 2048, "lora", "none", False, 300.0),
        ("0.5b", 2048, "P1T384", "none", True, 999.0),  # with gradient checkpointing
        ("1.5b", 2048, "P1T192", "none", False, 999.0),  # another model's shape
        ("0.5b", 512, "P4", "none", False, 999.0),  # shorter windows than the experiment's
    ]
    lines += [
        json.dumps(
            {"suite": "train", "shape": shape, "length": length, "variant": v, "compile": c, "mask": "lower_right"}
            | {"gradient_checkpointing": g, "tokens_per_s": speed}
        )
        for shape, length, v, c, g, speed in training
    ]
    (tmp_path / "decode.jsonl").write_text("\n".join(lines) + "\n")
    arms = ["base", "lora@2e-4", "P8", "P8+div0.1", "P1T384", "P1T48", "P4", "P1T192"]
    for arm in arms:
        (tmp_path / "he" / arm).mkdir(parents=True)
    summary = results.report(
        tmp_path / "he", [], tmp_path / "data", tmp_path / "decode.jsonl", default_prefix_length=48
    )
    costs = {row["name"]: (row["decode_ms_per_token_b1"], row["decode_ms_per_token_b8"]) for row in summary["rows"]}
    assert costs == {
        "base": (2.5, None),
        "lora@2e-4": (2.5, None),  # merged: the base model's cost
        "P8": (3.0, 3.5),
        "P8+div0.1": (3.0, 3.5),  # a training variant decodes as its arm does
        "P1T384": (None, 4.0),
        "P1T48": (2.75, None),  # T = 48 is the benchmark's default prefix length: variant P1
        "P4": (None, None),  # not measured at this shape
        "P1T192": (None, None),
    }
    speeds = {row["name"]: row.get("train_tokens_per_s") for row in summary["rows"]}
    # the base model trains nothing; a stream-diversity arm adds a loss term the benchmark does not compute
    assert speeds == {
        "base": None, "lora@2e-4": 300.0, "P8": 100.0, "P8+div0.1": None, "P1T384": None, "P1T48": None, "P4": None,
        "P1T192": None,
    }  # fmt: skip
    assert "| P8 | - | - | - | - | 100 (b) | 3.00 | 3.50 |" in summary["table"]


def test_humaneval_report_compares_arms_over_their_seeds(tmp_path):
    results = import_experiment("humaneval_results")
    # validation losses per pair (nll over 1 token each): P8 trained with seeds 0 and 1, P1 with seed 0 only
    losses = {"P8": [1.0, 2.0, 3.0], "P8#1": [2.0, 3.0, 4.0], "P1": [1.0, 1.0, 1.0], "lora@1e-4": [0.5, 0.5, 0.5]}
    for arm, nll in losses.items():
        (tmp_path / arm).mkdir()
        (tmp_path / arm / "val.json").write_text(json.dumps({"nll": nll, "scored_tokens": [1, 1, 1]}))
        training = {"train_tokens": 100, "train_seconds": 4.0, "gpu_shared_by": 2 if arm == "lora@1e-4" else 1}
        (tmp_path / arm / "train.json").write_text(json.dumps(training))
    summary = results.report(tmp_path, ["P8:P1", "P8#1:P1"], tmp_path / "data")
    comparisons = {(c["first"], c["second"]): c for c in summary["comparisons"]}
    # P8 stands for both its runs: their mean (2 + 3) / 2 = 2.5 against P1's 1
    assert comparisons["P8", "P1"]["runs"] == [2, 1] and comparisons["P8", "P1"]["difference"] == 1.5
    assert comparisons["P8", "P1"]["run_means"] == [[2.0, 3.0], [1.0]]
    assert comparisons["P8#1", "P1"]["runs"] == [1, 1] and comparisons["P8#1", "P1"]["difference"] == 2.0
    speeds = {row["name"]: row.get("train_tokens_per_s") for row in summary["rows"]}
    assert speeds == {"P1": 25.0, "P8": 25.0, "P8#1": 25.0, "lora@1e-4": None}  # shared GPU: no speed of its own
    # P8 over its seeds: the mean of its runs' 2 and 3, and the interval that resamples runs and pairs. A resample is
    # run 0 (losses 1, 2, 3), run 1 (2, 3, 4) or their mean (1.5, 2.5, 3.5), with probabilities 1/4, 1/4, 1/2, and
    # then 3 of its pairs. P(mean <= 1) = 1/4 · 1/27 = 0.009 and P(mean <= 4/3) = 1/4 · 4/27 = 0.037, so the 2.5%
    # quantile is 4/3, and the 97.5% one 11/3 by symmetry. Resampling only the pairs of the runs' mean would give 1.5
    # and 3.5.
    (over_seeds,) = summary["over_seeds"]
    loss = over_seeds["validation_loss"]
    assert (over_seeds["name"], loss["value"], loss["run_values"]) == ("P8", 2.5, [2.0, 3.0])
    assert (loss["low"], loss["high"]) == (pytest.approx(4 / 3), pytest.approx(11 / 3))
    assert f"| P8 | 2 | - | - | - | - | - | 2.500 [{loss['low']:.3f}, {loss['high']:.3f}] |" in summary["table"]


def test_humaneval_report_tests_greedy_pass_fail_seed_by_seed(tmp_path):
    results = import_experiment("humaneval_results")
    passed = {  # greedy pass (1) or fail (0) on six problems, the same in both prompt modes
        "base": [0, 0, 1, 1, 0, 0],
        "P8": [1, 1, 1, 0, 0, 0],
        "P8#1": [1, 0, 1, 1, 1, 1],
        "P1": [0, 0, 1, 1, 0, 0],
        "P1#1": [1, 0, 1, 1, 0, 0],
        "P1#2": [0, 0, 0, 0, 0, 0],
        "lora": [1, 1, 1, 1, 1, 1],
    }
    for arm, outcomes in passed.items():
        (tmp_path / arm).mkdir()
        mode = {"samples": [{"passed": bool(outcome)} for outcome in outcomes]}
        greedy = json.dumps({"completion": mode, "chat": mode}).encode()
        (tmp_path / arm / "greedy.json.gz").write_bytes(gzip.compress(greedy))
    summary = results.report(tmp_path, ["P8:P1", "P8:base", "P8:lora"], tmp_path / "data")
    tests = {
        (c["first"], c["second"]): [(t["seed"], t["b"], t["c"], t["pvalue"]) for t in c["mcnemar_by_seed"]]
        for c in summary["comparisons"]
        if c["metric"] == "completion_pass@1"
    }
    # (seed, problems passed by P8 only, by the other only, exact two-sided binomial p of b in b + c at 1/2)
    # seed 0: P8 alone passes problems 0 and 1, P1 alone problem 3; seed 1: P8#1 alone passes 4 and 5; P1#2 has no
    # P8 run with its seed. The base model, trained never, is paired with every P8 run; LoRA, trained with seed 0
    # only, with P8's seed 0 alone (LoRA alone passes problems 3, 4 and 5).
    assert tests["P8", "P1"] == [(0, 2, 1, 1.0), (1, 2, 0, 0.5)]
    assert tests["P8", "base"] == [(0, 2, 1, 1.0), (1, 3, 0, 0.25)]
    assert tests["P8", "lora"] == [(0, 0, 3, 0.25)]
    assert "| #0: 2, 1, 1.0000; #1: 2, 0, 0.5000 |" in summary["table"]


def test_decode_costs_take_ratios_to_the_base_model_of_the_same_call_only(tmp_path):
    results = import_experiment("humaneval_results")
    records = [  # (run, benchmark invocation, variant, batch, prompt, new tokens, ms/token)
        (None, None, "stock", 1, 256, 512, 0.5),
        (None, None, "P1T192", 1, 256, 512, 1.9),  # unlabelled records: their call is unknown
        ("X", None, "stock", 1, 128, 512, 2.0),
        ("X", None, "P8", 1, 128, 512, 2.5),  # 1.25 × X's base model
        ("X", None, "P8", 8, 128, 512, 3.0),  # X's base model was not measured at batch 8
        ("Y", None, "stock", 1, 128, 512, 1.0),
        ("Y", None, "P1", 1, 128, 512, 2.2),  # 2.2 × Y's base model, never X's
        ("Y", None, "P1", 1, 128, 1024, 4.0),  # a longer generation, but no base model at its length
        ("Z", None, "P4", 1, 128, 512, 2.1),  # no base model in run Z
        ("Y", None, "P2", 1, 64, 512, 1.5),  # another prompt length than Y's base model
        ("W", "call 1", "stock", 8, 128, 512, 1.0),  # run W: two invocations, each with its own base model
        ("W", "call 1", "P2", 8, 128, 512, 1.5),
        ("W", "call 2", "stock", 8, 128, 512, 2.0),
        ("W", "call 2", "P4", 8, 128, 512, 3.0),
        ("U", "call 3", "P4", 8, 128, 512, 9.0),  # later, but with no base model beside it
    ]
    lines = [
        json.dumps(
            {
                "suite": "decode",
                "shape": "0.5b",
                "mode": "fast",
                "run": run,
                "variant": variant,
                "batch": batch,
                "prompt": prompt,
                "new_tokens": new,
                "decode_ms_per_token": ms,
            }
            | ({"invocation": invocation} if invocation else {})
        )
        for run, invocation, variant, batch, prompt, new, ms in records
    ]
    (tmp_path / "bench.jsonl").write_text("\n".join(lines) + "\n")
    assert results.decode_costs(tmp_path / "bench.jsonl") == {
        ("stock", 1): (1.0, None),  # the latest of the base model's records; its own ratio is not given
        ("stock", 8): (2.0, None),
        ("P1T192", 1): (1.9, None),
        ("P8", 1): (2.5, pytest.approx(1.25)),
        ("P8", 8): (3.0, None),
        ("P1", 1): (2.2, pytest.approx(2.2)),  # a record with a base model beside it comes first
        ("P4", 1): (2.1, None),
        ("P2", 1): (1.5, None),
        ("P2", 8): (1.5, pytest.approx(1.5)),  # 1.5 × its own call's base model (1.0), not the other call's
        ("P4", 8): (3.0, pytest.approx(1.5)),  # call 2's, beside its base model, not call 3's
    }
    # the report's rows and its table carry the ratios
    for arm in ("base", "P8", "P1T48"):
        (tmp_path / "he" / arm).mkdir(parents=True)
    summary = results.report(tmp_path / "he", [], tmp_path / "data", tmp_path / "bench.jsonl", default_prefix_length=48)
    ratios = {row["name"]: (row["decode_vs_base_b1"], row["decode_vs_base_b8"]) for row in summary["rows"]}
    assert ratios == {"base": (None, None), "P8": (pytest.approx(1.25), None), "P1T48": (pytest.approx(2.2), None)}
    assert "| 2.50 (1.25×) | 3.00 |" in summary["table"] and "| 2.20 (2.20×) | - |" in summary["table"]
    # the base model's own cells: its lowest to highest time over the calls (0.5, 2.0 and 1.0 at batch 1; 1.0 and 2.0
    # at batch 8), since each arm's ratio is to its own call's base model
    assert "| base | - | - | - | - | - | 0.50–2.00 | 1.00–2.00 |" in summary["table"]


def test_the_base_model_decode_spread_takes_its_longest_generation_per_batch(tmp_path):
    """`base_decode_spread`: per batch size, the lowest and highest ms/token of the base model over its records of the
    longest generation; other variants, other shapes and shorter generations do not count."""
    results = import_experiment("humaneval_results")
    records = [  # (shape, variant, batch, new tokens, ms/token)
        ("0.5b", "stock", 1, 512, 1.7),
        ("0.5b", "stock", 1, 512, 1.6),
        ("0.5b", "stock", 1, 64, 0.9),  # a shorter generation
        ("0.5b", "P8", 1, 512, 0.1),  # not the base model
        ("1.5b", "stock", 1, 512, 3.0),  # another shape than the experiment's
        ("0.5b", "stock", 8, 64, 2.5),  # batch 8's longest generation is 64 tokens
    ]
    lines = [
        json.dumps(
            {
                "suite": "decode",
                "shape": shape,
                "mode": "fast",
                "variant": variant,
                "batch": batch,
                "prompt": 128,
                "new_tokens": new,
                "decode_ms_per_token": ms,
            }
        )
        for shape, variant, batch, new, ms in records
    ]
    (tmp_path / "bench.jsonl").write_text("\n".join(lines) + "\n")
    assert results.base_decode_spread(tmp_path / "bench.jsonl") == {1: (1.6, 1.7), 8: (2.5, 2.5)}
