"""The tables of RESULTS.md and README.md rendered from the experiments' raw results under `results/` (see
`doc_tables.py`, which fills them into the documents)."""

from __future__ import annotations

import json
import pathlib
import re

from table_format import RESULTS, ROOT, markdown, read_json, signed

from benchmarks.shapes import shape_config
from benchmarks.training import H100_SXM_BF16_DENSE_TFLOPS, training_flops

# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md: the stream sweep (experiments/stream_sweep.py, results/stream-sweep/)

SWEEP = RESULTS / "stream-sweep"


def sweep_runs(directory: pathlib.Path) -> list[dict]:
    """The sweep's arms in `directory`, ParScale by P and prefix length, then LoRA: every run named after its arm
    alone (P1, P8, P1T192, lora@6e-4, ...; not a variant named with --tag, such as P8-1gpu), each with its held-out
    curve [(tokens, loss)], training tokens, the steady tokens/s of each segment that ran alone on the run's last
    device, a label (``P=8`` for the sweep's P<n>, else the arm's name), and, for a run stopped before its end, the
    step it stopped at."""
    runs = []
    for path in sorted(directory.glob("*/result.json")):
        result = read_json(path)
        arm = result.get("arm", f"P{result['P']}")  # results written before the sweep named other arms are P<n>
        if arm == "base" or result["name"] != arm:
            continue  # the base model is a row of its own; P8-1gpu, P8-fp32-*: the same run's speed and parity
        tokens_per_step = result["train_tokens"] // result["steps"]
        # A segment trained side by side with other runs has no speed of its own, nor one on another kind of GPU
        # than the run's last, nor one too short for a median (`sweep_results.steady_tokens_per_s`; segments
        # without a device count as on it).
        result["segment_tokens_per_s"] = [
            tokens_per_step / s["steady_step_s"]
            for s in result["segments"]
            if s.get("gpu_shared_by", 1) == 1
            and s.get("device", result.get("device")) == result.get("device")
            and s["steady_step_s"] is not None
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
    """The sweep's final held-out losses (`sweep_runs` of results/PATH) against the base model's, with throughput: a
    run that shared the GPU in every segment has none of its own ("shared by 3"); where the runs' speeds come from
    different kinds of GPU, each names its own. Until the base model has been scored (a sweep in progress) its row is
    left out and so is the difference."""
    directory = RESULTS / path
    runs = sweep_runs(directory)
    base_result = directory / "base" / "result.json"
    base = read_json(base_result)["heldout_loss"] if base_result.is_file() else None
    rows = [] if base is None else [["base (no adapter)", "-", "-", f"{base:.4f}", "-", "-"]]
    processes = {run["processes"] for run in runs if "processes" in run}
    # where the runs' speeds come from different kinds of GPU (each recorded), each speed names its own
    timed_on = {run.get("device") for run in runs if run.get("segment_tokens_per_s")}
    name_devices = len(timed_on) > 1 and None not in timed_on
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
        shared = max(segment.get("gpu_shared_by", 1) for segment in run["segments"])
        speed = tokens_per_s(run["segment_tokens_per_s"])
        speed = (f"{speed} ({run['device']})" if name_devices else speed) if speed else f"shared by {shared}"
        rows.append(
            [
                run["label"],
                f"{run['train_tokens']:,}",
                f"{curve[0][1]:.4f}",
                f"{final:.4f}",
                "-" if base is None else signed(final - base),
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


def stream_sweep_report(path: str, table: str) -> str:
    """A table the sweep's ``--report`` rendered into results/PATH/report.json from the runs' raw results: the
    learning-rate grids (``grid_table``) or the paired comparisons over held-out windows (``paired_table``), whose
    bootstrap is the experiment's own (`experiments/window_losses.py`)."""
    if table not in ("grid_table", "paired_table"):
        raise ValueError(f"{table!r}: the sweep's report tables are grid_table and paired_table")
    return read_json(RESULTS / path / "report.json")[table] + "\n"


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
        mfu = [
            flops / (tokens_per_step / rate) / result["processes"] / (H100_SXM_BF16_DENSE_TFLOPS * 1e12)
            for rate in rates
        ]
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
    trainable parameters, training speed alone on the GPU (the benchmark's eager record), decode latency at batch 1
    and 8 (the benchmarks' decode sweep, as the report's cost columns take it, with the ratio to the base model where
    both were measured in one call; the base model's, and a merged LoRA's, from its lowest to its highest over those
    calls), held-out completion loss,
    greedy HumanEval pass@1 in both modes and sampled pass@1 and pass@10; the base model first. Arms without a
    HumanEval score are left out. Where only one of an arm's trainings was sampled, the sampled cells are that
    training's, marked with its seed (``#4``): their intervals cover the problems, not the seeds."""
    results = read_json(ROOT / path)
    records = [json.loads(line) for line in (ROOT / bench).read_text().splitlines()]
    device = next((r["device_name"] for r in records if r.get("suite") == "env"), None)
    if device is None:
        raise ValueError(f"{bench} has no environment record to name the device its training speeds come from")
    rows_of = {row["name"]: row for row in results["rows"]}

    def runs_of(name: str) -> list[str]:  # an arm's trainings: its name, then ``#<seed>``
        return [key for key in rows_of if key.split("#")[0] == name]

    def sampled(name: str, score_row: dict, metric: str) -> str:
        if score_row.get(metric):
            return interval(score_row[metric])
        sampled_runs = [key for key in runs_of(name) if rows_of[key].get(metric)]
        if len(sampled_runs) != 1:
            return "–"
        seed = sampled_runs[0].partition("#")[2] or "0"
        return f"{interval(rows_of[sampled_runs[0]][metric])} (#{seed})"

    def decode(run: dict) -> str:  # ms/token, and × the base model where it was measured in the same call
        cells = []
        for batch in (1, 8):
            latency, vs_base = run.get(f"decode_ms_per_token_b{batch}"), run.get(f"decode_vs_base_b{batch}")
            spread = run.get(f"decode_ms_spread_b{batch}")  # the base model's, over the calls
            ratio = f" ({vs_base:.2f}×)" if vs_base is not None else ""
            if latency is None:
                cells.append("–")
            elif spread is not None and f"{spread[0]:.2f}" != f"{spread[1]:.2f}":
                cells.append(f"{spread[0]:.2f}–{spread[1]:.2f}")
            else:
                cells.append(f"{latency:.2f}{ratio}")
        return "–" if cells == ["–", "–"] else " / ".join(cells)

    def cells(name: str, score_row: dict, streams: str) -> list[str]:
        run = rows_of.get(name) or rows_of[runs_of(name)[0]]
        speed = run.get("train_tokens_per_s")
        return [
            name,
            streams,
            "–" if run["trainable_parameters"] is None else f"{run['trainable_parameters']:,}",
            "–" if speed is None else f"{speed:,.0f}",
            decode(run),
            interval(score_row["heldout_loss"]),
            interval(score_row["completion_pass@1"]),
            interval(score_row["chat_pass@1"]),
            sampled(name, score_row, "sampled_pass@1"),
            sampled(name, score_row, "sampled_pass@10"),
            str(len(score_row["completion_pass@1"].get("run_values", [None]))),
        ]

    body = [cells("base", rows_of["base"], "1")]
    arms = [arm for arm in results["over_seeds"] if arm.get("completion_pass@1") and arm["kind"] != "base"]
    for arm in sorted(arms, key=lambda arm: (arm["kind"] == "lora", arm["P"] or 1, arm["name"])):
        streams = "1 (merged)" if arm["kind"] == "lora" else str(arm["P"])
        body.append(cells(arm["name"], arm, streams))
    header = (
        f"adapter | streams per token | trainable parameters | training tokens/s ({device}, alone) | "
        "decode ms/token, batch 1 / 8 (× base model in the same call) | held-out loss | "
        "HumanEval pass@1, completion | pass@1, chat | pass@1, sampled | pass@10, sampled | runs"
    )
    return markdown(header, ["---"] + ["---:"] * 10, body)


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
