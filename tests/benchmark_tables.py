"""The tables of BENCHMARKS.md rendered from `benchmarks/results/results.jsonl` (`benchmarks.run`'s records), one
device's records at a time (see `doc_tables.py`, which fills them into the documents)."""

from __future__ import annotations

from table_format import ROOT, markdown

from benchmarks.attention_accuracy import TENSORS
from benchmarks.records import AUTHORS_TRAINING, call_of, load_records, training_attention, training_variant
from benchmarks.report import TARGETS, scaling_comparison
from benchmarks.training import TRAIN_LOOPS


def benchmark_records(device: str) -> list[dict]:
    """The records of one device, in the order they were written (a later record of the same case replaces an
    earlier one, as in `benchmarks.records.decode_rows`)."""
    records = load_records([str(ROOT / "benchmarks" / "results" / "results.jsonl")])
    # training records name their variant since the suite took the experiment's arms; the earlier ones are P<n>
    return [
        {**record, "variant": training_variant(record)} if record.get("suite") in ("train", "train_masks") else record
        for record in records
        if record.get("device_name") == device
    ]


def package_attention(records: list[dict]) -> list[dict]:
    """The records measured with the package's own attention (every record made before `--train-attention`)."""
    return [r for r in records if training_attention(r) == "bias"]


def last(records: list[dict], **where) -> dict:
    """The last record matching every key=value; KeyError if there is none."""
    matches = [r for r in records if all(r.get(key) == value for key, value in where.items())]
    if not matches:
        raise KeyError(f"no benchmark record with {where}")
    return matches[-1]


def benchmark_targets(device: str, runs: str) -> str:
    """The issue's targets, each against its comparison from the same run (benchmarks/report.py `TARGETS`), from the
    records of the runs named (comma-separated run labels): a later call of the same suites, measuring something
    else, leaves the table as it was measured."""
    chosen = runs.split(",")
    records = package_attention([r for r in benchmark_records(device) if r.get("run") in chosen])

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


def benchmark_sampling_attention(device: str) -> str:
    """The fast path's sampling with its own decode attention (`fast`) against transformers' sdpa attention, which
    copies each key/value head once per query head (`fast_heads_copied`), by P: each pair from one run."""
    found = {(r["P"], r["mode"], r["run"]): r for r in benchmark_records(device) if r.get("suite") == "sampling"}
    rows = []
    for P, _, run in sorted(key for key in found if key[1] == "fast_heads_copied"):
        copied, packed = found[P, "fast_heads_copied", run], found[P, "fast", run]
        rows.append(
            [
                str(P),
                run,
                f"{copied['completions_per_s']:.3g}",
                f"**{packed['completions_per_s']:.3g}**",
                f"{packed['completions_per_s'] / copied['completions_per_s']:.2f}×",
                f"{copied['warmup_s']:.0f} s / {packed['warmup_s']:.0f} s",
            ]
        )
    header = (
        "P | run | heads copied (transformers' attention) | packed heads (`peft_parscale.decode_attention`) "
        "| speed-up | compilation, copied / packed"
    )
    return markdown(header, ["---", "---", "---:", "---:", "---:", "---:"], rows)


def benchmark_sampling_prefill(device: str, before: str, after: str) -> str:
    """The fast path's sampling (`fast` mode) in run `before`, where every sequence ran its own copy of its prompt, and
    in run `after`, where each distinct prompt runs once and its cache rows are copied: time to first token (the
    prefill), completions per second and peak memory, by P."""
    records = benchmark_records(device)
    found = {(r["run"], r["P"]): r for r in records if r.get("suite") == "sampling" and r["mode"] == "fast"}
    rows = []
    for P in sorted({P for run, P in found if run == after and (before, P) in found}):
        old, new = found[before, P], found[after, P]
        rows.append(
            [
                str(P),
                f"{old['ttft_ms']:.0f} / **{new['ttft_ms']:.0f}**",
                f"{old['completions_per_s']:.3g} / **{new['completions_per_s']:.3g}**",
                f"{old['peak_mem_gib']:.1f} / **{new['peak_mem_gib']:.1f}**",
            ]
        )
    header = f"P | time to first token, ms (run {before} / {after}) | completions/s | peak memory, GiB"
    return markdown(header, ["---", "---:", "---:", "---:"], rows)


def training_records(device: str, run: str) -> dict[tuple, dict]:
    """(shape, P, compile) -> the latest plain training record (sequence 2048, no gradient checkpointing, the
    package's attention) of ParScale at its default prefix length in one run, so that eager and compiled compare
    side by side."""
    found = {}
    for r in package_attention(benchmark_records(device)):
        plain = r.get("suite") == "train" and not r["gradient_checkpointing"] and r["length"] == 2048
        plain = plain and r.get("run") == run
        if plain and r["variant"] == f"P{r['P']}":
            found[r["shape"], r["P"], r.get("compile", "none")] = r
    return found


def benchmark_training(device: str, run: str) -> str:
    found = training_records(device, run)
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
    """The changes to adapter training at P=8 (1.5B shape), each against the measurement before it in its run (with
    the package's attention: `benchmark_training_attention` gives the others)."""
    records = package_attention(benchmark_records(device))
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


def benchmark_training_loops(device: str, run: str) -> str:
    """One run's `train_loops` records: each loop's step per sequence in every invocation of the run (a call's
    measurements compare as ratios; between calls they drift), with and without gradient checkpointing, against the
    plain step of the same invocation."""
    records = [r for r in benchmark_records(device) if r.get("suite") == "train_loops" and r.get("run") == run]
    if not records:
        raise KeyError(f"no train_loops records of run {run!r} on {device!r}")
    plain = {(r["invocation"], r["gradient_checkpointing"]): r for r in records if r["loop"] == "plain"}
    rows = []
    for checkpointing in (False, True):
        for loop in TRAIN_LOOPS:
            found = [r for r in records if r["loop"] == loop and r["gradient_checkpointing"] == checkpointing]
            if not found:
                continue
            rows.append(
                [
                    f"`{loop}`",
                    "yes" if checkpointing else "no",
                    " / ".join(f"{r['step_ms']:.1f}" for r in found),
                    " / ".join(
                        f"{r['step_ms'] / plain[r['invocation'], checkpointing]['step_ms']:.2f}×" for r in found
                    ),
                    " / ".join(f"{100 * r['mfu']:.1f} %" for r in found),
                    f"{max(r['peak_mem_gib'] for r in found):.1f}",
                ]
            )
    header = "loop | gradient checkpointing | ms per sequence (each invocation) | against `plain`, same invocation | MFU | peak GiB"
    return markdown(header, ["---", "---", "---:", "---:", "---:", "---:"], rows)


def benchmark_decode_levers(device: str, run: str) -> str:
    """One run's targets-suite records by mode (`--target-modes`): ms/token at P=1 and P=8, their ratio, how many
    times inductor declined to record a CUDA graph (`cudagraph_skips`), and whether the run's float32 case (the
    equality suite, P=8) gave eager's greedy tokens; "–" where the run has no such case (a case its timeout stopped)."""
    records = [r for r in benchmark_records(device) if r.get("run") == run]
    timed = {(r["mode"], r["variant"]): r for r in records if r.get("suite") == "targets"}
    if not timed:
        raise KeyError(f"no targets records of run {run!r} on {device!r}")
    float32 = {r["mode"]: r for r in records if r.get("suite") == "equality" and r["variant"] == "P8"}

    def tokens_equal(mode: str) -> str:
        if mode == "eager" or mode not in float32:
            return "–"
        return "yes" if float32[mode]["tokens_vs_eager"]["equal"] else "no"

    rows = []
    for mode in dict.fromkeys(mode for mode, _ in timed):
        p1, p8 = timed[mode, "P1"], timed[mode, "P8"]
        skips = [r.get("cudagraph_skips") for r in (p1, p8)]
        rows.append(
            [
                f"`{mode}`",
                f"{p1['decode_ms_per_token']:.2f}",
                f"{p8['decode_ms_per_token']:.2f}",
                f"{p8['decode_ms_per_token'] / p1['decode_ms_per_token']:.2f}×",
                "–" if None in skips else " / ".join(map(str, skips)),
                tokens_equal(mode),
            ]
        )
    header = (
        "mode | P=1 ms/token | P=8 ms/token | P=8 / P=1 | CUDA graphs declined (P=1 / P=8)"
        " | float32 greedy tokens = eager's (P=8)"
    )
    return markdown(header, ["---", "---:", "---:", "---:", "---:", "---"], rows)


def benchmark_training_attention(device: str, run: str) -> str:
    """One run's training records by attention (`--train-attention`): each one's step in every invocation of the run,
    against the package's bias in the same invocation, and its first step's loss and adapter gradient norm against
    the bias's (the same computation, so they differ by rounding only)."""
    records = [r for r in benchmark_records(device) if r.get("suite") == "train" and r.get("run") == run]
    if not records:
        raise KeyError(f"no train records of run {run!r} on {device!r}")
    bias = {r["invocation"]: r for r in records if training_attention(r) == "bias"}

    def against_bias(found: list[dict], key: str, difference: bool) -> str:
        """Each record's `key` over the bias's of its invocation: as a ratio, or as a relative difference."""
        ratios = [r[key] / bias[r["invocation"]][key] for r in found]
        return " / ".join(f"{ratio - 1:+.1e}" if difference else f"{ratio:.3f}×" for ratio in ratios)

    rows = []
    for attention in dict.fromkeys(map(training_attention, records)):
        found = [r for r in records if training_attention(r) == attention]
        rows.append(
            [
                f"`{attention}`",
                " / ".join(f"{r['step_ms']:.1f}" for r in found),
                against_bias(found, "step_ms", difference=False),
                " / ".join(f"{100 * r['mfu']:.1f} %" for r in found),
                against_bias(found, "loss", difference=True),
                against_bias(found, "trainable_gradient_norm", difference=True),
            ]
        )
    header = (
        "attention | ms per sequence (each invocation) | against `bias`, same invocation | MFU"
        " | first-step loss against `bias` | gradient norm against `bias`"
    )
    return markdown(header, ["---", "---:", "---:", "---:", "---:", "---:"], rows)


def lever_pairs(device: str, runs: str, lever: str) -> list[tuple[str, dict, dict, str]]:
    """The targets suite's cases of the runs named (comma-separated) that measured both `fast` and the `lever` mode in
    one invocation (one process: between calls the times drift more than a lever moves them), as (run, fast's record,
    the lever's record, whether the run's float32 case of the lever, the equality suite at P=8, gave eager's greedy
    tokens: "yes", "no" or "–" for none)."""
    chosen = runs.split(",")
    records = [r for r in benchmark_records(device) if r.get("run") in chosen]
    timed = {
        (r["run"], call_of(r), r["variant"], r["batch"], r["mode"]): r
        for r in records
        if r.get("suite") == "targets" and r["mode"] in ("fast", lever)
    }
    float32 = {r["run"]: r for r in records if r.get("suite") == "equality" and r["mode"] == lever}
    pairs = []
    for run, call, variant, batch in dict.fromkeys(key[:4] for key in timed):
        fast, measured = (timed.get((run, call, variant, batch, mode)) for mode in ("fast", lever))
        if fast is None or measured is None:
            continue
        equal = "–" if run not in float32 else "yes" if float32[run]["tokens_vs_eager"]["equal"] else "no"
        pairs.append((run, fast, measured, equal))
    if not pairs:
        raise KeyError(f"no invocation of runs {runs!r} on {device!r} measured both fast and {lever}")
    return pairs


def benchmark_fused_projections(device: str, runs: str) -> str:
    """The `fast_fused` decode lever against `fast`, each pair from one invocation (`lever_pairs`)."""
    rows = []
    for run, fast, fused, equal in lever_pairs(device, runs, "fast_fused"):
        plain_ms, fused_ms = fast["decode_ms_per_token"], fused["decode_ms_per_token"]
        variant, batch = fast["variant"][1:], str(fast["batch"])
        rows.append([run, variant, batch, f"{plain_ms:.2f}", f"{fused_ms:.2f}", f"{fused_ms / plain_ms:.3f}×", equal])
    header = (
        "run | P | batch | `fast` ms/token | `fast_fused` ms/token | `fast_fused` / `fast`"
        " | float32 greedy tokens = eager's (P=8, the run's)"
    )
    return markdown(header, ["---", "---:", "---:", "---:", "---:", "---:", "---"], rows)


def benchmark_compiled_prefill(device: str, runs: str) -> str:
    """The compiled prefill (`fast_prefill`) against `fast`, each pair from one invocation (`lever_pairs`): the
    prompts' forward pass (time to the first token), the first generation's compilation, and the decode step, which
    both compile alike."""
    rows = []
    for run, fast, compiled, equal in lever_pairs(device, runs, "fast_prefill"):
        rows.append(
            [run, fast["variant"][1:], str(fast["batch"])]
            + [f"{fast['prefill_ms']:.1f}", f"{compiled['prefill_ms']:.1f}"]
            + [f"{compiled['prefill_ms'] / fast['prefill_ms']:.2f}×"]
            + [f"{fast['warmup_s']:.1f} / {compiled['warmup_s']:.1f}"]
            + [f"{fast['decode_ms_per_token']:.2f} / {compiled['decode_ms_per_token']:.2f}", equal]
        )
    header = (
        "run | P | batch | `fast` prefill ms | `fast_prefill` prefill ms | `fast_prefill` / `fast`"
        " | first generation s, compiling (`fast` / `fast_prefill`) | decode ms/token (`fast` / `fast_prefill`)"
        " | float32 greedy tokens = eager's (P=8, the run's)"
    )
    return markdown(header, ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"], rows)


def benchmark_greedy_choice(device: str, run: str) -> str:
    """One run's greedy choices from the selector suite: a plain `argmax(-1)` against `sampling.first_argmax` (the
    fast path's `GREEDY`), each compiled, per number of rows: microseconds per call of their kernels, and whether the
    tokens are the uncompiled argmax's."""
    records = {
        (r["rows"], r["variant"]): r
        for r in benchmark_records(device)
        if r.get("suite") == "selector" and r.get("run") == run and r["variant"] in ("argmax", "greedy")
    }
    rows = []
    for count in sorted({count for count, _ in records}):
        plain, chunked = records[count, "argmax"], records[count, "greedy"]
        equal = "yes" if plain["tokens_equal_fraction"] == chunked["tokens_equal_fraction"] == 1.0 else "no"
        plain_us, chunked_us = plain["ms_per_call"] * 1e3, chunked["ms_per_call"] * 1e3
        rows.append([str(count), f"{plain['vocab_size']:,}", f"{plain_us:.1f}", f"{chunked_us:.1f}"])
        rows[-1] += [f"{chunked_us / plain_us:.2f}×", equal]
    if not rows:
        raise KeyError(f"no greedy selector records of run {run!r} on {device!r}")
    header = "rows | vocabulary | `argmax` µs | `first_argmax` µs | `first_argmax` / `argmax` | tokens = eager argmax"
    return markdown(header, ["---:", "---:", "---:", "---:", "---:", "---"], rows)


def benchmark_attention_accuracy(device: str, run: str) -> str:
    """One run's `attention_accuracy` records: each training-attention kernel's relative error, in bf16 against the
    attention written out in float64, of its output and of the query, key and value gradients (the prefix's keys
    apart from the rest), at each sharpness of the scores; and its forward and backward time."""
    records = [r for r in benchmark_records(device) if r.get("suite") == "attention_accuracy" and r.get("run") == run]
    if not records:
        raise KeyError(f"no attention_accuracy records of run {run!r} on {device!r}")
    rows = [
        [f"`{r['attention']}`", f"{r['sharpness']:g}"]
        + [f"{r['relative_error'][name]:.4e}" for name in TENSORS]
        + [f"{r['forward_backward_ms']:.2f}"]
        for r in records
    ]
    header = (
        "attention | score std | output | query grad | key grad, prefix | key grad, rest | value grad, prefix"
        " | value grad, rest | fwd+bwd ms"
    )
    return markdown(header, ["---", "---:"] + ["---:"] * 7, rows)


# Which FlashAttention or cuDNN kernel a training record's attention kernels are, by words of their names
ATTENTION_KERNEL_NAMES = (
    ("pytorch_flash::", "FlashAttention-2"),
    ("flash_attncute", "FlashAttention-4"),
    ("cudnn", "cuDNN"),
)


def attention_kernel_names(kernels: list[str]) -> str:
    """The kernels a training record says its attention launched, by the name of their library."""
    names = {name for kernel in kernels for word, name in ATTENTION_KERNEL_NAMES if word in kernel}
    return ", ".join(sorted(names)) or "other"


def benchmark_kernel_gradients(device: str, runs: str) -> str:
    """The training records of the runs named (comma-separated), each against the first `bias` record of its
    invocation: which kernels its attention ran, its first step's loss, and its first step's gradient norms (the
    aggregator's output layer, weight and bias; the prefix tensor that differs most; the whole adapter) as relative
    differences from the bias's. The aggregator's first layer gets no gradient at the first step (the output layer
    starts at zero), so it is left out."""
    chosen = runs.split(",")
    records = [
        r
        for r in benchmark_records(device)
        if r.get("suite") == "train" and r.get("run") in chosen and "gradient_norms" in r
    ]
    if not records:
        raise KeyError(f"no train records with gradient norms of runs {runs!r} on {device!r}")
    reference: dict[str, dict] = {}
    for record in records:
        if training_attention(record) == "bias":
            reference.setdefault(call_of(record), record)

    def percent(value: float) -> str:
        return f"{100 * value:+.2f} %"

    rows = []
    for record in records:
        bias = reference[call_of(record)]
        norms, bias_norms = record["gradient_norms"], bias["gradient_norms"]
        output = [name for name in norms if "aggregator" in name and ".2." in name]
        prefixes = [name for name in norms if "aggregator" not in name]
        largest = max(abs(norms[name] / bias_norms[name] - 1) for name in prefixes)
        rows.append(
            [
                record["run"],
                f"{record['init_std']:g}",
                f"`{training_attention(record)}`",
                attention_kernel_names(record["attention_kernels"]),
                f"{record['step_ms']:.1f}",
                f"{record['loss'] / bias['loss'] - 1:+.1e}",
                *(percent(norms[name] / bias_norms[name] - 1) for name in sorted(output, key=lambda n: "bias" in n)),
                f"{100 * largest:.2f} %",
                percent(record["trainable_gradient_norm"] / bias["trainable_gradient_norm"] - 1),
            ]
        )
    header = (
        "run | init std | attention | kernels that ran | ms per sequence | first-step loss against `bias`"
        " | aggregator output weight | aggregator output bias | prefix tensors, largest | whole adapter"
    )
    return markdown(header, ["---", "---:", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:"], rows)
