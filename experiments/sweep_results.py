"""What the stream sweep's output folder holds (`stream_sweep.py`), and the tables, fits and curves made from it.

Every run has a folder named after its arm (`arms.parse_arm`) and ``--tag``, holding ``result.json`` once it has
finished (`write_result`). `report` reads them all and writes ``report.json`` and ``curves.png``:

- one row per arm run without a tag (``base``, ``P<n>``, ``P<n>T<t>``, ``lora@<rate>``, ...) with its learning rate,
  trainable parameters, adapter size, held-out losses, validation loss and speed, and its held-out learning curve;
- the log-linear fit of the final held-out loss in ln P, and the gap L(P=1) − L(P) against tokens, over the ``P<n>``
  runs at the default prefix length and learning rate only (the sweep proper);
- the learning-rate grids: runs with a tag (``lora@6e-4-grid``) grouped by arm without its rate and tag, each with its
  validation loss, and the lowest in each group (``grids`` in report.json, and a table). Held-out losses play no part
  in it;
- paired comparisons on the held-out windows (``paired`` in report.json, and a table), from each run's
  ``window_losses.json``: every arm against the base model, P=n against P=1, P=n against the single stream with its
  prefix count (``P1T<n·T>``), and LoRA against the largest P scored; each a mean difference with its 95% interval
  and p-value over windows (`window_losses.paired_differences`). Runs without window scores are listed
  (``unscored``).

    report(Path("sweep-output"), default_prefix_length=48, default_learning_rate=5e-2)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from arms import ARM_NAME, Arm, parse_arm
from common import device_name, pyplot, versions
from trl import SFTTrainer
from window_losses import paired_differences

from peft_parscale.scaling_law import PAPER_STACK_V2_PYTHON, fit_log_linear
from peft_parscale.sft import wrapped_in_ddp

ADAPTERS = ("parscale", "lora")  # the kinds of arm with an adapter, in the order the table lists them
WINDOW_LOSSES = "window_losses.json"  # in a run's folder: {"heldout": [loss per window], "validation": [...]}


def gradients_averaged(trainer: SFTTrainer) -> bool:
    """Whether the run's processes averaged their gradients: one process, FSDP, or a model wrapped in DDP."""
    return trainer.accelerator.num_processes == 1 or trainer.is_fsdp_enabled or wrapped_in_ddp(trainer)


def steady_tokens_per_s(segments: list[dict], tokens_per_step: int, device: str) -> float | None:
    """The best median step of the segments that ran alone on `device`, as tokens/s; None if none did. A segment
    trained side by side with other runs has no speed of its own, nor one on another kind of GPU than the run's last
    (segments recorded before they named their device count as on it)."""
    steady = [
        segment["steady_step_s"]
        for segment in segments
        if segment.get("gpu_shared_by", 1) == 1
        and segment.get("device", device) == device
        and segment["steady_step_s"] is not None
    ]
    return tokens_per_step / min(steady) if steady else None


def write_result(
    args: argparse.Namespace,
    arm: Arm,
    name: str,
    rate: float,
    out: Path,
    trainer: SFTTrainer,
    validation_loss: float,
) -> None:
    """A finished run's result.json in `out`: what it is, how it trained (its segments, `steady_tokens_per_s`), its
    held-out curve and validation loss, and where it ran."""
    tokens_per_step = args.batch_size * args.seq_len
    segments = [json.loads(path.read_text()) for path in sorted(out.glob("segment-*.json"))]
    curve = [
        (log["step"] * tokens_per_step, log["eval_loss"]) for log in trainer.state.log_history if "eval_loss" in log
    ]
    train_seconds = sum(segment["seconds"] for segment in segments)
    device = device_name()
    result = {
        "name": name + args.tag,
        "arm": name,
        "kind": arm.kind,
        "P": arm.P,
        "processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        # several processes averaged their gradients (DDP or FSDP): not so after an evaluation before train(), which
        # `check_data_parallel_wrapping` now refuses; the two-GPU runs of 2026-11-30 did not record it (they did not)
        "gradients_averaged": gradients_averaged(trainer),
        "dtype": "float32" if args.float32 else ("bfloat16" if trainer.args.bf16 else "float32"),
        "compiled_layers": args.compile,
        "gpu_shared_by": max(segment.get("gpu_shared_by", 1) for segment in segments),  # the most, over segments
        "steps": trainer.state.global_step,
        # sequences per forward pass and process (--stream-sequences): the same gradients whatever it is, up to rounding
        "micro_batch": trainer.args.per_device_train_batch_size,
        "train_tokens": trainer.state.global_step * tokens_per_step,
        "train_seconds": train_seconds,  # the segments' steps, evaluations and checkpoints included
        "steady_tokens_per_s": steady_tokens_per_s(segments, tokens_per_step, device),
        "segments": segments,
        "learning_rate": rate,
        "optim": args.optim,
        "adam_epsilon": args.adam_epsilon,
        "smoothing": args.smoothing if arm.kind == "parscale" else None,
        "prefix_length": (arm.prefix_length or args.prefix_length) if arm.kind == "parscale" else None,
        "lora_rank": args.lora_rank if arm.kind == "lora" else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "adapter_bytes": sum(file.stat().st_size for file in (out / "adapter").glob("*.safetensors")),
        "validation_loss": validation_loss,  # to choose learning rates (module docstring)
        "heldout_curve": curve,  # (training tokens, held-out loss)
        "train_loss_curve": [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log],
        "device": device,
        "versions": versions(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({key: value for key, value in result.items() if "curve" not in key}), flush=True)


def report(output: Path, default_prefix_length: int, default_learning_rate: float) -> dict:
    """The table of every arm with the base model, the learning-rate grids, the log-linear fit in ln P and the gap
    L(P=1) − L(P) against tokens (see the module docstring); writes report.json and curves.png in `output`."""
    results = {r["name"]: r for r in (json.loads(p.read_text()) for p in sorted(output.glob("*/result.json")))}
    base = results.get("base")
    arms = sorted((r for name, r in results.items() if ARM_NAME.fullmatch(name) and name != "base"), key=arm_order)
    sweep = [
        r
        for r in arms
        if r["name"] == f"P{r['P']}"
        and r["prefix_length"] == default_prefix_length
        and r["learning_rate"] == default_learning_rate
    ]
    grid_runs = [r for name, r in results.items() if not ARM_NAME.fullmatch(name) and r.get("kind") in ADAPTERS]
    summary: dict = {"table": arms_table(arms, base), "grids": grids(grid_runs)}
    summary["grid_table"] = grid_table(summary["grids"])
    if len(sweep) >= 3:  # two points always fit a line: R² says something from three
        fit = fit_log_linear([r["P"] for r in sweep], [r["heldout_curve"][-1][1] for r in sweep])
        summary["log_linear_fit"] = {
            "P": [r["P"] for r in sweep],
            "intercept": fit.intercept,
            "slope": fit.slope,
            "r2": fit.r2,
        }
    summary |= gap_analysis(sweep)
    summary["curves"] = {r["name"]: r["heldout_curve"] for r in arms}
    runs = [r["name"] for r in ([base] if base else []) + arms]
    names = [name for name in runs if (output / name / WINDOW_LOSSES).is_file()]
    losses = {name: json.loads((output / name / WINDOW_LOSSES).read_text())["heldout"] for name in names}
    summary["paired"] = paired_differences(losses, comparisons(names, default_prefix_length))
    summary["paired_table"] = paired_table(summary["paired"])
    summary["unscored"] = [name for name in runs if name not in names]  # no window_losses.json: not compared
    (output / "report.json").write_text(json.dumps(summary, indent=1))
    print(summary["table"], summary["grid_table"], summary["paired_table"], sep="\n\n")
    if summary["unscored"]:
        print(f"not compared window by window (no {WINDOW_LOSSES}): {', '.join(summary['unscored'])}")
    print(json.dumps({key: summary[key] for key in ("log_linear_fit", "gap_fit") if key in summary}, indent=1))
    plot_curves(arms, sweep, base, summary.get("gaps", {}), output / "curves.png")
    return summary


def arm_order(result: dict) -> tuple:
    """ParScale by P, prefix length and rate, then LoRA by rate (results written before arms had names are P<n>)."""
    arm = parse_arm(result.get("arm", result["name"]))
    return (ADAPTERS.index(arm.kind), arm.P or 0, result.get("prefix_length") or 0, result["learning_rate"])


def number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def arms_table(arms: list[dict], base: dict | None) -> str:
    lines = [
        "| run | learning rate | trainable parameters | adapter MB | training tokens | held-out loss at init | "
        + "final held-out loss | vs base | validation loss | steady tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if base:
        validation = number(base.get("validation_loss"), ".4f")
        lines.append(f"| base (no adapter) | - | - | - | - | - | {base['heldout_loss']:.4f} | - | {validation} | - |")
    for r in arms:
        curve = r["heldout_curve"]
        initial = curve[0][1] if curve and curve[0][0] == 0 else None
        final = curve[-1][1] if curve else None
        versus = final - base["heldout_loss"] if base and final is not None else None
        adapter_mb = r["adapter_bytes"] / 1e6 if r.get("adapter_bytes") else None
        cells = [
            r["name"],
            f"{r['learning_rate']:g}",
            number(r.get("trainable_parameters"), ","),
            number(adapter_mb, ".2f"),
            f"{r['train_tokens']:,}",
            number(initial, ".4f"),
            number(final, ".4f"),
            number(versus, "+.4f"),
            number(r.get("validation_loss"), ".4f"),
            number(r["steady_tokens_per_s"], ",.0f"),  # None where no segment ran alone on the run's last GPU
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(names: list[str], default_prefix_length: int) -> list[tuple[str, str]]:
    """The pairs the report compares on the same windows, among the runs `names`: every arm against ``base``; the
    sweep's ``P<n>`` against ``P1``, and so is every single stream with a longer prefix (``P1T<t>``, what the prefix
    alone buys); each ``P<n>`` (n > 1) against a single stream with its prefix count, ``P1T<n·T>`` at any rate; every
    LoRA run against the largest ``P<n>`` among `names`."""
    arms = {name: parse_arm(name) for name in names if name != "base"}
    sweep = sorted((arm.P, name) for name, arm in arms.items() if name == f"P{arm.P}")
    pairs = [(name, "base") for name in arms]
    pairs += [(name, "P1") for P, name in sweep if P > 1]
    single = {name: arm.prefix_length for name, arm in arms.items() if arm.P == 1}
    pairs += [(name, "P1") for name, length in single.items() if length not in (None, default_prefix_length)]
    for P, name in sweep:
        matched = P * default_prefix_length
        pairs += [(name, other) for other, arm in arms.items() if P > 1 and (arm.P, arm.prefix_length) == (1, matched)]
    if sweep:
        pairs += [(name, sweep[-1][1]) for name, arm in arms.items() if arm.kind == "lora"]
    return pairs


def paired_table(rows: list[dict]) -> str:
    lines = [
        "| comparison | held-out windows | loss difference [95% interval] | paired bootstrap p |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        low, high = row["interval"]
        p_value = "< 0.0001" if row["p_value"] < 1e-4 else f"{row['p_value']:.4f}"
        lines.append(
            f"| {row['first']} − {row['second']} | {row['windows']} | "
            f"{row['difference']:+.4f} [{low:+.4f}, {high:+.4f}] | {p_value} |"
        )
    return "\n".join(lines)


def grids(runs: list[dict]) -> dict[str, dict]:
    """Tagged runs grouped by their arm without its rate, and their tag (``lora@6e-4-grid`` -> ``lora-grid``): each
    group's runs with learning rate and validation loss, and the run with the lowest validation loss."""
    groups: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: (r["name"], r["learning_rate"])):
        group = r["arm"].partition("@")[0] + r["name"].removeprefix(r["arm"])
        point = {"run": r["name"], "learning_rate": r["learning_rate"], "validation_loss": r["validation_loss"]}
        groups.setdefault(group, {"runs": []})["runs"].append(point)
    for group in groups.values():
        group["lowest"] = min(group["runs"], key=lambda point: point["validation_loss"])
    return groups


def grid_table(groups: dict[str, dict]) -> str:
    lines = [
        "| grid | run | learning rate | validation loss | lowest |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, group in groups.items():
        for point in sorted(group["runs"], key=lambda point: point["learning_rate"]):
            lowest = "yes" if point is group["lowest"] else ""
            lines.append(
                f"| {name} | {point['run']} | {point['learning_rate']:g} | {point['validation_loss']:.4f} | {lowest} |"
            )
    return "\n".join(lines)


# Qwen2.5-Coder-0.5B-Instruct's non-embedding parameters: all of them minus the (tied) embedding
NON_EMBEDDING_PARAMETERS = 494_032_768 - 151_936 * 896


def paper_law_gap(num_streams: int) -> float:
    """L(P=1) − L(P) that the paper's Stack-V2-Python law predicts at this model's size: for a model trained with its
    streams, not a recycled frozen one."""
    return PAPER_STACK_V2_PYTHON.predict(NON_EMBEDDING_PARAMETERS, 1) - PAPER_STACK_V2_PYTHON.predict(
        NON_EMBEDDING_PARAMETERS, num_streams
    )


def gap_analysis(sweep: list[dict]) -> dict:
    """Gap L(P=1) − L(P) at each evaluation, a fit gap = a + b·ln(tokens) for the largest P over the evaluations after
    the first, and the tokens at which that fit reaches the gap the paper's Stack-V2-Python law predicts for the same
    P at this model's size. The first evaluation (an eighth of the way in the sweep) is left out of the fit: there
    every run of the sweeps so far was still in its warm-up transient, P=1 behind the others by 0.03 to 0.09 nats,
    a gap that would set the fit's slope alone (set on 2026-12-06, with P=2 and the old runs seen, before any
    evaluation of the rerun's P=4 and P=8 was read)."""
    by_p = {r["P"]: dict(r["heldout_curve"]) for r in sweep}
    if 1 not in by_p or len(by_p) < 2:
        return {}
    gaps = {
        P: {tokens: by_p[1][tokens] - loss for tokens, loss in curve.items() if tokens in by_p[1]}
        for P, curve in by_p.items()
        if P > 1
    }
    largest = max(gaps)
    points = sorted((tokens, gap) for tokens, gap in gaps[largest].items() if tokens > 0)[1:]
    analysis: dict = {"gaps": {str(P): sorted(gap.items()) for P, gap in gaps.items()}}
    if len(points) >= 3:
        # The package's fit in ln x: gap = intercept − fit.slope·ln(tokens), so the gap grows by −fit.slope per ln.
        fit = fit_log_linear([tokens for tokens, _ in points], [gap for _, gap in points])
        intercept, slope = fit.intercept, -fit.slope
        paper_gap = paper_law_gap(largest)
        analysis["gap_fit"] = {
            "P": largest,
            "from_tokens": points[0][0],
            "intercept": intercept,
            "slope_per_ln_tokens": slope,
            "r2": fit.r2,
            "paper_law_gap": paper_gap,
            "tokens_to_paper_gap": math.exp((paper_gap - intercept) / slope) if slope > 0 else None,
        }
    return analysis


def compare_adapters(output: Path, names: list[str], bound: float) -> dict:
    """How far each run's adapter is from the first run's, against how far training moved the first from its start
    (the same start in every run: ParScale's text windows and seeded aggregator, LoRA's seeded A and zero B), per
    tensor; ``over_bound`` lists the tensors whose difference exceeds `bound` times their movement.

    With SGD the update is linear in the gradient, so two runs that differ only in the order of their sums stay
    within a small share of the movement, and a wrong data split or gradient average moves a tensor by a share of
    order one. With Adam the aggregator's first layer exceeds any such bound by design: its gradients start at
    zero, and Adam turns their rounding noise into steps of order the learning rate (BENCHMARKS.md, "Same adapter on
    one GPU and two")."""
    from safetensors.torch import load_file

    def weights(name: str, folder: str) -> dict[str, torch.Tensor]:
        return {k: v.double() for k, v in load_file(output / name / folder / "adapter_model.safetensors").items()}

    reference, start = weights(names[0], "adapter"), weights(names[0], "initial_adapter")
    moved = {key: (reference[key] - start[key]).abs().max().item() for key in reference}
    comparison = {"reference": names[0], "max_abs_moved": max(moved.values()), "runs": {}}
    for name in names[1:]:
        if not (output / name / "adapter").is_dir():
            comparison["runs"][name] = "no adapter: the run did not finish"
            continue
        other, other_start = weights(name, "adapter"), weights(name, "initial_adapter")
        difference = {key: (other[key] - reference[key]).abs().max().item() for key in reference}
        relative = {
            key: difference[key] / moved[key] if moved[key] > 0 else (math.inf if difference[key] else 0.0)
            for key in reference
        }
        comparison["runs"][name] = {
            "same_start_max_abs": max((other_start[key] - start[key]).abs().max().item() for key in start),
            "max_abs_difference": max(difference.values()),
            "max_relative_to_movement": max(relative.values()),
            "bound": bound,
            "over_bound": sorted(key for key in reference if relative[key] > bound),
            "per_tensor": {
                key: {"difference": difference[key], "moved": moved[key], "relative": relative[key]}
                for key in sorted(reference)
            },
        }
    (output / "compare.json").write_text(json.dumps(comparison, indent=1))
    print(json.dumps(comparison, indent=1))
    return comparison


def plot_curves(arms: list[dict], sweep: list[dict], base: dict | None, gaps: dict[str, list], path: Path) -> None:
    """Every arm's held-out learning curve, and the gain of the sweep's P streams over one against tokens (`gaps`:
    `gap_analysis`'s), each beside the gain the paper's law predicts for a model trained with its streams (dashed)."""
    plt = pyplot()
    if plt is None:
        return
    figure, (losses, gain) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {}  # each P in the same colour in both panels
    for r in arms:
        curve = dict(r["heldout_curve"])
        tokens = sorted(curve)
        label = f"P={r['P']}" if r in sweep else r["name"]
        (line,) = losses.plot([t / 1e6 for t in tokens], [curve[t] for t in tokens], "o-", markersize=3, label=label)
        colours[label] = line.get_color()
    drawn = False
    for P, points in gaps.items():
        shown = [(tokens, gap) for tokens, gap in points if tokens > 0]  # a log axis
        if not shown:
            continue
        drawn = True
        colour = colours.get(f"P={P}")
        gain.plot([tokens / 1e6 for tokens, _ in shown], [gap for _, gap in shown], "o-", color=colour, label=f"P={P}")
        gain.axhline(paper_law_gap(int(P)), color=colour, linestyle="--", linewidth=0.8, label=f"P={P}, paper's law")
    if base:
        losses.axhline(base["heldout_loss"], color="gray", linestyle=":", label="base")
    losses.set(xlabel="training tokens (M)", ylabel="held-out loss (nats/token)", title="learning curves")
    gain.set(xscale="log", xlabel="training tokens (M)", ylabel="L(P=1) − L(P)", title="gain over one stream")
    if drawn:  # plain numbers at 1, 2 and 5 times each power of ten: a log axis' default labels read 4×10^0
        ticker = plt.matplotlib.ticker
        gain.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        gain.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        gain.xaxis.set_minor_formatter(ticker.NullFormatter())
    gain.axhline(0, color="gray", linewidth=0.5)
    for axis in (losses, gain):
        if axis.get_legend_handles_labels()[0]:  # no gain to draw without P=1 and another P
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
