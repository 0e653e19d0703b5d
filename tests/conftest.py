"""Records which support-table cell each test of `test_architectures.py` proves, and its outcome (`support_table.py`)."""

from __future__ import annotations

import json
import os

import pytest

SUPPORT_RESULTS = pytest.StashKey[dict]()


def pytest_configure(config):
    config.addinivalue_line("markers", "support(feature): the README support-table cell (feature) this test proves")
    config.stash[SUPPORT_RESULTS] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("support")
    if marker is None or not hasattr(item, "callspec"):
        return
    if report.when == "call" or report.outcome != "passed":  # a failed or skipped setup never reaches the call
        params = item.callspec.params
        outcome = report.outcome
        if report.skipped:
            outcome = "skipped: " + str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        item.config.stash[SUPPORT_RESULTS][item.nodeid] = {
            "architecture": params["name"],
            "attn_implementation": params["attn_implementation"],
            "feature": marker.kwargs["feature"],
            "outcome": outcome,
        }


def pytest_sessionfinish(session):
    path = os.environ.get("PARSCALE_SUPPORT_RESULTS")
    if path and session.config.stash[SUPPORT_RESULTS]:
        with open(path, "w") as file:
            json.dump(session.config.stash[SUPPORT_RESULTS], file, indent=1, sort_keys=True)
