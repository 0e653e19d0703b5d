"""Shared fixtures, and the recording of every test that proves a cell of the README's support table
(`support_table.py`).

Tests of `test_architectures.py` carry a `support(feature=...)` mark; their architecture and attention implementation
are their `name` and `attn_implementation` parameters. The outcomes are kept for `test_support_table.py` (which checks
them against the committed results) and, when `PARSCALE_SUPPORT_RESULTS` names a file, written there with the
versions and device that produced them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import pytest
import transformers
from packaging.version import Version

from peft_parscale.testing import tiny_tokenizer

SUPPORT_RESULTS = pytest.StashKey[dict]()
# How long a subprocess a test starts may run before it is stopped: a guard against a hang, not a time limit. The
# scaling experiment's smoke run took over 300 s on CI's 2 cores while other jobs loaded them (2026-12-05).
SUBPROCESS_TIMEOUT = 1800
# transformers 5.17's Trainer loads a several-process run's optimizer state with map_location=args.device, "cpu:0" on
# CPU processes, which torch cannot restore to; 5.18 maps CPU processes to "cpu" (`Trainer._load_optimizer_and_
# scheduler`). GPU processes (cuda:N) are not affected. The package supports 5.17, the GPU image's version, so the
# tests that resume on two CPU processes expect that failure, and no other, there.
CPU_RESUME_FAILS_UPSTREAM = Version(transformers.__version__) < Version("5.18")
UPSTREAM_RESUME_ERROR = "don't know how to restore data location of torch.storage.UntypedStorage (tagged with cpu:0)"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """`tiny_tokenizer()` saved to a directory, for configs that name a tokenizer (`tokenizer_name_or_path`)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def pytest_configure(config):
    config.addinivalue_line("markers", "support(feature): the support-table cell (feature) this test proves")
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
        if report.skipped:  # longrepr: (path, line, "Skipped: reason")
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            outcome = "skipped: " + reason.removeprefix("Skipped: ")
        item.config.stash[SUPPORT_RESULTS][item.nodeid] = {
            "architecture": params["name"],
            "attn_implementation": params["attn_implementation"],
            "feature": marker.kwargs["feature"],
            "outcome": outcome,
        }


def environment() -> dict[str, str]:
    """The versions and device a run used."""
    import peft
    import torch
    import transformers

    device = os.environ.get("PARSCALE_TEST_DEVICE", "cpu")
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name(torch.device(device))
    return {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.date.today().isoformat(),
    }


def pytest_sessionfinish(session):
    path = os.environ.get("PARSCALE_SUPPORT_RESULTS")
    results = session.config.stash[SUPPORT_RESULTS]
    if path and results:
        with open(path, "w") as file:
            json.dump({"environment": environment(), "results": results}, file, indent=1, sort_keys=True)
            file.write("\n")
