"""The README's Usage snippets run as written, in order, in a fresh interpreter.

A tiny random Qwen2 stands in for ``Qwen/Qwen2.5-0.5B``: it is placed in a Hugging Face cache of the test's own, in
the layout ``huggingface_hub`` documents (``models--ORG--NAME/refs/main`` naming a snapshot directory with the files),
and ``HF_HUB_OFFLINE=1`` makes transformers read it from there without asking the Hub. So the snippets load the Hub id
exactly as a user's interpreter would load a cached model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import SUBPROCESS_TIMEOUT
from safetensors.torch import load_file

from peft_parscale.testing import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = "Qwen/Qwen2.5-0.5B"


def usage_snippets() -> list[str]:
    section = (ROOT / "README.md").read_text().split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.+?)```", section, re.DOTALL)


def cache_as_hub_model(hub_cache: Path, repo_id: str) -> None:
    """A tiny checkpoint in ``hub_cache`` as the cached snapshot of the model ``repo_id``."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    save_tiny_checkpoint(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_usage_snippets_run_in_order_in_a_fresh_interpreter(tmp_path):
    snippets = usage_snippets()
    assert len(snippets) == 3 and snippets[0].startswith("import peft_parscale")
    assert all(STAND_IN in snippet for snippet in snippets)
    cache_as_hub_model(tmp_path / "hub", STAND_IN)
    (tmp_path / "script.py").write_text("\n".join(snippets))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the first snippet's adapters, with the P each was made with, loaded by the second
    for P in (2, 8):
        weights = load_file(tmp_path / f"qwen2.5-0.5b-parscale-p{P}" / "adapter_model.safetensors")
        (aggregator,) = [tensor for name, tensor in weights.items() if name.endswith("aggregator.2.weight")]
        assert aggregator.shape[0] == P
    assert "trainable params" in result.stdout
    assert "for a second time" not in result.stderr  # PEFT's warning when a wrapped model is wrapped again
