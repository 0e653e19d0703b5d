"""The committed results the README's support table is rendered from (`support_table.py`; `test_doc_tables.py` checks
the README against the rendering) are what this suite's own run of `test_architectures.py` gives."""

from __future__ import annotations

import json
import os

import pytest
import support_table
import transformers
from conftest import SUPPORT_RESULTS
from tiny_models import ARCHITECTURES

ON_CPU = os.environ.get("PARSCALE_TEST_DEVICE", "cpu") == "cpu"  # as test_architectures.py runs


def test_the_committed_runs_cover_every_architecture_and_cell():
    runs = support_table.load_runs()
    assert "cpu" in runs  # the suite's own run
    for name, run in runs.items():
        assert {result["architecture"] for result in run["results"].values()} == set(ARCHITECTURES), name
    cpu = runs["cpu"]["results"].values()
    cells = {(r["architecture"], r["attn_implementation"], r["feature"]) for r in cpu}
    assert cells == {
        (architecture, implementation, feature)
        for architecture in ARCHITECTURES
        for implementation in ("sdpa", "eager")
        for feature in support_table.FEATURES
    }


def kind(outcome: str) -> str:
    return outcome.split(":", 1)[0]  # passed, failed, skipped (the reason's wording may change with versions)


def test_this_sessions_outcomes_are_the_committed_ones(request):
    session = request.config.stash[SUPPORT_RESULTS]
    if not session:
        pytest.skip("tests/test_architectures.py did not run in this session")
    # Outcomes depend on the versions (transformers 5.17 runs Gemma2 with sdpa, 5.23 refuses to): compare with the
    # runs recorded on this kind of device with this transformers version.
    committed, recorded_with = {}, set()
    for run in support_table.load_runs().values():
        if (run["environment"]["device"] == "cpu") == ON_CPU:
            recorded_with.add(run["environment"]["transformers"])
            if run["environment"]["transformers"] == transformers.__version__:
                committed.update(run["results"])
    if not committed:
        pytest.skip(
            f"results/support/ was recorded with transformers {sorted(recorded_with)}, not {transformers.__version__}"
        )
    changed = {
        test: (result["outcome"], committed.get(test, {}).get("outcome"))
        for test, result in session.items()
        if test not in committed or kind(committed[test]["outcome"]) != kind(result["outcome"])
    }
    assert not changed, (
        "test_architectures.py's outcomes differ from results/support/ (this session's, committed): "
        f"{json.dumps(changed, indent=1)[:2000]}\nRecord them again: python -m tests.support_table run"
    )


def test_the_rendering_marks_failures_skips_and_gaps():
    runs = {
        "a": {
            "environment": {"device": "cpu", "torch": "t", "transformers": "x", "peft": "p", "date": "d"},
            "results": {
                "t1": {
                    "architecture": "GPT-2",
                    "attn_implementation": "sdpa",
                    "feature": "training",
                    "outcome": "passed",
                },
                "t2": {
                    "architecture": "GPT-2",
                    "attn_implementation": "sdpa",
                    "feature": "training",
                    "outcome": "failed",
                },
                "t3": {
                    "architecture": "GPT-2",
                    "attn_implementation": "eager",
                    "feature": "training",
                    "outcome": "skipped: no",
                },
            },
        }
    }
    row = next(line for line in support_table.render(runs).splitlines() if line.startswith("| GPT-2 |"))
    assert row == "| GPT-2 | ✗ – – | n/a<sup>1</sup> – – | – – – |"
    assert "1. a: no" in support_table.render(runs).splitlines()
