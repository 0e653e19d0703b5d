"""Real Python code with no download: the running interpreter's standard library, split by file.

The paper recycles a model by training ParScale weights on Python code (its Section 4.2 uses Stack-V2 Python).
Every Python installation carries a few thousand files of reviewed, idiomatic Python in its standard library, so
the quickstart and the tests can train and evaluate on real code on a machine with no network. Test packages are
left out (they are mostly boilerplate around assertions), and so is ``site-packages`` (not the standard library).

The split is by file and by a hash of the file's path relative to the library root, so it is the same on every run
and machine for a given Python version, and no file contributes to both sides.

Example::

    from peft_parscale.data import python_stdlib_corpus

    corpus = python_stdlib_corpus()          # DatasetDict with "train" and "test", columns "text" and "path"
    trainer = SFTTrainer(..., train_dataset=corpus["train"], eval_dataset=corpus["test"])
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

from datasets import Dataset, DatasetDict

EXCLUDED_DIRECTORIES = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_python_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files under ``root`` (default: this interpreter's), sorted, tests excluded."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    return sorted(
        path
        for path in root.rglob("*.py")
        if not EXCLUDED_DIRECTORIES.intersection(path.relative_to(root).parts[:-1])
        and not path.name.startswith("test_")
    )


def is_heldout(relative_path: str, heldout_percent: int) -> bool:
    """Whether a file is held out: a stable hash of its relative path, so the split never depends on file order."""
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100 < heldout_percent


def python_stdlib_corpus(heldout_percent: int = 5, root: str | Path | None = None) -> DatasetDict:
    """The standard library's source as a ``DatasetDict`` with a ``train`` and a ``test`` (held-out) split.

    Each row is one file: ``{"text": source, "path": path relative to the library root}``. Files that are not
    valid UTF-8 are skipped.
    """
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be between 1 and 99, got {heldout_percent}")
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for path in stdlib_python_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        relative = path.relative_to(root).as_posix()
        splits["test" if is_heldout(relative, heldout_percent) else "train"].append({"text": text, "path": relative})
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})
