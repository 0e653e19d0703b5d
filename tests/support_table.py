"""The README's support table, rendered from the results of the test run that proves it.

`tests/test_architectures.py` runs every architecture of `tests/tiny_models.py` with each attention implementation;
each of its tests proves one cell (training, cached generation or static cache). A run records every test's outcome,
with the versions and device it ran on, in `results/support/<run>.json` (committed). The table is rendered from those
files only: a cell is ✓ when its tests passed in some run and failed in none, ✗ when one failed, "n/a" when they were
skipped because the plain model cannot do the same with that attention implementation (the reason becomes a note),
and "–" when no run tested it, including cells that only a GPU run can test (the plain model fails on the CPU too,
as flex attention's training and static cache do; the note says so and gives `GPU_RUN`).
`tests/doc_tables.py` writes it into the README (table `support`), and `tests/test_doc_tables.py` checks that the
README's table is this rendering; `tests/test_support_table.py` checks that the suite's own run of
`test_architectures.py` gives the outcomes recorded in `results/support/`.

Usage (from the repository root):

    python -m tests.support_table run                # the suite's run (CPU, sdpa and eager): results/support/cpu.json
    PARSCALE_TEST_FLEX=1 python -m tests.support_table run --name cpu-flex -k flex_attention   # flex attention
    PARSCALE_TEST_DEVICE=cuda PARSCALE_TEST_FLEX=1 python -m tests.support_table run --name cuda   # on a GPU (GPU_RUN)
    python -m tests.support_table run --name cpu-transformers-5.17   # in an environment with transformers 5.17
    python -m tests.doc_tables write                 # write the table (and the documents' other tables)
    python -m tests.support_table                    # print the table

Arguments after the options of `run` go to pytest.

It lives with the tests because it renders their results; it needs nothing outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "support"
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
FEATURES = ("training", "cached generation", "static cache")
# The one command that records the cells no CPU run can test (on a machine with a CUDA GPU).
GPU_RUN = "PARSCALE_TEST_DEVICE=cuda PARSCALE_TEST_FLEX=1 python -m tests.support_table run --name cuda"
# How `test_architectures.plain_model_failure` words a skip that is a limit of the device, not of the model.
DEVICE_LIMIT = "the plain model fails too on "

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_models import ARCHITECTURES


def load_runs(directory: pathlib.Path = RESULTS) -> dict[str, dict]:
    """{run name: {"environment": ..., "results": {test id: {...}}}} of every committed run, by name."""
    paths = sorted(directory.glob("*.json"), key=lambda path: (path.stem != "cpu", path.stem))  # the suite's run first
    return {path.stem: json.loads(path.read_text()) for path in paths}


def outcomes(runs: dict[str, dict], architecture: str, implementation: str, feature: str) -> list[tuple[str, str]]:
    """(run, outcome) of every test of one cell, over all runs."""
    return [
        (name, result["outcome"])
        for name, run in runs.items()
        for result in run["results"].values()
        if (result["architecture"], result["attn_implementation"], result["feature"])
        == (architecture, implementation, feature)
    ]


def cell(found: list[tuple[str, str]], notes: list[str]) -> str:
    """✓ all passed, ✗ one failed, n/a all skipped (the plain model cannot), – untested (also when every skip is a
    limit of the device it ran on); a skip's reason, with its run, becomes a numbered note (appended to `notes`), also
    on a ✓ of which some tests were skipped."""
    skips = set()
    for run, outcome in found:
        if outcome.startswith("skipped"):
            reason = f"{run}: {outcome.removeprefix('skipped: ')}"
            if DEVICE_LIMIT in reason:
                reason += "; not run on a GPU yet"
            skips.add(reason)
    marks = []
    for reason in sorted(skips):
        if reason not in notes:
            notes.append(reason)
        marks.append(str(notes.index(reason) + 1))
    note = f"<sup>{','.join(marks)}</sup>" if marks else ""
    kinds = {outcome for _, outcome in found}
    if "failed" in kinds:
        return "✗"
    if "passed" in kinds:
        return "✓" + note
    if found and all(DEVICE_LIMIT in outcome for outcome in kinds):
        return "–" + note  # only the device stopped it: a GPU run would test it
    return "n/a" + note if found else "–"


def tested_on(runs: dict[str, dict], implementation: str) -> list[str]:
    """The runs that tested `implementation`."""
    return [
        name
        for name, run in runs.items()
        if any(result["attn_implementation"] == implementation for result in run["results"].values())
    ]


def render(runs: dict[str, dict]) -> str:
    """The table, its legend and notes, and the runs it comes from, as Markdown."""
    headers = []
    for implementation in IMPLEMENTATIONS:
        names = tested_on(runs, implementation)
        headers.append(f"{implementation} ({', '.join(names) if names else 'not tested'})")
    lines = [
        "| architecture | " + " | ".join(headers) + " |",
        "| --- | " + " | ".join(":---:" for _ in IMPLEMENTATIONS) + " |",
    ]
    notes: list[str] = []
    for architecture in ARCHITECTURES:
        cells = [
            " ".join(cell(outcomes(runs, architecture, implementation, feature), notes) for feature in FEATURES)
            for implementation in IMPLEMENTATIONS
        ]
        lines.append(f"| {architecture} | " + " | ".join(cells) + " |")
    legend = (
        "Each cell: training (no cache, gradient checkpointing; gradients reach the ParScale weights only) · cached "
        "generation (dynamic cache) · static cache. ✓ tested and passing, ✗ failing, n/a the plain model cannot do it "
        "there either, – not tested. A note names the run that skipped the cell, and why; on a ✓ the cell passed in "
        f"the other runs. The cells that only a GPU can test are recorded by `{GPU_RUN}` on a machine with a CUDA GPU."
    )
    lines += ["", legend, ""]
    lines += [f"{number}. {note}" for number, note in enumerate(notes, start=1)]
    lines += ["", "Runs (`results/support/`):", ""]
    for name, run in runs.items():
        env = run["environment"]
        lines.append(
            f"- {name}: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
            f"{len(run['results'])} tests, {env['date']}"
        )
    return "\n".join(lines) + "\n"


def run(name: str, pytest_args: list[str]) -> int:
    """Run `tests/test_architectures.py` (with `pytest_args`) and record its outcomes as run `name`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PARSCALE_SUPPORT_RESULTS": str(RESULTS / f"{name}.json")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_architectures.py"]
    return subprocess.call(command + pytest_args, cwd=ROOT, env=environment)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["print", "run"], default="print")
    parser.add_argument("--name", default="cpu", help="the run's name (run): results/support/NAME.json")
    args, pytest_args = parser.parse_known_args(argv)
    if args.command == "run":
        return run(args.name, pytest_args)
    print(render(load_runs()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
