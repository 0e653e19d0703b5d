"""What every table of `doc_tables.py` is made of: the repository's paths, the raw results read as JSON, and the
Markdown of a table and of a signed difference."""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT))  # benchmarks/ (a package at the root)


def read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def markdown(header: str, alignment: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: its header row (the column names joined by " | "), "---" or "---:" per column, the rows."""
    lines = ["| " + header + " |", "| " + " | ".join(alignment) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def signed(value: float, digits: int = 4) -> str:
    """A difference with its sign, the minus sign typeset as in the documents."""
    return f"{value:+.{digits}f}".replace("-", "−")
