"""The experiments (experiments/) run end to end in their smoke modes (a tiny random model), as they would on a real
one, and their planning logic does what their docstrings say."""

import importlib
import json
import shlex
import signal
import sys
from pathlib import Path

import pytest
from test_examples import ROOT, run_example


def run_experiment(name: str, *args: str, cwd: Path, succeeds: bool = True) -> str:
    return run_example(name, *args, cwd=cwd, folder="experiments", succeeds=succeeds)


def import_experiment(name: str):
    """An experiment's module, imported as its script imports its neighbours (experiments/ on the path)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_scaling_experiment_smoke(tmp_path):
    stdout = run_experiment(
        "scaling_experiment.py", "--smoke", "--models", "base", "P1", "P2", "--output-dir", "out", cwd=tmp_path
    )
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["P"] for row in summary["rows"]] == [None, 1, 2]
    assert summary["rows"][0]["trainable_parameters"] == 0 < summary["rows"][1]["trainable_parameters"]
    assert {row["train_tokens"] for row in summary["rows"][1:]} == {256}  # equal token budgets
    assert summary["adapter_configs"]["P2"]["P"] == 2
    assert "log_linear_fit" in summary and (tmp_path / "out" / "streams.png").is_file()
    assert "| P=2 |" in stdout


def sleeper(seconds: float, status: int = 0) -> list[str]:
    return [sys.executable, "-c", f"import sys, time; time.sleep({seconds}); sys.exit({status})"]


def test_side_by_side_runs_at_most_n_jobs_at_once_and_says_what_became_of_each(capsys):
    """The scheduler both side-by-side experiments use (`common.run_side_by_side`). Each start counts the jobs
    running at that moment: with ``at_once=2`` at most one. A scheduler that started a third would be caught, since
    every job sleeps 1 s, far longer than starting the next one takes."""
    common = import_experiment("common")
    handler = signal.getsignal(signal.SIGTERM)
    commands = {"a": sleeper(1), "b": sleeper(1, status=3), "c": sleeper(1), "d": sleeper(1)}
    running_at_start = []

    def start_counting(job):
        running_at_start.append(sum(process.poll() is None for _, process in started))
        process = common.start_in_own_session(commands[job])
        started.append((job, process))
        return process

    started: list = []
    outcome = common.run_side_by_side(list(commands), start_counting, 2)
    assert [job for job, _ in started] == ["a", "b", "c", "d"] and max(running_at_start) <= 1
    assert outcome.failed == ["b (exit status 3)"] and outcome.unfinished == []
    # after a failure, with stop_after_failure, nothing more starts; the rest are named unfinished
    started.clear()
    outcome = common.run_side_by_side(["b", "a", "c"], start_counting, 1, stop_after_failure=True)
    assert [job for job, _ in started] == ["b"] and outcome.unfinished == ["a", "c"]
    assert "not starting a, c: a job failed" in capsys.readouterr().out
    # out of time: the running job is stopped (killed, not left to finish) and the waiting one never starts
    started.clear()
    commands["long"] = sleeper(600)
    clock = {"late": False}

    def start_then_late(job):
        clock["late"] = True
        return start_counting(job)

    outcome = common.run_side_by_side(
        ["long", "a"],
        start_then_late,
        1,
        too_late_to_start=lambda: clock["late"],
        too_late_to_run=lambda: clock["late"],
    )
    assert [job for job, _ in started] == ["long"] and started[0][1].returncode == -9
    assert outcome.unfinished == ["long", "a"]
    assert signal.getsignal(signal.SIGTERM) == handler  # the caller's own handler is back


def test_a_job_out_of_gpu_memory_beside_others_runs_again_alone_once_they_have_ended(capsys):
    """`common.run_side_by_side` with `start_alone`: a job exiting with `OUT_OF_GPU_MEMORY` after sharing the GPU is
    started again with nothing beside it; one that ran alone, or fails again alone, has failed. Every job sleeps far
    longer than a start takes, so a retry started while another job still runs would be caught."""
    common = import_experiment("common")
    out_of_memory = common.OUT_OF_GPU_MEMORY
    commands = {"big": sleeper(1, status=out_of_memory), "small": sleeper(2)}
    alone_commands = {"big": sleeper(1)}
    started: list = []
    running_at_start: dict = {}

    def starter(table, label):
        def start(job):
            running_at_start[(job, label)] = sum(process.poll() is None for _, _, process in started)
            process = common.start_in_own_session(table[job])
            started.append((job, label, process))
            return process

        return start

    outcome = common.run_side_by_side(
        ["big", "small"], starter(commands, "beside"), 2, start_alone=starter(alone_commands, "alone")
    )
    assert [(job, label) for job, label, _ in started] == [("big", "beside"), ("small", "beside"), ("big", "alone")]
    assert running_at_start[("big", "alone")] == 0  # "small" (2 s) had ended before the retry started
    assert outcome.failed == [] and outcome.unfinished == []
    assert "big: out of GPU memory beside other jobs; it will run again alone" in capsys.readouterr().out
    # out of memory alone: a failure, not retried
    started.clear()
    outcome = common.run_side_by_side(
        ["big"], starter(commands, "beside"), 2, start_alone=starter(alone_commands, "alone")
    )
    assert [(job, label) for job, label, _ in started] == [("big", "beside")]
    assert outcome.failed == [f"big (exit status {out_of_memory})"]
    # out of memory beside others, then again alone: a failure; without start_alone, a failure at once
    started.clear()
    alone_commands["big"] = sleeper(0.1, status=out_of_memory)
    outcome = common.run_side_by_side(
        ["big", "small"], starter(commands, "beside"), 2, start_alone=starter(alone_commands, "alone")
    )
    assert [label for _, label, _ in started] == ["beside", "beside", "alone"]
    assert outcome.failed == [f"big (exit status {out_of_memory})"]
    started.clear()
    outcome = common.run_side_by_side(["big", "small"], starter(commands, "beside"), 2)
    assert len(started) == 2 and outcome.failed == [f"big (exit status {out_of_memory})"]


def test_initial_loss_smoke(tmp_path):
    run_experiment("initial_loss.py", "--smoke", "--output", str(tmp_path / "initial.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "initial.json").read_text())
    base = results["per_window"]["base"]
    assert len(base) == 4 and set(results["summary"]) == {"base"} | {
        f"{kind} P={P}" for kind in ("window", "window+boundary", "file-end+boundary") for P in (1, 2)
    }
    for name, summary in results["summary"].items():  # each summary is the mean of its per-window losses minus base's
        differences = [loss - reference for loss, reference in zip(results["per_window"][name], base)]
        if name != "base":
            assert summary["minus_base"] == pytest.approx(sum(differences) / len(differences), abs=1e-12)
    texts = results["settings"]["stream_texts"]
    boundary = results["settings"]["boundary"]
    assert all(text.endswith(boundary) for kind in ("window+boundary", "file-end+boundary") for text in texts[kind])
    assert not any(text.endswith(boundary) for text in texts["window"])


def test_a_log_keeps_what_earlier_commands_wrote_with_a_line_naming_each(tmp_path):
    """A device call that goes on in the previous call's output folder starts its groups again with the same log
    files; the earlier call's output must stay in them, in order, each run under a line naming its command."""
    common = import_experiment("common")
    log = tmp_path / "P8.log"
    commands = [[sys.executable, "-c", f"print({word!r})"] for word in ("first", "second")]
    for command in commands:
        assert common.start_in_own_session(command, log).wait() == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and lines[1::2] == ["first", "second"]
    for line, command in zip(lines[::2], commands):
        assert line.startswith("# ") and line.endswith(f": {shlex.join(command)}")
