"""The report's PNG plots of one device's records (`benchmarks.report` writes them beside report.md): memory and
latency against predicted loss for ParScale and the dense model of equal loss, decode ms/token against P, and training
tokens/s against P. Nothing is drawn without matplotlib."""

from __future__ import annotations

import os
import statistics
from typing import Any

from benchmarks.records import AUTHORS_TRAINING, Record, decode_rows, training_attention, training_variant


def write_plots(records: list[Record], comparisons: list[Record], out: str, file_prefix: str = "") -> list[str]:
    """PNG plots of one device's records, each file name starting with `file_prefix`, if matplotlib is installed;
    returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def save(figure: Any, name: str) -> None:
        figure.tight_layout()
        written.append(os.path.join(out, file_prefix + name))
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)

    rows = [r for r in decode_rows(records, "decode") if r["mode"] == "fast"]
    # One row of panels per measured (batch, lengths); the "mean of" rows are left to the table.
    panels = sorted({(c["batch"], c["lengths"]) for c in comparisons if not c["lengths"].startswith("mean")})
    if panels:
        figure, axes = plt.subplots(len(panels), 2, figsize=(10, 3.4 * len(panels)), squeeze=False)
        for row, (batch, lengths) in enumerate(panels):
            for column, (key, label) in enumerate((("peak_mem_gib", "peak memory (GiB)"), ("total_ms", "latency (s)"))):
                axis = axes[row][column]
                for shape in sorted({c["shape"] for c in comparisons}):
                    points = sorted(
                        (c for c in comparisons if (c["shape"], c["batch"], c["lengths"]) == (shape, batch, lengths)),
                        key=lambda c: c["P"],
                    )
                    if not points or points[0][f"{key}_base"] is None:  # none measured, or no memory figures (CPU)
                        continue
                    scale = 1e-3 if key == "total_ms" else 1.0
                    base = points[0][f"{key}_base"]
                    losses = [points[0]["base_loss"]] + [c["loss"] for c in points]
                    parallel = [base] + [base + c[f"{key}_parscale_increase"] for c in points]
                    dense = [base] + [base + c[f"{key}_dense_increase"] for c in points]
                    streams = ",".join(["1"] + [str(c["P"]) for c in points])
                    line = axis.plot(losses, [v * scale for v in dense], "s--", label=f"{shape} parameter scaling")[0]
                    axis.plot(
                        losses,
                        [v * scale for v in parallel],
                        "o-",
                        color=line.get_color(),
                        label=f"{shape} ParScale P={streams}",
                    )
                axis.invert_xaxis()
                axis.set_xlabel("predicted loss (fitted law, Stack-V2 Python)")
                axis.set_ylabel(label)
                axis.set_title(f"batch {batch}, prompt+new {lengths}")
                axis.grid(alpha=0.3)
                if axis.get_legend_handles_labels()[0]:
                    axis.legend(fontsize=7)
        save(figure, "scaling_memory_latency.png")
    # ms/token against P at the length measured most often for each shape: ParScale against the dense model of equal
    # predicted loss (both start from the base model at P = 1, so only lengths with the base model count).
    based = {(r["shape"], r["prompt"], r["new_tokens"]) for r in rows if r["variant"] == "stock"}
    if based:
        shapes = sorted({shape for shape, _, _ in based})
        figure, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.4), squeeze=False)
        for axis, shape in zip(axes[0], shapes):
            of_shape = [r for r in rows if (r["shape"], r["prompt"], r["new_tokens"]) in based and r["shape"] == shape]
            common = statistics.mode((r["prompt"], r["new_tokens"]) for r in of_shape)
            for batch in sorted({r["batch"] for r in of_shape}):
                cases = {
                    r["variant"]: r for r in of_shape if (r["batch"], (r["prompt"], r["new_tokens"])) == (batch, common)
                }
                if "stock" not in cases:
                    continue
                for prefix, style, name in (("P", "o-", "ParScale"), ("dense_P", "s--", "dense, equal loss")):
                    points = [(1, cases["stock"]["decode_ms_per_token"])] + [
                        (p, cases[f"{prefix}{p}"]["decode_ms_per_token"]) for p in (2, 4, 8) if f"{prefix}{p}" in cases
                    ]
                    if len(points) > 1:
                        axis.plot(*zip(*points), style, label=f"{name}, batch {batch}")
            axis.set_xscale("log", base=2)
            axis.set_xlabel("P (streams, or the dense model of equal predicted loss)")
            axis.set_ylabel("decode ms/token (fast path)")
            axis.set_title(f"Qwen2.5-{shape} shape, {common[0]}+{common[1]} tokens")
            axis.set_ylim(bottom=0)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        save(figure, "decode_latency.png")
    training = [  # the streams' cost: ParScale at its default prefix length, through the package's attention
        r
        for r in records
        if r.get("suite") == "train"
        and not r["gradient_checkpointing"]
        and training_variant(r) == f"P{r['P']}"
        and training_attention(r) == "bias"
    ]
    if training:
        figure, axis = plt.subplots(figsize=(5.5, 3.6))
        for color, shape in enumerate(sorted({r["shape"] for r in training})):
            for compile_mode, style in (("none", "o--"), ("layers", "o-")):
                points = {
                    r["P"]: r["tokens_per_s"]
                    for r in training
                    if (r["shape"], r.get("compile", "none")) == (shape, compile_mode)
                }
                if points:
                    label = f"{shape}, {'eager' if compile_mode == 'none' else 'layers compiled'}"
                    axis.plot(
                        sorted(points), [points[p] for p in sorted(points)], style, color=f"C{color}", label=label
                    )
        axis.plot(
            list(AUTHORS_TRAINING), list(AUTHORS_TRAINING.values()), "k^", label="authors' code 1.5b, H100 (issue 5)"
        )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("P")
        axis.set_ylabel("training tokens/s (seq 2048, batch 1)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        save(figure, "training_throughput.png")
    return written
