"""The raw records of `benchmarks.run` (JSON lines): loading them, and choosing the latest of each case in the order
the tables and plots list them (`benchmarks.report`, `benchmarks.plots`); and the authors' training speeds that the
tables and plots set beside them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

Record = dict[str, Any]
AUTHORS_TRAINING = {1: 23300, 4: 12100, 8: 6400}  # the authors' code, 1.5B shape, seq 2048, H100 (issue 5)


def load_records(paths: Iterable[str]) -> list[Record]:
    records = []
    for path in paths:
        with open(path) as lines:
            records += [json.loads(line) for line in lines if line.strip()]
    return records


def call_of(record: Record) -> str | None:
    """The device call a record came from: its benchmark invocation, or for records made before they carried one
    its run label (which may span several calls)."""
    return record.get("invocation") or record.get("run")


def decode_rows(records: list[Record], suite: str) -> list[Record]:
    """One record per case, the latest run of each."""
    by_case = {}
    for r in records:
        if r.get("suite") == suite:
            by_case[r["shape"], r["variant"], r["mode"], r["batch"], r["prompt"], r["new_tokens"]] = r
    return sorted(by_case.values(), key=lambda r: (r["shape"], variant_order(r["variant"]), r["batch"], r["prompt"]))


def variant_order(variant: str) -> tuple[int, int, int]:
    if variant == "stock":
        return (0, 1, 0)
    dense = variant.startswith("dense_")
    streams, _, prefix_length = variant.split("P")[-1].partition("T")  # P<n>, P<n>T<t> or dense_P<n>
    return (2 if dense else 1, int(streams), int(prefix_length or 0))


def training_variant(record: Record) -> str:
    """A training record's variant; records made before the training suite took variants are P<n>."""
    return record["variant"] if "variant" in record else f"P{record['P']}"


def training_attention(record: Record) -> str:
    """A training record's prefix attention; records made before the training suite took `--train-attention` (and
    records of other suites) are the package's own lower-right bias."""
    return record.get("attention", "bias")
