"""Markdown tables, the target checks and the measured parallel-vs-parameter scaling comparison, all computed from the
raw records of `benchmarks.run` (JSON lines; `benchmarks.records`), written to report.md beside the plots
(`benchmarks.plots`).

    python -m benchmarks.report results/results.jsonl [more.jsonl ...] --out results/

The comparison follows the paper's Figure 4: for each base shape N and P, the memory and latency that ParScale adds
over the base model, against what the dense model of equal predicted loss adds (`shapes.dense_equivalent`), both
averaged over the measured (prompt, new-token) lengths at one batch size; "×" is the dense increase over the ParScale
increase. Latency is the whole generation (prefill and every new token) on the fast path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from typing import Any

from benchmarks.plots import write_plots
from benchmarks.records import (
    Record,
    call_of,
    decode_rows,
    load_records,
    training_attention,
    training_variant,
    variant_order,
)
from peft_parscale.scaling_law import PAPER_STACK_V2_PYTHON

TRAINING_SUITES = ("train", "train_masks", "train_loops")
TARGETS = {"latency_ratio": 1.2, "fast_ms_per_token": 5.0, "memory_ratio": 1.05, "train_tokens_per_s": 8300.0}


def predicted_loss(non_embedding_params: float, num_streams: int = 1) -> float:
    """The loss the paper's law fitted on Stack-V2 Python predicts for N non-embedding parameters and P streams."""
    return PAPER_STACK_V2_PYTHON.predict(non_embedding_params, num_streams)


def number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(number(cell) if not isinstance(cell, str) else cell for cell in row) + " |" for row in rows
    ]
    return "\n".join(lines)


def device_state_cells(record: Record) -> list[str]:
    """The spread of a case's timed runs ((slowest − fastest) / fastest) beside the lowest SM clock and the lowest of
    the runs' median GPU loads read during them (`DeviceState`: a run's first load readings also average what ran
    before it, so its median, not its lowest), and what NVML refused, so that a slow run can be read against a
    slowed card or an idle one."""
    runs, states = record.get("total_ms_runs") or [], record.get("device_state_runs") or []
    spread = f"{(max(runs) - min(runs)) / min(runs):.1%}" if len(runs) > 1 and min(runs) > 0 else "-"
    clocks = [state["sm_mhz"][0] for state in states if "sm_mhz" in state]
    loads = [state["load_percent"][1] for state in states if "load_percent" in state]
    cell = " / ".join(f"{min(values):.0f}" if values else "-" for values in (clocks, loads))
    errors = sorted({state["error"] for state in states if "error" in state})
    if errors:
        cell = "; ".join(([cell] if clocks or loads else []) + errors)
    return [spread, cell]


def decode_table(rows: list[Record]) -> str:
    header = ["shape", "variant", "mode", "batch", "prompt+new", "prefill ms", "ms/token", "total ms", "peak GiB"]
    # records made before the GPU's state was read keep the table as it was
    with_states = any("device_state_runs" in r for r in rows)
    if with_states:
        header += ["timed runs' spread", "SM MHz (lowest) / load % (lowest run median)"]
    body = [
        [
            r["shape"],
            r["variant"],
            r["mode"],
            r["batch"],
            f"{r['prompt']}+{r['new_tokens']}",
            r["prefill_ms"],
            r["decode_ms_per_token"],
            r["total_ms"],
            r.get("peak_mem_gib"),
            *(device_state_cells(r) if with_states else []),
        ]
        for r in rows
    ]
    return table(header, body)


def sampling_table(records: list[Record]) -> str:
    """The sampling suite's latest record of each case."""
    by_case = {}
    for r in records:
        if r.get("suite") == "sampling":
            by_case[r["shape"], r["variant"], r["mode"], r["batch"], r["prompt"], r["new_tokens"]] = r
    rows = sorted(by_case.values(), key=lambda r: (r["shape"], variant_order(r["variant"]), r["mode"]))
    header = [
        "shape",
        "variant",
        "mode",
        "prompts × samples",
        "prompt+new",
        "completions/s",
        "TTFT ms",
        "total ms",
        "failed",
    ]
    body = [
        [
            r["shape"],
            r["variant"],
            r["mode"],
            f"{r['problems']} × {r['samples_per_problem']}",
            f"{r['prompt']}+{r['new_tokens']}",
            r.get("completions_per_s"),
            r.get("ttft_ms"),
            r.get("total_ms"),
            error_name(r),
        ]
        for r in rows
    ]
    return table(header, body)


def error_name(record: Record) -> str:
    """The exception class of a failed measurement (its message is in the record), or nothing."""
    return record["error"].split(":")[0] if "error" in record else ""


def selector_table(records: list[Record]) -> str:
    """The selector suite's latest record of each case: whether the token choice compiled, and its time per step."""
    by_case = {(r["variant"], r["rows"], r["vocab_size"]): r for r in records if r.get("suite") == "selector"}
    header = ["case", "rows × vocabulary", "compiled", "compile s", "ms per call", "tokens = eager", "failed"]
    body = [
        [
            r["variant"],
            f"{r['rows']} × {r['vocab_size']}",
            r.get("compiled"),
            r.get("compile_s"),
            r.get("ms_per_call"),
            r.get("tokens_equal_fraction"),
            error_name(r),
        ]
        for r in by_case.values()
    ]
    return table(header, body)


def target_checks(records: list[Record]) -> tuple[str, list[Record]]:
    """The issue's targets, each as a ratio against its comparison from the same run."""
    rows = decode_rows(records, "targets") + decode_rows(records, "equality")
    if not rows:
        return "", []

    def find(variant: str, batch: int, mode: str) -> Record | None:
        return next((r for r in rows if (r["variant"], r["batch"], r["mode"]) == (variant, batch, mode)), None)

    calls: dict[Any, dict[tuple, Record]] = defaultdict(dict)  # call -> (variant, batch, mode) -> its latest record
    for r in records:
        if r.get("suite") == "targets":
            calls[call_of(r)][r["variant"], r["batch"], r["mode"]] = r

    def same_call(first: tuple, second: tuple) -> tuple[Record, Record] | tuple[None, None]:
        """Both cases' records from the latest call that measured both: times of separate calls drift apart by more
        than some of these ratios (BENCHMARKS.md, runs P, R and S)."""
        both = [(call[first], call[second]) for call in calls.values() if first in call and second in call]
        return both[-1] if both else (None, None)

    checks = []

    def check(target: str, value: Any, goal: str, met: bool, **extra: Any) -> None:
        checks.append({"target": target, "value": value, "goal": goal, "met": met, **extra})

    for mode in dict.fromkeys(r["mode"] for r in rows):  # eager, generate_static, fast, and the fast_* levers
        p1, p8 = same_call(("P1", 1, mode), ("P8", 1, mode))
        if p1 and p8:
            ratio = p8["decode_ms_per_token"] / p1["decode_ms_per_token"]
            check(f"decode ms/token P=8 / P=1 ({mode})", ratio, "≤ 1.2", ratio <= TARGETS["latency_ratio"])
            if p1.get("peak_mem_gib") and p8.get("peak_mem_gib") and mode != "generate_static":
                ratio = p8["peak_mem_gib"] / p1["peak_mem_gib"]
                check(f"peak memory P=8 / P=1 ({mode})", ratio, "≤ 1.05", ratio <= TARGETS["memory_ratio"])
    fast_p8 = find("P8", 1, "fast")
    if fast_p8:
        value = fast_p8["decode_ms_per_token"]
        check("fast path P=8 ms/token", value, "< 5 ms", value < TARGETS["fast_ms_per_token"])
        for stock_mode in ("generate_static", "fast"):
            parallel, comparison = same_call(("P8", 1, "fast"), ("stock", 8, stock_mode))
            if comparison:
                ratio = parallel["decode_ms_per_token"] / comparison["decode_ms_per_token"]
                check(f"fast P=8 / stock batch 8 ({stock_mode}) ms/token", ratio, "< 1", ratio < 1)
    for r in rows:
        agreement = r.get("tokens_vs_eager")
        if agreement:
            first = agreement["first_difference"]
            check(
                f"greedy tokens {r['variant']} b{r['batch']} {r['mode']} = eager ({r.get('dtype')})",
                "identical" if agreement["equal"] else f"differ from new token {first - r['prompt']}",
                "identical",
                agreement["equal"],
                first_difference=first,
            )
    body = [[c["target"], c["value"], c["goal"], c["met"]] for c in checks]
    return table(["target", "measured", "goal", "met"], body), checks


def scaling_comparison(records: list[Record], mode: str = "fast") -> list[Record]:
    """ParScale's memory/latency increase over the base model against the dense model of equal predicted loss, for
    each measured (shape, batch, prompt + new tokens) and P; plus, where several lengths were measured for the same
    (shape, batch, P), their mean (the paper's Figure 4 averages over lengths).

    The base model, P streams and the dense model of a comparison come from one call (records of one benchmark
    invocation, or for older records one run label), the latest that measured all three: latencies of separate calls
    differ by more than some of these increases (BENCHMARKS.md, run S)."""
    calls: dict[tuple, dict[str, Record]] = defaultdict(dict)  # (case, call) -> variant -> the call's latest record
    for r in records:
        if r.get("suite") == "decode" and r["mode"] == mode:
            calls[r["shape"], r["batch"], r["prompt"], r["new_tokens"], call_of(r)][r["variant"]] = r
    chosen: dict[tuple, tuple[Record, Record, Record]] = {}  # (case, P) -> the latest call's three records
    for (shape, batch, prompt, new_tokens, _), by_variant in calls.items():  # calls in the order they were recorded
        for num_streams in (2, 4, 8):
            measured = [by_variant.get(variant) for variant in ("stock", f"P{num_streams}", f"dense_P{num_streams}")]
            if all(measured):
                chosen[shape, batch, prompt, new_tokens, num_streams] = tuple(measured)
    comparisons = []
    for (shape, batch, prompt, new_tokens, num_streams), (stock, parallel, dense) in sorted(chosen.items()):
        lengths = f"{prompt}+{new_tokens}"
        comparison = {
            "shape": shape,
            "batch": batch,
            "lengths": lengths,
            "P": num_streams,
            "base_loss": predicted_loss(stock["non_embedding_params"]),
            "loss": predicted_loss(stock["non_embedding_params"], num_streams),
            "dense_params_ratio": dense["non_embedding_params"] / stock["non_embedding_params"],
        }
        for key in ("peak_mem_gib", "total_ms", "decode_ms_per_token"):
            base = stock.get(key)
            comparison[f"{key}_base"] = base
            comparison[f"{key}_parscale_increase"] = None if base is None else parallel[key] - base
            comparison[f"{key}_dense_increase"] = None if base is None else dense[key] - base
        comparisons.append(comparison)
    by_point: dict[tuple, list[Record]] = defaultdict(list)
    for c in comparisons:
        by_point[c["shape"], c["batch"], c["P"]].append(c)
    for (shape, batch, num_streams), group in sorted(by_point.items()):
        if len(group) > 1:
            mean = {**group[0], "lengths": "mean of " + ", ".join(c["lengths"] for c in group)}
            for key in [k for k in group[0] if k.endswith(("_base", "_increase"))]:
                values = [c[key] for c in group]
                mean[key] = None if None in values else statistics.mean(values)
            comparisons.append(mean)
    for c in comparisons:
        for key in ("peak_mem_gib", "total_ms"):
            parallel, dense = c[f"{key}_parscale_increase"], c[f"{key}_dense_increase"]
            c[f"{key}_times_less"] = dense / parallel if parallel is not None and parallel > 0 else None
    return comparisons


def comparison_table(comparisons: list[Record]) -> str:
    header = [
        "shape",
        "batch",
        "prompt+new",
        "P",
        "dense N ratio",
        "ParScale +GiB",
        "dense +GiB",
        "× less memory",
        "ParScale +ms",
        "dense +ms",
        "× less latency",
    ]
    body = [
        [
            c["shape"],
            c["batch"],
            c["lengths"],
            c["P"],
            c["dense_params_ratio"],
            c["peak_mem_gib_parscale_increase"],
            c["peak_mem_gib_dense_increase"],
            c["peak_mem_gib_times_less"],
            c["total_ms_parscale_increase"],
            c["total_ms_dense_increase"],
            c["total_ms_times_less"],
        ]
        for c in comparisons
    ]
    return table(header, body)


def training_table(records: list[Record]) -> str:
    rows = {}
    for r in records:
        if r.get("suite") in TRAINING_SUITES:
            # records before the loops were plain
            variant, loop, attention = training_variant(r), r.get("loop", "plain"), training_attention(r)
            case = (r["shape"], r["P"], variant, r["mask"], r["gradient_checkpointing"], r.get("compile", "none"), loop)
            rows[(*case, attention, r["length"])] = {**r, "variant": variant, "loop": loop, "attention": attention}
    header = [
        "shape", "variant", "seq", "batch", "mask", "grad. ckpt", "compile", "loop", "attention", "step ms", "tokens/s",
        "MFU", "peak GiB",
    ]  # fmt: skip
    columns = [
        "shape", "variant", "length", "batch", "mask", "gradient_checkpointing", "compile", "loop", "attention",
        "step_ms", "tokens_per_s",
    ]  # fmt: skip
    body = [[r.get(c, "none") for c in columns] + [r["mfu"], r["peak_mem_gib"]] for _, r in sorted(rows.items())]
    return table(header, body)


def by_device(records: list[Record]) -> dict[str, list[Record]]:
    """The records of each device, in the order the devices first appear: every table, ratio and plot is computed
    within one device, so that a later run on another GPU never replaces or pairs with an earlier one's case."""
    devices: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        devices[record.get("device_name", "unknown device")].append(record)
    return dict(devices)


def device_slug(device: str) -> str:
    """A device's name as a file-name prefix: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return "-".join("".join(c if c.isalnum() else " " for c in device.lower()).split())


def device_sections(records: list[Record], out: str, slug: str) -> list[str]:
    """One device's part of the report: its environment (every run's), tables and plots."""
    sections = []
    for env in (r for r in records if r.get("suite") == "env"):
        lines = "\n".join(f"- {k}: {v}" for k, v in env.items() if k != "suite")
        sections.append(f"### Environment, run {env.get('run', '?')}\n\n{lines}")
    targets, _ = target_checks(records)
    if targets:
        sections.append("### Targets\n\n" + decode_table(decode_rows(records, "targets")) + "\n\n" + targets)
    comparisons = scaling_comparison(records)
    if comparisons:
        sections.append("### Parallel vs parameter scaling (fast path)\n\n" + comparison_table(comparisons))
    for suite, title in (("decode", "Decode sweep"), ("sweep_eager", "Eager generate")):
        rows = decode_rows(records, suite)
        if rows:
            sections.append(f"### {title}\n\n" + decode_table(rows))
    if any(r.get("suite") == "selector" for r in records):
        sections.append("### Token choice compilation (sampling step)\n\n" + selector_table(records))
    if any(r.get("suite") == "sampling" for r in records):
        sections.append("### Sampling throughput (HumanEval workload)\n\n" + sampling_table(records))
    if any(r.get("suite") in TRAINING_SUITES for r in records):
        sections.append("### Training throughput\n\n" + training_table(records))
    plots = write_plots(records, comparisons, out, file_prefix=f"{slug}-")
    if plots:
        sections.append("### Plots\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots))
    return sections


def write_report(records: list[Record], out: str) -> str:
    """Write OUT/report.md (and each device's plots, named after it); return the Markdown. OUT/comparison.json holds
    each device's target checks and scaling comparison."""
    parts, comparison = [], {}
    for device, device_records in by_device(records).items():
        sections = device_sections(device_records, out, device_slug(device))
        parts.append(f"## {device}\n\n" + "\n\n".join(sections))
        comparison[device] = {
            "targets": target_checks(device_records)[1],
            "scaling_comparison": scaling_comparison(device_records),
        }
    markdown = "# Benchmark report\n\nEach device's records apart, the latest record of each case.\n\n"
    markdown += "\n\n".join(parts) + "\n"
    with open(os.path.join(out, "report.md"), "w") as file:
        file.write(markdown)
    with open(os.path.join(out, "comparison.json"), "w") as file:
        json.dump({"devices": comparison}, file, indent=1)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report")
    parser.add_argument("results", nargs="+", help="results.jsonl files")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(write_report(load_records(args.results), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
