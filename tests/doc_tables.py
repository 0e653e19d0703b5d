"""Every table of figures in README.md, RESULTS.md and BENCHMARKS.md, rendered from the raw results they report.

A document marks each table with two comments, and this module fills in what lies between them:

    <!-- table:NAME -->                          (or <!-- table:NAME key="value" ... --> to pass arguments)
    | ... the rendering of NAME ... |
    <!-- /table -->

`TABLES` maps each NAME to the function that renders it: from `results/` (the experiments' JSON files;
`results_tables.py`), `benchmarks/results/results.jsonl` (the benchmark records; `benchmark_tables.py`) and
`results/support/` (the support table's test runs; `support_table.py`).
`tests/test_doc_tables.py` fails when a document differs from its rendering, so no figure in a table is typed by
hand. Rows appended to the raw data later (a new benchmark run, a finished training run) change only the tables whose
selection takes them: the benchmark tables take the records of one device, named in their marker.

Usage (from the repository root):

    python -m tests.doc_tables             # exit status 1, and the stale tables named, if a document is stale
    python -m tests.doc_tables write       # render every table into the documents

It lives with the tests because a test checks the documents against it; it needs nothing outside the repository.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import sys
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the table modules beside this one
import support_table
from benchmark_tables import (
    benchmark_attention_accuracy,
    benchmark_compiled_prefill,
    benchmark_decode_levers,
    benchmark_fused_projections,
    benchmark_greedy_choice,
    benchmark_kernel_gradients,
    benchmark_sampling,
    benchmark_sampling_attention,
    benchmark_sampling_prefill,
    benchmark_scaling,
    benchmark_targets,
    benchmark_training,
    benchmark_training_attention,
    benchmark_training_changes,
    benchmark_training_loops,
)
from results_tables import (
    humaneval_decision,
    initial_loss,
    parity_cpu,
    quickstart,
    recycling_ablation,
    report,
    scaling,
    scaling_learning_rates,
    stream_sweep,
    stream_sweep_curves,
    stream_sweep_report,
    two_gpus,
)
from table_format import ROOT

DOCUMENTS = [ROOT / "README.md", ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md"]
# A marker may be indented (a table inside a list item): the table's lines then get the same indentation.
MARKER = re.compile(
    r"^(?P<indent> *)<!-- table:(?P<name>[\w-]+)(?P<arguments>[^>]*?) -->\n(?P<body>.*?)^(?P=indent)<!-- /table -->",
    re.DOTALL | re.MULTILINE,
)

TABLES: dict[str, Callable[..., str]] = {
    "support": lambda: support_table.render(support_table.load_runs()),
    "stream-sweep": stream_sweep,
    "stream-sweep-curves": stream_sweep_curves,
    "stream-sweep-report": stream_sweep_report,
    "two-gpus": two_gpus,
    "parity-cpu": parity_cpu,
    "recycling-ablation": recycling_ablation,
    "scaling": scaling,
    "scaling-learning-rates": scaling_learning_rates,
    "initial-loss": initial_loss,
    "report": report,
    "humaneval-decision": humaneval_decision,
    "quickstart": quickstart,
    "benchmark-targets": benchmark_targets,
    "benchmark-scaling": benchmark_scaling,
    "benchmark-sampling": benchmark_sampling,
    "benchmark-sampling-attention": benchmark_sampling_attention,
    "benchmark-sampling-prefill": benchmark_sampling_prefill,
    "benchmark-training": benchmark_training,
    "benchmark-training-changes": benchmark_training_changes,
    "benchmark-training-loops": benchmark_training_loops,
    "benchmark-training-attention": benchmark_training_attention,
    "benchmark-decode-levers": benchmark_decode_levers,
    "benchmark-fused-projections": benchmark_fused_projections,
    "benchmark-attention-accuracy": benchmark_attention_accuracy,
    "benchmark-compiled-prefill": benchmark_compiled_prefill,
    "benchmark-greedy-choice": benchmark_greedy_choice,
    "benchmark-kernel-gradients": benchmark_kernel_gradients,
}


def render_table(name: str, arguments: str) -> str:
    """The rendering of one marker's table; `arguments` as written in the marker (key="value" ...)."""
    if name not in TABLES:
        raise KeyError(f"no table named {name!r}; tables: {sorted(TABLES)}")
    keywords = dict(pair.split("=", 1) for pair in shlex.split(arguments))
    return TABLES[name](**keywords)


def render(text: str) -> str:
    """A document with every marked table rendered again."""

    def fill(match: re.Match) -> str:
        indent = match["indent"]
        table = "".join(indent + line for line in render_table(match["name"], match["arguments"]).splitlines(True))
        return f"{indent}<!-- table:{match['name']}{match['arguments']} -->\n{table}{indent}<!-- /table -->"

    return MARKER.sub(fill, text)


def stale_tables(path: pathlib.Path) -> list[str]:
    """The names of the tables of a document that differ from their rendering."""
    text = path.read_text()
    rendered = {(m["name"], m["arguments"]): m["body"] for m in MARKER.finditer(render(text))}
    return [m["name"] for m in MARKER.finditer(text) if rendered[m["name"], m["arguments"]] != m["body"]]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["write"]:
        for path in DOCUMENTS:
            path.write_text(render(path.read_text()))
        return 0
    if argv:
        print(__doc__)
        return 2
    stale = {path.name: stale_tables(path) for path in DOCUMENTS}
    for name, tables in stale.items():
        if tables:
            print(f"{name}: stale tables {tables}: run `python -m tests.doc_tables write`")
    return 1 if any(stale.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
