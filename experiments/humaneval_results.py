"""What the HumanEval experiment's output folder holds, and the tables made from it.

Every arm has a folder named after it (`arms.parse_arm`: ``base``, ``P<n>``, ``P<n>T<t>``, ``lora``, with ``+div<λ>``
and ``@<rate>``) holding ``train.json`` and one JSON file per evaluation phase (`result_path`; ``greedy`` and
``sampled``, which keep every sample with its verdict, gzip-compressed). `report` reads
them all and writes ``results.json`` (per-metric values, 95% bootstrap intervals and the paired comparisons; for an
arm trained with several seeds, ``#<seed>``, also its mean over them), ``results.md`` (the tables RESULTS.md shows)
and ``pass_at_k.png``. Decode and training cost come from the benchmarks' records at the model's shape
(``python -m benchmarks.run --suites sweep,train ...``, its ``results.jsonl``): they depend on the kind of adapter,
the number of streams and the prefix length, not on trained weights. A merged LoRA decodes as the base model does.
An arm's training speed is the training suite's (the arm alone on the GPU, random tokens, eager) where the records
have its variant, marked "(b)"; else its own training's, where it trained alone on the GPU.

    report(Path("he"), ["P8:P1", "P8:base"], data=Path(".he-data"), benchmark_results=Path("he/bench/results.jsonl"))
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
from arms import ARM_NAME, Arm, parse_arm, seedless
from common import plot_against_streams, pyplot

from peft_parscale.humaneval import problem_pass_at_k
from peft_parscale.stats import (
    NUM_RESAMPLES,
    bootstrap_interval,
    mcnemar_exact,
    paired_bootstrap_pvalue,
    seed_and_problem_bootstrap,
)

EVAL_PHASES = ("greedy", "sampled", "loss")
# Their files hold every generated sample (a megabyte per sampled run as plain JSON): stored compressed, about ten
# times smaller, so that the results of many runs stay small in the repository and in each call to the GPU machine.
SAMPLE_PHASES = ("greedy", "sampled")


def result_path(model_dir: Path, phase: str) -> Path:
    """The file of one phase's result: ``<phase>.json.gz`` for the phases that keep every sample, else
    ``<phase>.json``."""
    return model_dir / (f"{phase}.json.gz" if phase in SAMPLE_PHASES else f"{phase}.json")


def write_result(path: Path, result: dict) -> None:
    """Write ``result`` whole or not at all (gzip-compressed where the name ends in .gz): a rerun skips a phase whose
    file exists, and a process stopped at the deadline (`side_by_side`) must not leave half a file behind."""
    text = json.dumps(result, indent=1).encode()
    partial = path.with_name(path.name + ".partial")
    # mtime=0: the same result gives the same bytes, so rewriting a file does not change it in git
    partial.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)
    partial.replace(path)


def read_result(path: Path) -> dict:
    """A result written by `write_result`."""
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


# The benchmarks' shape of the experiment's model, Qwen2.5-Coder-0.5B-Instruct (benchmarks/shapes.py), and its training
# windows: the records of other shapes and lengths in a results.jsonl are not this experiment's costs
BENCHMARK_SHAPE, TRAINING_LENGTH = "0.5b", 2048
# (metric, label, paired test): every metric is a mean over problems (the loss: over held-out pairs, per token)
METRICS = (
    ("completion_pass@1", "pass@1, completion (greedy)", "mcnemar"),
    ("chat_pass@1", "pass@1, chat (greedy)", "mcnemar"),
    ("sampled_pass@1", "pass@1, sampled", "bootstrap"),
    ("sampled_pass@10", "pass@10, sampled", "bootstrap"),
    ("heldout_loss", "held-out completion loss", "bootstrap"),
    ("validation_loss", "validation completion loss", "bootstrap"),
)


def per_problem_scores(model_dir: Path) -> dict[str, dict]:
    """Each metric's per-problem values (and weights, for the loss) from a model's result files, where they exist."""
    scores = {}
    greedy_file, sampled_file = (result_path(model_dir, phase) for phase in SAMPLE_PHASES)
    if greedy_file.is_file():
        greedy = read_result(greedy_file)
        for mode in ("completion", "chat"):
            passed = [float(sample["passed"]) for sample in greedy[mode]["samples"]]  # one greedy sample per problem
            scores[f"{mode}_pass@1"] = {"values": passed}
    if sampled_file.is_file():
        sampled = read_result(sampled_file)["completion"]
        n = sampled["num_samples"]
        correct = [
            sum(s["passed"] for s in sampled["samples"][i : i + n]) for i in range(0, len(sampled["samples"]), n)
        ]
        for k in (1, 10):
            if k <= n:
                scores[f"sampled_pass@{k}"] = {"values": problem_pass_at_k(correct, n, k).tolist(), "samples": n}
    for phase, metric in (("loss", "heldout_loss"), ("val", "validation_loss")):
        loss_file = result_path(model_dir, phase)
        if loss_file.is_file():
            loss = read_result(loss_file)
            per_token = [nll / tokens for nll, tokens in zip(loss["nll"], loss["scored_tokens"])]
            scores[metric] = {"values": per_token, "weights": loss["scored_tokens"]}
    return scores


def summarise(scores: dict) -> dict:
    """The metric's value and its 95% bootstrap interval."""
    low, high = bootstrap_interval(scores["values"], scores.get("weights"))
    return {"value": float(np.average(scores["values"], weights=scores.get("weights"))), "low": low, "high": high}


def compare(first: dict, second: dict, test: str) -> dict:
    """Paired comparison of two models on one metric: the difference (first - second), its 95% bootstrap interval and
    p-values."""
    a, b, weights = np.asarray(first["values"]), np.asarray(second["values"]), first.get("weights")
    if weights != second.get("weights"):
        raise ValueError("paired loss comparisons need the same held-out pairs and tokenizer for both models")
    difference = a - b
    low, high = bootstrap_interval(difference, weights)
    result = {
        "difference": float(np.average(difference, weights=weights)),
        "low": low,
        "high": high,
        "bootstrap_pvalue": paired_bootstrap_pvalue(a, b, weights),
    }
    if test == "mcnemar":
        result["mcnemar"] = mcnemar_exact(a > 0.5, b > 0.5)
    return result


def runs_of(side: str, metric: str, scores: dict[str, dict]) -> list[str]:
    """The runs with `metric` that one side of a comparison stands for: the run named, or for an arm named without a
    ``#<seed>``, every run of it (``P8`` is ``P8``, ``P8#1``, ``P8#2`` ...)."""
    if "#" in side:
        return [side] if metric in scores.get(side, {}) else []
    return [name for name in scores if seedless(name) == side and metric in scores[name]]


def compare_over_seeds(first_runs: list[dict], second_runs: list[dict]) -> dict:
    """Comparison of two arms trained with several seeds: the difference of their seed-averaged scores, its interval
    and p-value resampling seeds and problems (`seed_and_problem_bootstrap`), and the spread of the per-run scores."""
    weights = first_runs[0].get("weights")
    if any(run.get("weights") != weights for run in first_runs + second_runs):
        raise ValueError("paired loss comparisons need the same held-out pairs and tokenizer for every run")
    result = seed_and_problem_bootstrap(
        [run["values"] for run in first_runs], [run["values"] for run in second_runs], weights
    )
    means = [[float(np.average(run["values"], weights=weights)) for run in runs] for runs in (first_runs, second_runs)]
    return {**result, "run_means": means}


def summarise_over_seeds(runs: list[dict]) -> dict:
    """One arm's metric averaged over its runs (one per seed), with the 95% interval that resamples runs and problems:
    `seed_and_problem_bootstrap` against a model scoring 0 everywhere, whose difference is the arm's own mean."""
    zeros = {"values": [0.0] * len(runs[0]["values"]), "weights": runs[0].get("weights")}
    result = compare_over_seeds(runs, [zeros])
    return {
        "value": result["difference"],
        "low": result["low"],
        "high": result["high"],
        "run_values": result["run_means"][0],
    }


def mcnemar_by_seed(first_runs: dict[str, dict], second_runs: dict[str, dict]) -> list[dict]:
    """McNemar's test of greedy pass/fail, one per seed, for arms trained with several seeds (`runs_of`'s names to
    their scores). Runs of the two sides with the same seed are paired: they saw the training data in the same order.
    The base model, which is not trained, is paired with every run of the other side. Seeds only one side has are
    left out. The combined test over the seeds is the bootstrap's p-value beside it, which resamples seeds as well."""
    seeds = [{parse_arm(name).seed: scores for name, scores in runs.items()} for runs in (first_runs, second_runs)]
    for side, runs in enumerate((first_runs, second_runs)):
        if all(parse_arm(name).kind == "base" for name in runs):
            (only,) = seeds[side].values()
            seeds[side] = dict.fromkeys(seeds[1 - side], only)
    return [
        {"seed": seed, **mcnemar_exact(np.asarray(a["values"]) > 0.5, np.asarray(seeds[1][seed]["values"]) > 0.5)}
        for seed, a in sorted(seeds[0].items())
        if seed in seeds[1]
    ]


def decode_costs(results: Path) -> dict[tuple[str, int], tuple[float, float | None]]:
    """Per (benchmark variant, batch size) in a benchmarks ``results.jsonl``: the fast path's ms/token, and its ratio to
    the base model's (variant ``stock``) measured in the same call at the same batch and lengths, or None. A call is
    the benchmark's invocation (``invocation``, which its records carry); records from before they did are grouped by
    their run label (``run``), which may span several calls (the latest base model under the label is taken).
    Times from different calls differ by more than the streams cost (BENCHMARKS.md, run S), so arms measured in
    different calls compare only as ratios to their own call's base model. For each case the record given is the
    latest of those with a base model beside them, the longest generation first; without one, the latest of the
    longest generation, with no ratio."""
    fast = fast_decode_records(results)

    def same_call(record: dict) -> tuple[str | None, int, int | None, int]:
        call = record.get("invocation") or record.get("run")
        return call, record["batch"], record.get("prompt"), record["new_tokens"]

    base = {same_call(record): record["decode_ms_per_token"] for record in fast if record["variant"] == "stock"}

    def vs_base(record: dict) -> float | None:
        call = same_call(record)
        anchor = base.get(call) if call[0] and record["variant"] != "stock" else None
        return record["decode_ms_per_token"] / anchor if anchor else None

    chosen: dict[tuple[str, int], tuple[tuple[bool, int, int], float, float | None]] = {}
    for index, record in enumerate(fast):
        case, ratio = (record["variant"], record["batch"]), vs_base(record)
        rank = (ratio is not None, record["new_tokens"], index)
        if case not in chosen or rank > chosen[case][0]:
            chosen[case] = (rank, record["decode_ms_per_token"], ratio)
    return {case: (ms_per_token, ratio) for case, (_, ms_per_token, ratio) in chosen.items()}


def fast_decode_records(results: Path) -> list[dict]:
    """The fast path's decode records at the experiment's shape in a benchmarks ``results.jsonl``, in file order."""
    records = (json.loads(line) for line in results.read_text().splitlines())
    return [
        record
        for record in records
        if record.get("suite") == "decode"
        and record.get("mode") == "fast"
        and "decode_ms_per_token" in record
        and record.get("shape") == BENCHMARK_SHAPE
    ]


def base_decode_spread(results: Path) -> dict[int, tuple[float, float]]:
    """Per batch size, the lowest and highest ms/token of the base model (variant ``stock``) over its records of the
    longest generation. Every arm's ratio is to its own call's base model, so the base model's row gives the spread
    over those calls rather than one call's time."""
    times: dict[int, dict[int, list[float]]] = {}
    for record in fast_decode_records(results):
        if record["variant"] == "stock":
            by_length = times.setdefault(record["batch"], {})
            by_length.setdefault(record["new_tokens"], []).append(record["decode_ms_per_token"])
    longest = {batch: by_length[max(by_length)] for batch, by_length in times.items()}
    return {batch: (min(found), max(found)) for batch, found in longest.items()}


def training_speeds(results: Path) -> dict[str, float]:
    """tokens/s of eager adapter training per benchmark training variant in a benchmarks ``results.jsonl``, at the
    experiment's shape and window length (the latest record of each)."""
    speeds = {}
    for line in results.read_text().splitlines():
        record = json.loads(line)
        case = (record.get("suite"), record.get("shape"), record.get("length"), record.get("compile", "none"))
        plain = not record.get("gradient_checkpointing") and record.get("mask") == "lower_right"
        if case == ("train", BENCHMARK_SHAPE, TRAINING_LENGTH, "none") and plain:
            # records made before the training suite took variants are P<n>
            speeds[record["variant"] if "variant" in record else f"P{record['P']}"] = record["tokens_per_s"]
    return speeds


def training_variant(arm: Arm, default_prefix_length: int) -> str | None:
    """The benchmark training variant that trains as an arm does; None for the base model and for an arm with a
    stream-diversity term, whose extra loss the benchmark does not compute."""
    if arm.kind == "lora":
        return "lora"
    if arm.kind == "base" or arm.diversity_weight is not None:
        return None
    return decode_variant(arm, default_prefix_length)


def decode_variant(arm: Arm, default_prefix_length: int) -> str:
    """The benchmark variant that decodes as an arm does: ``stock`` for the base model and a merged LoRA."""
    if arm.kind != "parscale":
        return "stock"
    prefix_length = arm.prefix_length or default_prefix_length
    return f"P{arm.P}" if prefix_length == default_prefix_length else f"P{arm.P}T{prefix_length}"


def report(
    output: Path,
    compare_pairs: list[str],
    data: Path,
    benchmark_results: Path | None = None,
    default_prefix_length: int = 48,
) -> dict:
    """Gather every arm's results under `output` into results.json and results.md (tables) and pass_at_k.png (where
    matplotlib is installed); `compare_pairs` are ``A:B`` arm names; `benchmark_results` is a benchmarks
    results.jsonl (see the module docstring) whose variants use `default_prefix_length` as ``P<n>``'s prefix
    length."""
    names = sorted(
        (path.name for path in output.iterdir() if path.is_dir() and ARM_NAME.fullmatch(path.name)),
        key=lambda name: (["base", "parscale", "lora"].index(parse_arm(name).kind), parse_arm(name).P or 0, name),
    )
    scores = {name: per_problem_scores(output / name) for name in names}
    decode = decode_costs(benchmark_results) if benchmark_results is not None else {}
    base_spread = base_decode_spread(benchmark_results) if benchmark_results is not None else {}
    speeds = training_speeds(benchmark_results) if benchmark_results is not None else {}
    rows = []
    for name in names:
        train_file = output / name / "train.json"
        training = json.loads(train_file.read_text()) if train_file.is_file() else {}
        metrics = {metric: summarise(values) for metric, values in scores[name].items()}
        cost = {key: training.get(key) for key in ("learning_rate", "trainable_parameters", "adapter_bytes")}
        arm = parse_arm(name)
        trained_as = training_variant(arm, default_prefix_length)
        cost["train_tokens_per_s_benchmarked"] = trained_as in speeds
        if trained_as in speeds:
            cost["train_tokens_per_s"] = speeds[trained_as]
        # a training side by side with others on one GPU has no speed of its own to report
        elif training and training.get("gpu_shared_by", 1) == 1:
            cost["train_tokens_per_s"] = training["train_tokens"] / training["train_seconds"]
        decoded_as = decode_variant(arm, default_prefix_length)
        for batch in (1, 8):
            ms_per_token, vs_base = decode.get((decoded_as, batch), (None, None))
            cost[f"decode_ms_per_token_b{batch}"], cost[f"decode_vs_base_b{batch}"] = ms_per_token, vs_base
            if decoded_as == "stock" and batch in base_spread:
                cost[f"decode_ms_spread_b{batch}"] = base_spread[batch]
        rows.append({"name": name, **vars(arm), "train_tokens": training.get("train_tokens"), **cost, **metrics})
    over_seeds = []  # one row per arm trained with several seeds, each metric averaged over the runs that have it
    for arm_name in dict.fromkeys(seedless(name) for name in names):
        runs = [name for name in names if seedless(name) == arm_name]
        metrics = {
            metric: summarise_over_seeds([scores[n][metric] for n in runs if metric in scores[n]])
            for metric, _, _ in METRICS
            if sum(metric in scores[n] for n in runs) >= 2
        }
        if metrics:
            over_seeds.append({"name": arm_name, **vars(parse_arm(arm_name)), **metrics})
    comparisons = []
    for pair in compare_pairs:
        first, _, second = pair.partition(":")
        for metric, _, test in METRICS:
            runs = [runs_of(side, metric, scores) for side in (first, second)]
            if not all(runs):
                continue
            if len(runs[0]) == len(runs[1]) == 1:
                result = compare(scores[runs[0][0]][metric], scores[runs[1][0]][metric], test)
            else:
                result = compare_over_seeds([scores[n][metric] for n in runs[0]], [scores[n][metric] for n in runs[1]])
                if test == "mcnemar":
                    result["mcnemar_by_seed"] = mcnemar_by_seed(
                        *({n: scores[n][metric] for n in side_runs} for side_runs in runs)
                    )
            counts = {"runs": [len(runs[0]), len(runs[1])]}
            comparisons.append({"first": first, "second": second, "metric": metric, **counts, **result})
    summary = {"rows": rows, "over_seeds": over_seeds, "comparisons": comparisons}
    if (data / "stats.json").is_file():
        summary["data"] = json.loads((data / "stats.json").read_text())["stats"]
    summary["table"] = markdown(rows, over_seeds, comparisons)
    (output / "results.json").write_text(json.dumps(summary, indent=1))
    (output / "results.md").write_text(summary["table"] + "\n")
    plot(rows, over_seeds, output / "pass_at_k.png")
    return summary


def interval_cell(summary: dict) -> str:
    return f"{summary['value']:.3f} [{summary['low']:.3f}, {summary['high']:.3f}]"


def decode_cell(row: dict, batch: int) -> str:
    """ms/token at `batch`, with its ratio to the base model measured in the same call where there is one; for the
    base model (and a merged LoRA), the lowest to highest over the calls that measured it, where they differ."""
    ms_per_token, vs_base = row.get(f"decode_ms_per_token_b{batch}"), row.get(f"decode_vs_base_b{batch}")
    spread = row.get(f"decode_ms_spread_b{batch}")
    if ms_per_token is None:
        return "-"
    if spread is not None and f"{spread[0]:.2f}" != f"{spread[1]:.2f}":
        return f"{spread[0]:.2f}–{spread[1]:.2f}"
    return f"{ms_per_token:.2f}" + (f" ({vs_base:.2f}×)" if vs_base is not None else "")


def markdown(rows: list[dict], over_seeds: list[dict], comparisons: list[dict]) -> str:
    """The table of every run, of every arm over its seeds (where one has several), and of the comparisons."""
    labels = {metric: label for metric, label, _ in METRICS}
    lines = [
        "| model | learning rate | trainable parameters | adapter MB | training tokens | tokens/s | "
        + "decode ms/token, batch 1 (× base, same call) | decode ms/token, batch 8 (× base, same call) | "
        + " | ".join(labels.values())
        + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in METRICS) + " |",
    ]
    for row in rows:
        cells = [interval_cell(row[metric]) if metric in row else "-" for metric in labels]
        cost = [
            f"{row['learning_rate']:g}" if row.get("learning_rate") else "-",
            f"{row['trainable_parameters']:,}" if row.get("trainable_parameters") else "-",
            f"{row['adapter_bytes'] / 1e6:.1f}" if row.get("adapter_bytes") else "-",
            f"{row['train_tokens']:,}" if row.get("train_tokens") else "-",
            f"{row['train_tokens_per_s']:,.0f}" + (" (b)" if row.get("train_tokens_per_s_benchmarked") else "")
            if row.get("train_tokens_per_s")
            else "-",
            *(decode_cell(row, batch) for batch in (1, 8)),
        ]
        lines.append(f"| {row['name']} | " + " | ".join(cost + cells) + " |")
    if over_seeds:  # the mean over runs; the interval resamples runs and problems
        lines += [
            "",
            "| arm, over its seeds | runs | " + " | ".join(labels.values()) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in METRICS) + " |",
        ]
        for row in over_seeds:
            cells = [interval_cell(row[metric]) if metric in row else "-" for metric in labels]
            counts = sorted({len(row[metric]["run_values"]) for metric in labels if metric in row})
            runs = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"  # where metrics had fewer runs
            lines.append(f"| {row['name']} | {runs} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| comparison | metric | runs (seeds) | difference [95% interval] | paired bootstrap p | McNemar (b, c, exact p) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in comparisons:
        mcnemar = "-"
        if "mcnemar" in c:
            mcnemar = mcnemar_cell(c["mcnemar"])
        elif c.get("mcnemar_by_seed"):  # one test per seed: "#0: b, c, p; #1: ..."
            mcnemar = "; ".join(f"#{test['seed']}: {mcnemar_cell(test)}" for test in c["mcnemar_by_seed"])
        # a bootstrap p-value of 0 means below the resolution of its resamples
        pvalue = f"{c['bootstrap_pvalue']:.4f}" if c["bootstrap_pvalue"] > 0 else f"< {1 / NUM_RESAMPLES:g}"
        lines.append(
            f"| {c['first']} − {c['second']} | {labels[c['metric']]} | {c['runs'][0]}, {c['runs'][1]} | "
            f"{c['difference']:+.4f} "
            f"[{c['low']:+.4f}, {c['high']:+.4f}] | {pvalue} | {mcnemar} |"
        )
    return "\n".join(lines)


def mcnemar_cell(test: dict) -> str:
    return f"{test['b']}, {test['c']}, {test['pvalue']:.4f}"


def plot(rows: list[dict], over_seeds: list[dict], path: Path) -> None:
    """pass@k and the held-out loss against P, with 95% intervals; the base model as a line and band, the other arms
    (longer prefix, LoRA, grid points) left out. An arm trained with several seeds is drawn as its mean over them."""
    plt = pyplot()
    if plt is None:
        return
    seeded = {row["name"]: row for row in over_seeds}
    adapters = [{**row, **seeded.get(row["name"], {})} for row in rows if re.fullmatch(r"P\d+", row["name"])]
    base = next((row for row in rows if row["name"] == "base"), None)
    if not any(metric in row for row in adapters for metric, _, _ in METRICS):
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], [metric for metric, _, _ in METRICS[:4]], "HumanEval"), (axes[1], ["heldout_loss"], "nats"))
    for axis, metrics, ylabel in panels:
        axis.set(ylabel=ylabel)
        for metric in metrics:
            points = [row for row in adapters if metric in row]
            if not points:
                continue
            label = next(label for key, label, _ in METRICS if key == metric)
            values = [row[metric]["value"] for row in points]
            below = [row[metric]["value"] - row[metric]["low"] for row in points]
            above = [row[metric]["high"] - row[metric]["value"] for row in points]
            P = [row["P"] for row in points]
            line = axis.errorbar(P, values, yerr=[below, above], fmt="o-", capsize=3, label=label)
            if base is not None and metric in base:
                color = line[0].get_color()
                axis.axhline(base[metric]["value"], color=color, linestyle=":")
                axis.axhspan(base[metric]["low"], base[metric]["high"], color=color, alpha=0.1)
    plot_against_streams(
        figure,
        axes,
        [row["P"] for row in adapters],
        "P (streams), an arm trained with several seeds at its mean; dotted: base model, band: its 95% interval",
        path,
    )
