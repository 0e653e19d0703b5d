"""Every table of figures in README.md, RESULTS.md and BENCHMARKS.md, rendered from the raw results they report.

A document marks each table with two comments, and this module fills in what lies between them:

    <!-- table:NAME -->                          (or <!-- table:NAME key="value" ... --> to pass arguments)
    | ... the rendering of NAME ... |
    <!-- /table -->

`TABLES` maps each NAME to the function that renders it from `results/` (the experiments' JSON files),
`benchmarks/results/results.jsonl` (the benchmark records) and `results/support/` (the support table's test runs).
`tests/test_doc_tables.py` fails when a document differs from its rendering, so no figure in a table is typed by
hand. Rows appended to the raw data later (a new benchmark run, a finished training run) change only the tables whose
selection takes them: the benchmark tables take the records of one device, named in their marker.

Usage (from the repository root):

    python -m tests.doc_tables             # exit status 1, and the stale tables named, if a document is stale
    python -m tests.doc_tables write       # render every table into the documents

It lives with the tests because a test checks the documents against it; it needs nothing outside the repository.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import sys
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
DOCUMENTS = [ROOT / "README.md", ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md"]
# A marker may be indented (a table inside a list item): the table's lines then get the same indentation.
MARKER = re.compile(
    r"^(?P<indent> *)<!-- table:(?P<name>[\w-]+)(?P<arguments>[^>]*?) -->\n(?P<body>.*?)^(?P=indent)<!-- /table -->",
    re.DOTALL | re.MULTILINE,
)

sys.path.insert(0, str(ROOT))  # benchmarks/ (a package at the root)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # support_table, architectures
import support_table

from benchmarks.report import AUTHORS_TRAINING, TARGETS, load_records, scaling_comparison, training_variant
from benchmarks.shapes import shape_config
from benchmarks.training import training_flops

H100_PEAK_TFLOPS = 989.0  # dense bf16 peak of the H100 SXM and the H200, the MFU denominator of BENCHMARKS.md


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


# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md: the stream sweep (experiments/stream_sweep.py, results/stream-sweep/)

SWEEP = RESULTS / "stream-sweep"


def sweep_runs(directory: pathlib.Path) -> list[dict]:
    """The sweep's arms in `directory`, ParScale by P and prefix length, then LoRA: every run named after its arm
    alone (P1, P8, P1T192, lora@6e-4, ...; not a variant named with --tag, such as P8-1gpu), each with its held-out
    curve [(tokens, loss)], training tokens, steady tokens/s of each segment, a label (``P=8`` for the sweep's P<n>,
    else the arm's name), and, for a run stopped before its end, the step it stopped at."""
    runs = []
    for path in sorted(directory.glob("*/result.json")):
        result = read_json(path)
        arm = result.get("arm", f"P{result['P']}")  # results written before the sweep named other arms are P<n>
        if arm == "base" or result["name"] != arm:
            continue  # the base model is a row of its own; P8-1gpu, P8-fp32-*: the same run's speed and parity
        tokens_per_step = result["train_tokens"] // result["steps"]
        result["segment_tokens_per_s"] = [  # a segment trained side by side with other runs has no speed of its own
            tokens_per_step / s["steady_step_s"] for s in result["segments"] if s.get("gpu_shared_by", 1) == 1
        ]
        runs.append({**result, "label": f"P={result['P']}" if arm == f"P{result['P']}" else arm})
    for path in sorted(directory.glob("P*-partial/trainer_state.json")):
        state = read_json(path)
        P = int(path.parent.name[1:].removesuffix("-partial"))
        initial = read_json(path.parent / "initial_eval.json")["eval_loss"]
        curve = [(0, initial)] + [
            (int(entry["eval_num_tokens"]), entry["eval_loss"])
            for entry in state["log_history"]
            if "eval_loss" in entry
        ]
        tokens_per_step = runs[0]["train_tokens"] // runs[0]["steps"]  # the same global batch in every run
        runs.append(
            {
                "P": P,
                "label": f"P={P}",
                "heldout_curve": curve,
                "train_tokens": state["global_step"] * tokens_per_step,
                "stopped": (state["global_step"], state["max_steps"]),
                "segment_tokens_per_s": [],
            }
        )
    order = ["parscale", "lora"]
    return sorted(
        runs, key=lambda run: (order.index(run.get("kind", "parscale")), run["P"] or 0, run.get("prefix_length") or 0)
    )


def tokens_per_s(values: list[float]) -> str:
    """A steady rate, or the range of the segments' rates where a run was split."""
    if not values:
        return ""
    low, high = min(values), max(values)
    return f"{high:,.0f}" if round(low) == round(high) else f"{low:,.0f}–{high:,.0f}"


def gpus(count: int) -> str:
    return f"{count} GPU" + ("s" if count > 1 else "")


def stream_sweep(path: str = "stream-sweep") -> str:
    """The sweep's final held-out losses (`sweep_runs` of results/PATH) against the base model's, with throughput."""
    directory = RESULTS / path
    runs = sweep_runs(directory)
    base = read_json(directory / "base" / "result.json")["heldout_loss"]
    rows = [["base (no adapter)", "-", "-", f"{base:.4f}", "-", "-"]]
    processes = {run["processes"] for run in runs if "processes" in run}
    for run in runs:
        curve = run["heldout_curve"]
        if "stopped" in run:
            step, steps = run["stopped"]
            last_tokens, last = curve[-1]
            rows.append(
                [
                    f"{run['label']} (stopped at step {step} of {steps})",
                    f"{run['train_tokens']:,}",
                    f"{curve[0][1]:.4f}",
                    f"{last:.4f} at {last_tokens / 1e6:.1f} M",
                    "",
                    "",
                ]
            )
            continue
        final = curve[-1][1]
        speed = tokens_per_s(run["segment_tokens_per_s"])
        rows.append(
            [
                run["label"],
                f"{run['train_tokens']:,}",
                f"{curve[0][1]:.4f}",
                f"{final:.4f}",
                signed(final - base),
                speed if len(processes) == 1 else f"{speed}, {gpus(run['processes'])}",
            ]
        )
    on = gpus(processes.pop()) if len(processes) == 1 else "GPUs"
    header = (
        "model | training tokens | held-out loss at init | final held-out loss | vs base"
        f" | tokens/s, {on} (steady; range over segments)"
    )
    return markdown(header, ["---"] + ["---:"] * 5, rows)


def stream_sweep_curves(path: str = "stream-sweep") -> str:
    """Every arm's held-out learning curve, and the gain over P=1 of the sweep's P > 1 (results/PATH)."""
    runs = sweep_runs(RESULTS / path)
    curves = {run["label"]: dict(run["heldout_curve"]) for run in runs}
    tokens = sorted({t for curve in curves.values() for t in curve})
    rows = [[label] + [f"{curve[t]:.4f}" if t in curve else "" for t in tokens] for label, curve in curves.items()]
    for run in runs:
        curve = curves[run["label"]]
        if run["label"] == f"P={run['P']}" and run["P"] > 1 and "P=1" in curves:
            rows.append(
                [f"gain, {run['label']}"]
                + [signed(curves["P=1"][t] - curve[t]).lstrip("+") if t in curve else "" for t in tokens]
            )
    header = " | ".join(["tokens (M)"] + [f"{t / 1e6:.2f}".removesuffix(".00") for t in tokens])
    return markdown(header, ["---"] + ["---:"] * len(tokens), rows)


def processes_note(result: dict) -> str:
    """How a run's processes trained together: the sweep records `gradients_averaged` since 2026-12-05; the runs
    before it evaluated before training, which left their processes without gradient averaging (RESULTS.md, the
    correction in the stream sweep's section)."""
    if not result.get("gradients_averaged"):
        return " (gradients not averaged)"
    return " (FSDP)" if "FSDP" in result["distributed_type"] else " (DDP)"


def two_gpus() -> str:
    """Throughput of the sweep's P=8 and P=1 on two GPUs against P=8 on one (`--tag=-1gpu`), with MFU per GPU."""
    config = shape_config("0.5b")
    rows, one_gpu = [], None
    for name in ("P8-1gpu", "P8", "P1"):
        result = read_json(SWEEP / name / "result.json")
        tokens_per_step = result["train_tokens"] // result["steps"]
        rates = [tokens_per_step / segment["steady_step_s"] for segment in result["segments"]]
        flops = training_flops(config, result["P"], result["prefix_length"], tokens_per_step // 2048, 2048)
        mfu = [flops / (tokens_per_step / rate) / result["processes"] / (H100_PEAK_TFLOPS * 1e12) for rate in rates]
        if result["processes"] == 1:
            one_gpu, ratio = min(rates), ""
        elif one_gpu is not None and result["P"] == 8:
            ratio = f"{min(rates) / one_gpu:.2f}–{max(rates) / one_gpu:.2f}×"
        else:
            ratio = "(1 GPU not run)"
        low, high = (f"{100 * value:.1f} %" for value in (min(mfu), max(mfu)))
        rows.append(
            [
                str(result["P"]),
                f"{result['processes']}" + (processes_note(result) if result["processes"] > 1 else ""),
                str(len(result["segments"])),
                tokens_per_s(rates),
                low if low == high else f"{low}–{high}",
                ratio,
            ]
        )
    header = "P | GPUs | segments | steady tokens/s | MFU per GPU | 2 GPUs / 1 GPU"
    return markdown(header, ["---:", "---:", "---:", "---:", "---:", "---:"], rows)


def parity_cpu() -> str:
    """One process against two (gloo, float32) per optimizer: the aggregator's first layer, and the largest difference
    of every other tensor (`experiments/stream_sweep.py --compare`, results/parity-cpu/compare-*.json)."""
    first_layer = "base_model.model.model.streams.parscale_aggregator.0.weight"
    rows = []
    for variant, label in (
        ("adam", "AdamW, ε = 1e-8 (the default)"),
        ("adam1e-6", "AdamW, ε = 1e-6"),
        ("adam1e-4", "AdamW, ε = 1e-4"),
        ("sgd", "SGD"),
    ):
        (run,) = read_json(RESULTS / "parity-cpu" / f"compare-{variant}.json")["runs"].values()
        layer = run["per_tensor"][first_layer]
        others = [tensor for name, tensor in run["per_tensor"].items() if name != first_layer]
        share = f" ({layer['relative']:.1e})" if layer["difference"] else ""
        rows.append(
            [
                label,
                f"{layer['difference']:.1e} / {layer['moved']:.1e}{share}".replace("0.0e+00", "0"),
                (
                    f"{max(tensor['difference'] for tensor in others):.1e} "
                    f"({max(tensor['relative'] for tensor in others):.1e})"
                ),
            ]
        )
    header = (
        "optimizer | aggregator's first layer: difference / movement (share) | "
        "every other tensor: largest difference (largest share)"
    )
    return markdown(header, ["---", "---:", "---:"], rows)


# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md: the recycling ablation (experiments/recycling_ablation.py, results/recycling-ablation/)


def recycling_ablation() -> str:
    """Every run; in bold, the lowest validation loss after training at each P among the runs without
    reparameterisation (the settings kept)."""
    directory = RESULTS / "recycling-ablation"
    runs = [read_json(path) for path in sorted(directory.glob("*.json")) if path.stem not in ("base", "corpus")]
    runs.sort(key=lambda r: (r["P"], r["prefix_projection"], r["smoothing"], r["prefix_init"], r["learning_rate"]))
    kept = {}
    for run in runs:
        if not run["prefix_projection"] and run["validation_after"] < kept.get(run["P"], (None, 1e9))[1]:
            kept[run["P"]] = (run["name"], run["validation_after"])
    base = read_json(directory / "base.json")["validation"]
    rows = [["base (no adapter)", "-", "-", "-", "-", "-", f"{base:.4f}", "-", "-"]]
    for run in runs:
        best = kept[run["P"]][0] == run["name"]
        bold = (lambda text: f"**{text}**") if best else (lambda text: text)
        rows.append(
            [
                bold(run["name"]),
                str(run["P"]),
                run["prefix_init"],
                f"{run['learning_rate']:g}",
                "on" if run["prefix_projection"] else "off",
                f"{run['smoothing']:g}",
                f"{run['validation_before']:.4f}",
                bold(f"{run['validation_after']:.4f}"),
                f"{run['train_tokens_per_s']:,.0f}",
            ]
        )
    header = "run | P | init | lr | reparam. | ε | validation loss at init | after training | training tokens/s"
    return markdown(header, ["---", "---:", "---", "---:", "---", "---:", "---:", "---:", "---:"], rows)


# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md: the first scaling runs (experiments/scaling_experiment.py, results/scaling*/)

# The learning rate of each run directory: the experiment's default then, and the further run's --learning-rate.
SCALING_RUNS = {"scaling": 1e-3, "scaling-lr5e-3": 5e-3}


def scaling_rows(directory: str) -> list[dict]:
    return read_json(RESULTS / directory / "results.json")["rows"]


def model_name(row: dict) -> str:
    return f"P={row['P']}" if row["P"] else "base (no adapter)"


def scaling() -> str:
    rows = []
    for row in scaling_rows("scaling"):
        trained = row["P"] is not None
        sampled = f"{row['sampled_pass@1']:.3f} / {row['sampled_pass@k']:.3f}" if row["samples"] else "not run"
        rows.append(
            [
                model_name(row),
                f"{row['trainable_parameters'] or 0:,}",
                f"{row['train_tokens']:,}" if trained else "-",
                f"{row['train_seconds']:.0f} s" if trained else "-",
                f"{row['loss']:.4f}",
                f"{row['completion_pass@1']:.3f}",
                f"{row['chat_pass@1']:.3f}",
                sampled,
            ]
        )
    header = (
        "model | trainable parameters | training tokens | training time | held-out loss"
        " | HumanEval pass@1, completion | pass@1, chat | pass@1 / pass@10, sampled (completion)"
    )
    return markdown(header, ["---"] + ["---:"] * 7, rows)


def scaling_learning_rates() -> str:
    """The base model, then P=1 and P=8 at each learning rate (the runs both directories have)."""
    found = [(row, "-") for row in scaling_rows("scaling") if not row["P"]]
    for directory, rate in SCALING_RUNS.items():
        found += [(row, f"{rate:.0e}".replace("e-0", "e-")) for row in scaling_rows(directory) if row["P"] in (1, 8)]
    rows = [
        [model_name(row), rate, f"{row['loss']:.4f}", f"{row['completion_pass@1']:.3f}", f"{row['chat_pass@1']:.3f}"]
        for row, rate in found
    ]
    header = "model | learning rate | held-out loss | HumanEval pass@1, completion | pass@1, chat"
    return markdown(header, ["---", "---:", "---:", "---:", "---:"], rows)


# ---------------------------------------------------------------------------------------------------------------
# README.md: the quickstart's output (examples/quickstart.py, results/quickstart/)

COMPLETION_LINES = 4  # each completion is cut to its first lines; the README says so


def quickstart(path: str) -> str:
    """A run's standard output as committed, in a text block: the trainer's log lines (`{'loss': ...}`) left out, the
    home directory written `~`, and each completion (the lines after a `--- NAME` line) cut to its first
    `COMPLETION_LINES` lines, `...` marking a cut."""
    lines, in_completion, kept, cut = [], False, 0, False
    for line in (ROOT / path).read_text().splitlines():
        if line.startswith("{'"):
            continue
        line = re.sub(r"(?:/root|/home/[^/\s]+)(?=/)", "~", line)
        if line.startswith(("--- ", "Total time:")):
            lines += ["..."] if cut else []
            in_completion, kept, cut = line.startswith("--- "), 0, False
        elif in_completion:
            kept += 1
            cut = cut or kept > COMPLETION_LINES
            if cut:
                continue
        lines.append(line)
    return "```text\n" + "\n".join(lines).strip("\n") + "\n```\n"


# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md: an experiment's own rendering of its results


def report(path: str) -> str:
    """The tables an experiment's `--report` rendered from its raw results (`results.md`, beside the `results.json`
    whose "table" it is: experiments/humaneval_experiment.py)."""
    rendered = (ROOT / path).read_text()
    recorded = read_json((ROOT / path).with_name("results.json"))["table"] + "\n"
    if rendered != recorded:
        raise ValueError(f"{path} is not the table of its results.json: run the experiment's --report again")
    return rendered


# ---------------------------------------------------------------------------------------------------------------
# README.md: the decision table (experiments/humaneval_experiment.py's results.json and its benchmark records)


def interval(score: dict, digits: int = 3) -> str:
    return f"{score['value']:.{digits}f} [{score['low']:.{digits}f}, {score['high']:.{digits}f}]"


def humaneval_decision(path: str, bench: str) -> str:
    """Per arm, over its seeds: streams per token (the inference compute, in forward passes of the backbone),
    trainable parameters, training speed alone on the GPU (the benchmark's eager record), held-out completion loss
    and greedy HumanEval pass@1 in both modes; the base model first. Arms without a HumanEval score are left out."""
    results = read_json(ROOT / path)
    records = [json.loads(line) for line in (ROOT / bench).read_text().splitlines()]
    device = next((r["device_name"] for r in records if r.get("suite") == "env"), None)
    if device is None:
        raise ValueError(f"{bench} has no environment record to name the device its training speeds come from")
    rows_of = {row["name"]: row for row in results["rows"]}

    def cells(name: str, score_row: dict, streams: str) -> list[str]:
        run = rows_of.get(name) or next(row for key, row in rows_of.items() if key.split("#")[0] == name)
        speed = run.get("train_tokens_per_s")
        return [
            name,
            streams,
            "–" if run["trainable_parameters"] is None else f"{run['trainable_parameters']:,}",
            "–" if speed is None else f"{speed:,.0f}",
            interval(score_row["heldout_loss"]),
            interval(score_row["completion_pass@1"]),
            interval(score_row["chat_pass@1"]),
            str(len(score_row["completion_pass@1"].get("run_values", [None]))),
        ]

    body = [cells("base", rows_of["base"], "1")]
    arms = [arm for arm in results["over_seeds"] if arm.get("completion_pass@1") and arm["kind"] != "base"]
    for arm in sorted(arms, key=lambda arm: (arm["kind"] == "lora", arm["P"] or 1, arm["name"])):
        streams = "1 (merged)" if arm["kind"] == "lora" else str(arm["P"])
        body.append(cells(arm["name"], arm, streams))
    header = (
        f"adapter | streams per token | trainable parameters | training tokens/s ({device}, alone) | "
        "held-out loss | HumanEval pass@1, completion | pass@1, chat | runs"
    )
    return markdown(header, ["---"] + ["---:"] * 7, body)


# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md: where a fresh text-initialised adapter starts (examples/initial_loss.py, results/initial-loss/)


def initial_loss(file: str) -> str:
    """The base model, then each kind of stream text and P: the fresh adapter's validation loss, its difference to the
    base model's, and (texts ending with a boundary) to the same P without one, each ± the standard error of the
    per-window differences (every window has the same length)."""
    results = read_json(RESULTS / "initial-loss" / file)
    per_window, summary = results["per_window"], results["summary"]

    def paired(name: str, reference: str) -> str:
        differences = [a - b for a, b in zip(per_window[name], per_window[reference])]
        mean = sum(differences) / len(differences)
        deviation = (sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)) ** 0.5
        return f"{signed(mean)} ± {deviation / len(differences) ** 0.5:.4f}"

    rows = [["base (no adapter)", "-", f"{summary['base']['loss']:.4f}", "-", "-"]]
    for name in summary:
        if name == "base":
            continue
        kind, P = name.rsplit(" P=", 1)
        versus_window = paired(name, f"window P={P}") if kind != "window" else "-"
        rows.append([kind, P, f"{summary[name]['loss']:.4f}", paired(name, "base"), versus_window])
    header = "stream text | P | validation loss, fresh adapter | minus base | minus `window` (same P)"
    return markdown(header, ["---", "---:", "---:", "---:", "---:"], rows)


# ---------------------------------------------------------------------------------------------------------------
# BENCHMARKS.md: benchmarks/results/results.jsonl (benchmarks.run), one device's records at a time


def benchmark_records(device: str) -> list[dict]:
    """The records of one device, in the order they were written (a later record of the same case replaces an
    earlier one, as in `benchmarks.report`)."""
    records = load_records([str(ROOT / "benchmarks" / "results" / "results.jsonl")])
    # training records name their variant since the suite took the experiment's arms; the earlier ones are P<n>
    return [
        {**record, "variant": training_variant(record)} if record.get("suite") in ("train", "train_masks") else record
        for record in records
        if record.get("device_name") == device
    ]


def last(records: list[dict], **where) -> dict:
    """The last record matching every key=value; KeyError if there is none."""
    matches = [r for r in records if all(r.get(key) == value for key, value in where.items())]
    if not matches:
        raise KeyError(f"no benchmark record with {where}")
    return matches[-1]


def benchmark_targets(device: str) -> str:
    """The issue's targets, each against its comparison from the same run (benchmarks/report.py `TARGETS`)."""
    records = benchmark_records(device)

    def decode(variant: str, mode: str, batch: int = 1) -> dict:
        return last(records, suite="targets", variant=variant, mode=mode, batch=batch)

    def met(value: bool) -> str:
        return "yes" if value else "no"

    rows = []
    latency_goal = TARGETS["latency_ratio"]
    for mode, label in (
        ("eager", "eager `generate`"),
        ("generate_static", '`generate(cache_implementation="static")` (compiled)'),
        ("fast", "fast path (`greedy_generate`)"),
    ):
        p8, p1 = decode("P8", mode)["decode_ms_per_token"], decode("P1", mode)["decode_ms_per_token"]
        rows.append(
            [
                f"decode latency P=8 / P=1, {label}",
                f"{p8:.2f} / {p1:.2f} ms/token = **{p8 / p1:.2f}×**",
                "",
                f"≤ {latency_goal}×",
                met(p8 / p1 <= latency_goal),
            ]
        )
    fast = decode("P8", "fast")["decode_ms_per_token"]
    stock_static = decode("stock", "generate_static", 8)["decode_ms_per_token"]
    stock_fast = decode("stock", "fast", 8)["decode_ms_per_token"]
    rows.append(
        [
            "fast path P=8, batch 1",
            f"**{fast:.2f} ms/token**",
            (
                f"stock transformers, batch 8, static cache + compile: {stock_static:.2f} ms/token → "
                f"**{fast / stock_static:.2f}×**"
            ),
            f"< {TARGETS['fast_ms_per_token']:g} ms, faster than stock",
            met(fast < TARGETS["fast_ms_per_token"] and fast < stock_static),
        ]
    )
    rows.append(
        [
            "",
            "",
            f"stock batch 8 through the same fast path: {stock_fast:.2f} ms/token → {fast / stock_fast:.2f}×",
            "(not a target)",
            "–",
        ]
    )
    memory_goal = TARGETS["memory_ratio"]
    for mode, label in (("eager", "eager `generate`"), ("fast", "fast path")):
        p8, p1 = decode("P8", mode)["peak_mem_gib"], decode("P1", mode)["peak_mem_gib"]
        rows.append(
            [
                f"peak memory P=8 / P=1, {label}",
                f"{p8:.3f} / {p1:.3f} GiB = **{p8 / p1:.2f}×**",
                "",
                f"≤ {memory_goal}×",
                met(p8 / p1 <= memory_goal),
            ]
        )
    compiled = last(records, suite="train", shape="1.5b", variant="P8", compile="layers", gradient_checkpointing=False)
    eager = last(records, suite="train", shape="1.5b", variant="P8", compile="none", gradient_checkpointing=False)
    goal, authors = TARGETS["train_tokens_per_s"], AUTHORS_TRAINING[8]
    rows.append(
        [
            "adapter training, P=8, seq 2048, 1.5B",
            f"**{compiled['tokens_per_s']:,.0f} tokens/s**, MFU {100 * compiled['mfu']:.0f}%",
            (
                f"same code uncompiled: {eager['tokens_per_s']:,.0f} tokens/s → "
                f"{compiled['tokens_per_s'] / eager['tokens_per_s']:.2f}×"
            ),
            f"≥ {goal:,.0f} (1.3 × {authors:,})",
            (
                f"{met(compiled['tokens_per_s'] >= goal)} ({compiled['tokens_per_s'] / goal:.2f}× the target; "
                f"{compiled['tokens_per_s'] / authors:.2f}× the authors' {authors:,}, a figure from the issue, not this "
                "run)"
            ),
        ]
    )
    equality = last(records, suite="equality", variant="P8", mode="fast")
    same = equality["tokens_vs_eager"]["equal"]
    count = equality["new_tokens"]
    rows.append(
        [
            f"greedy tokens, fast path = eager, {equality['dtype']} (P=8)",
            f"**{count} of {count} identical**" if same else "differ",
            "",
            "identical",
            met(same),
        ]
    )
    first = {
        v: decode(v, "fast")["tokens_vs_eager"]["first_difference"] - decode(v, "fast")["prompt"] for v in ("P1", "P8")
    }
    compiled_same = all(
        decode(v, "generate_static")["tokens_vs_eager"]["first_difference"]
        == decode(v, "fast")["tokens_vs_eager"]["first_difference"]
        for v in ("P1", "P8")
    )
    rows.append(
        [
            "greedy tokens, fast path = eager, bfloat16",
            f"differ from new token {first['P1']} (P=1), {first['P8']} (P=8)",
            "transformers' own compiled `generate` differs from eager at the same token" if compiled_same else "",
            "identical",
            "no (see below)",
        ]
    )
    return markdown("target | measured | comparison, same run | goal | met", ["---"] * 5, rows)


def benchmark_scaling(device: str) -> str:
    """`benchmarks.report.scaling_comparison` of one device's decode records, the paper's comparison point (batch 1,
    64+64 tokens, P=8) in bold."""
    rows = []
    for c in scaling_comparison(benchmark_records(device)):
        point = (c["batch"], c["lengths"], c["P"]) == (1, "64+64", 8)
        bold = (lambda text: f"**{text}**") if point else (lambda text: text)
        lengths = "mean of the two" if c["lengths"].startswith("mean") else c["lengths"]
        rows.append(
            [
                c["shape"].upper(),
                str(c["batch"]),
                lengths,
                str(c["P"]),
                f"{c['peak_mem_gib_parscale_increase']:.2f} GiB",
                f"{c['peak_mem_gib_dense_increase']:.2f} GiB",
                bold(f"{c['peak_mem_gib_times_less']:.1f}×"),
                f"{c['total_ms_parscale_increase']:,.1f} ms",
                f"{c['total_ms_dense_increase']:,.1f} ms",
                bold(f"{c['total_ms_times_less']:.1f}×"),
            ]
        )
    rows.sort(key=lambda row: (row[0] != "1.5B", row[1], row[2] != "64+64", row[2].startswith("mean"), int(row[3])))
    header = (
        "shape | batch | prompt+new | P | ParScale: +memory | dense, equal loss: +memory"
        " | × less memory increase | ParScale: +latency | dense: +latency | × less latency increase"
    )
    return markdown(header, ["---"] * 10, rows)


def benchmark_sampling(device: str) -> str:
    """HumanEval's sampling workload (benchmarks/sampling.py): completions per second of each mode, by P, and the
    first call's time of the compiled fast path (its compilation)."""
    found = {(r["P"], r["mode"]): r for r in benchmark_records(device) if r.get("suite") == "sampling"}
    modes = ("generate", "fast_uncompiled", "fast")
    rows = []
    for P in sorted({P for P, _ in found}):
        rates = [f"{found[P, mode]['completions_per_s']:.3g}" if (P, mode) in found else "–" for mode in modes]
        rates[-1] = f"**{rates[-1]}**"
        compiled = found.get((P, "fast"))
        rows.append([str(P), *rates, f"{compiled['warmup_s']:.1f} s" if compiled else "–"])
    header = "P | `generate` | fast path, step uncompiled | fast path, compiled | compilation (first call)"
    return markdown(header, ["---", "---:", "---:", "---:", "---:"], rows)


def training_records(device: str) -> dict[tuple, dict]:
    """(shape, P, compile) -> the latest plain training record (sequence 2048, no gradient checkpointing) of ParScale
    at its default prefix length."""
    found = {}
    for r in benchmark_records(device):
        plain = r.get("suite") == "train" and not r["gradient_checkpointing"] and r["length"] == 2048
        if plain and r["variant"] == f"P{r['P']}":
            found[r["shape"], r["P"], r.get("compile", "none")] = r
    return found


def benchmark_training(device: str) -> str:
    found = training_records(device)
    rows = []
    for shape in ("1.5b", "0.5b"):
        for P in sorted({key[1] for key in found if key[0] == shape}):
            eager, compiled = found.get((shape, P, "none")), found.get((shape, P, "layers"))
            if not (eager and compiled):
                continue
            authors = AUTHORS_TRAINING.get(P, "") if shape == "1.5b" else ""
            rows.append(
                [
                    shape.upper(),
                    str(P),
                    f"{eager['tokens_per_s']:,.0f}, {100 * eager['mfu']:.0f} %",
                    f"**{compiled['tokens_per_s']:,.0f}**, {100 * compiled['mfu']:.0f} %",
                    f"{compiled['tokens_per_s'] / eager['tokens_per_s']:.2f}×",
                    f"{authors:,}" if authors else "",
                ]
            )
    header = (
        "shape | P | eager (tokens/s, MFU) | decoder layers compiled (tokens/s, MFU) | speed-up"
        " | authors' code (issue 5)"
    )
    return markdown(header, ["---"] * 6, rows)


def benchmark_training_changes(device: str) -> str:
    """The changes to adapter training at P=8 (1.5B shape), each against the measurement before it in its run."""
    records = benchmark_records(device)
    common = {"shape": "1.5b", "variant": "P8", "length": 2048}
    before = last(records, suite="train_masks", mask="materialised", **common)
    bias = last(records, suite="train_masks", mask="lower_right", **common)
    checkpointed = last(records, suite="train", gradient_checkpointing=True, **common)

    def compiled(mode: str) -> tuple[dict, dict]:
        """A compiled measurement and the eager one of the same run."""
        record = last(records, suite="train", compile=mode, gradient_checkpointing=False, **common)
        run = record["run"]
        eager = last(records, suite="train", compile="none", gradient_checkpointing=False, run=run, **common)
        return record, eager

    def gain(record: dict, reference: dict) -> str:
        return f"{100 * (record['tokens_per_s'] / reference['tokens_per_s'] - 1):+.0f} %"

    blocks, blocks_eager = compiled("blocks")
    whole, _ = compiled("model")
    layers, layers_eager = compiled("layers")
    rows = [
        [
            "before: explicit boolean (q, T + q) training mask in every layer (sdpa's memory-efficient kernel)",
            f"{before['tokens_per_s']:,.0f}",
            f"run {before['run']}",
        ],
        [
            "the mask as a lower-right causal bias (`causal_lower_right`), so sdpa keeps its flash kernel",
            f"{bias['tokens_per_s']:,.0f} ({gain(bias, before)})",
            f"run {bias['run']}",
        ],
        [
            "compile each layer's norms and MLP (`blocks`)",
            f"{blocks['tokens_per_s']:,.0f} ({gain(blocks, blocks_eager)} over {blocks_eager['tokens_per_s']:,.0f})",
            f"run {blocks['run']}",
        ],
        [
            "`torch.compile` of the whole model (transformers then materialises the mask: no flash kernel)",
            f"{whole['tokens_per_s']:,.0f} ({gain(whole, blocks_eager)}); first step {whole['first_step_s']:.0f} s",
            f"run {whole['run']}",
        ],
        [
            "compile each whole decoder layer (`layers`), with the bias built outside the compiled layers",
            f"**{layers['tokens_per_s']:,.0f} ({gain(layers, layers_eager)} over {layers_eager['tokens_per_s']:,.0f})**",
            f"run {layers['run']}",
        ],
        [
            "eager with gradient checkpointing (for comparison)",
            (
                f"{checkpointed['tokens_per_s']:,.0f}, {checkpointed['peak_mem_gib']:.1f} GiB peak instead of "
                f"{bias['peak_mem_gib']:.1f}"
            ),
            f"run {checkpointed['run']}",
        ],
    ]
    return markdown("change | tokens/s | ", ["---"] * 3, rows)


# ---------------------------------------------------------------------------------------------------------------

TABLES: dict[str, Callable[..., str]] = {
    "support": lambda: support_table.render(support_table.load_runs()),
    "stream-sweep": stream_sweep,
    "stream-sweep-curves": stream_sweep_curves,
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
    "benchmark-training": benchmark_training,
    "benchmark-training-changes": benchmark_training_changes,
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
