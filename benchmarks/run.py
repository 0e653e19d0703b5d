"""Run the benchmarks and write raw results (JSON lines), Markdown tables and plots.

    python -m benchmarks.run --tiny --out /tmp/bench                   # CPU, tiny shapes, a few seconds
    python -m benchmarks.run --suites env,targets,train_masks --out results/   # on a GPU
    python -m benchmarks.run --suites sweep --shapes 1.5b --out results/

Suites (GPU defaults; `--tiny` shrinks every grid):
- env: software versions, device, measured copy bandwidth and matrix-product rate.
- targets: Qwen2.5-1.5B shape, prompt 64 + 128 new tokens: stock at batch 8, ParScale P=1 and P=8 at batch 1 (or,
  with `--variants`/`--batches`, every given variant at every given batch size, one batch size after the other);
  eager `generate`, static-cache compiled `generate`, and the fast path (`--target-modes`, also fast_frozen,
  fast_autotune, fast_frozen_autotune: the decode step compiled with inductor's freezing and/or max-autotune;
  fast_fused: the query/key/value and gate/up products stacked; fast_prefill: the prompts' forward pass compiled too;
  see benchmarks/decoding.py); tokens compared with eager.
- sweep: fast path, variants stock, P1..P8 and the dense equivalents, batch 1/2/4/8, (prompt, new) = (L, L) for
  L in 64..512; the step compiled with dynamic shapes (one compilation per variant), or with `--static-sweep` for
  each case's static shapes (one compilation per case, as BENCHMARKS.md was measured).
- sweep_eager: eager `generate` for stock and P1..P8 at batch 1 and 8, 64 + 64 tokens.
- equality: the targets' P=8 case in float32, fast path (and the fast_* modes among `--target-modes`) against eager
  `generate` (greedy tokens).
- sampling: HumanEval's sampling workload on the 0.5B shape, P=1 and P=8: 8 prompts of 128 tokens × 20 completions,
  up to 512 new tokens, top-p 0.95 at temperature 0.8; completions/s and time to first token of `generate` and of the
  fast path (`--sampling-modes`: generate, fast, fast_dynamic, fast_uncompiled, fast_heads_copied, fast_fused; see
  benchmarks/sampling.py).
- selector: whether inductor compiles the sampling step's token choice for 160 rows of Qwen2.5's 151,936 logits
  (the failure seen on an H200 included), and its time per step compiled and eager.
- profile: torch.profiler tables of one P=8 training step (eager at the target shape, and at the sampling shape
  with decoder layers compiled, as the experiments train; and three steps of the experiments' Trainer, which needs
  TRL and datasets), of P=8 fast-path decoding at batch 1, and of 32 P=8
  fast-path steps of the sampling workload (OUT/profile_*.txt; `--profiles` picks some), each headed by its self
  time in families of kernels.
- train / train_masks: adapter training throughput (see benchmarks/training.py) for P = 1, 2, 4, 8 (`--train-P`), or
  for any training variants (`--train-variants`: P<n>, P<n>T<t>, lora); train_masks compares the training attention
  mask before (materialised) and after (lower-right causal bias) the flash-friendly change.
- train_loops: the same step taken by `--train-loops` (plain, under autocast, through `ParScaleSFTTrainer` as the
  experiments train, and that Trainer with the model's own loss; benchmarks/trainer_loop.py): what the Trainer adds.
  `--train-attention` takes the training suites' prefix attention through sdpa's plain causal kernels instead of the
  lower-right bias (benchmarks/padded_attention.py: "padded", "padded_flash", "padded_cudnn"), or the bias with
  FlashAttention-4 in place of sdpa's FlashAttention-2 ("bias_fa4", benchmarks/training.py).
- attention_accuracy: the training attention's output and query, key and value gradients at one layer's shape
  (P=8 streams of the 0.5B shape), for each of `--train-attention`'s "bias" and "bias_fa4", against float64 arithmetic
  (benchmarks/attention_accuracy.py).
Results are appended to OUT/results.jsonl; OUT/report.md and the plots are rebuilt from everything in it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

import torch
from transformers import CompileConfig

import peft_parscale  # noqa: F401  (registers the PARSCALE adapter type)
from peft_parscale.decode import DEFAULT_COMPILE_OPTIONS

from . import report
from .attention_accuracy import SHARPNESS, accuracy_refusal, attention_errors
from .decoding import FAST_MODES, decode_sweep
from .measure import device_ceilings, environment, free_memory
from .profiling import PROFILES, write_profiles
from .records import load_records
from .sampling import sampling_throughput, selector_compilation
from .training import (
    TRAIN_ATTENTIONS,
    TRAIN_COMPILE_MODES,
    TRAIN_LOOPS,
    flash_attention_impl_missing,
    train_throughput,
    training_setting_conflict,
)

ALL_VARIANTS = ["stock", "P1", "P2", "P4", "P8", "dense_P2", "dense_P4", "dense_P8"]
GPU_DEFAULTS = {
    "shapes": ["0.5b", "1.5b", "3b"],
    "target_shape": "1.5b",
    "variants": ALL_VARIANTS,
    "batches": [1, 2, 4, 8],
    "lengths": [(64, 64), (128, 128), (256, 256), (512, 512)],
    "target_length": (64, 128),
    "train_shapes": ["1.5b", "0.5b"],
    "train_P": [1, 2, 4, 8],
    "train_length": 2048,
    "train_batch": 1,
    "train_steps": 5,
    "train_warmup": 2,
    "sampling_shape": "0.5b",
    "sampling_variants": ["P1", "P8"],
    "sampling_workload": {"problems": 8, "samples": 20, "prompt": 128, "new_tokens": 512},
    "selector_logits": {"rows": 160, "vocab_size": 151936},
    # one decoder layer's training attention at the 0.5B shape, P=8: 8 stream rows, 14 heads, 2,048 tokens, T = 48
    "attention_shape": {"batch": 8, "heads": 14, "queries": 2048, "prefix": 48, "head_dim": 64},
}
TINY_DEFAULTS = {
    "shapes": ["tiny"],
    "target_shape": "tiny",
    "variants": ["stock", "P1", "P2", "dense_P2"],
    "batches": [1, 2],
    "lengths": [(8, 8)],
    "target_length": (8, 8),
    "train_shapes": ["tiny"],
    "train_P": [1, 2],
    "train_length": 32,
    "train_batch": 1,
    "train_steps": 2,
    "train_warmup": 1,
    "sampling_shape": "tiny",
    "sampling_variants": ["P1", "P8"],
    "sampling_workload": {"problems": 2, "samples": 3, "prompt": 8, "new_tokens": 8},
    "selector_logits": {"rows": 4, "vocab_size": 3000},  # longer than one chunk of the chunked scan
    "attention_shape": {"batch": 1, "heads": 2, "queries": 16, "prefix": 4, "head_dim": 8},
}


def parse_lengths(text: str) -> list[tuple[int, int]]:
    """ "64:64,128:128" -> [(64, 64), (128, 128)] (prompt:new tokens)."""
    return [tuple(int(part) for part in item.split(":")) for item in text.split(",")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes and grids (seconds; what CI runs)")
    parser.add_argument("--out", required=True, help="folder for results.jsonl, report.md and plots")
    parser.add_argument("--suites", default="env,targets,sweep,sweep_eager,train")
    parser.add_argument("--shapes", help="comma-separated shapes for the sweeps (0.5b,1.5b,3b)")
    parser.add_argument("--variants", help="comma-separated variants for the sweep (stock,P1,...,dense_P8)")
    parser.add_argument("--batches", help="comma-separated batch sizes for the sweep")
    parser.add_argument("--lengths", help="prompt:new pairs for the sweep, e.g. 64:64,512:512")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (median); 2, or 1 when tiny")
    parser.add_argument(
        "--static-sweep", action="store_true", help="compile the sweep's step for each case's static shapes"
    )
    parser.add_argument("--train-shapes")
    parser.add_argument("--train-P", help="comma-separated numbers of streams: the variants P<n>")
    parser.add_argument(
        "--train-variants", help="comma-separated training variants instead (P<n>, P<n>T<t>, lora; --train-P's P<n>)"
    )
    parser.add_argument(
        "--train-init-std",
        type=float,
        help="training suites: the ParScale adapters' init_std (prefixes, aggregator) instead of the config's 0.02",
    )
    parser.add_argument("--train-length", type=int)
    parser.add_argument("--train-batch", type=int)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--train-compile", default="none", help=f"comma-separated: {', '.join(TRAIN_COMPILE_MODES)}")
    parser.add_argument(
        "--train-loops", default=",".join(TRAIN_LOOPS), help=f"train_loops suite: any of {', '.join(TRAIN_LOOPS)}"
    )
    parser.add_argument(
        "--train-attention", default="bias", help=f"training suites, comma-separated: {', '.join(TRAIN_ATTENTIONS)}"
    )
    parser.add_argument(
        "--target-modes",
        default="eager,generate_static,fast",
        help="targets suite: any of eager, generate_static, fast, fast_frozen, fast_autotune, fast_frozen_autotune, "
        "fast_fused, fast_prefill (tokens are compared with eager when it comes first)",
    )
    parser.add_argument(
        "--sampling-modes",
        default="generate,fast",
        help="sampling suite: any of generate, fast, fast_dynamic, fast_uncompiled, fast_heads_copied, fast_fused",
    )
    parser.add_argument("--profiles", default=",".join(PROFILES), help=f"profile suite: any of {', '.join(PROFILES)}")
    parser.add_argument("--no-report", action="store_true", help="only append to results.jsonl")
    args = parser.parse_args(argv)
    for flag, value, known in (
        ("--target-modes", args.target_modes, {"eager", "generate_static", "fast", *FAST_MODES}),
        ("--train-compile", args.train_compile, set(TRAIN_COMPILE_MODES)),
        ("--train-loops", args.train_loops, set(TRAIN_LOOPS)),
        ("--train-attention", args.train_attention, set(TRAIN_ATTENTIONS)),
        ("--profiles", args.profiles, set(PROFILES)),
    ):
        unknown = set(value.split(",")) - known
        if unknown:
            parser.error(f"unknown {flag} {', '.join(sorted(unknown))}")
    if args.train_init_std is not None:
        if not args.train_init_std > 0:
            parser.error(f"--train-init-std must be positive, got {args.train_init_std}")
        if "lora" in (args.train_variants or "").split(","):
            parser.error("--train-init-std sets ParScale adapters' initialisation; the 'lora' variant has none")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    defaults = TINY_DEFAULTS if args.tiny else GPU_DEFAULTS
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    on_gpu = device.type == "cuda"
    # Every shape, adapter and variant compiles the decode step again; dynamo's default limit (8) would silently
    # fall back to uncompiled code part-way through a sweep.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 1 << 16

    shapes = args.shapes.split(",") if args.shapes else defaults["shapes"]
    variants = args.variants.split(",") if args.variants else defaults["variants"]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else defaults["batches"]
    lengths = parse_lengths(args.lengths) if args.lengths else defaults["lengths"]
    repeats = args.repeats or (1 if args.tiny else 2)
    static_options = DEFAULT_COMPILE_OPTIONS if on_gpu else None
    sweep_options = static_options if args.static_sweep or not on_gpu else {**static_options, "dynamic": True}
    compile_per_case = args.static_sweep and on_gpu

    if on_gpu:  # cuBLAS keeps a workspace per stream from its first use on: take it before any memory is measured
        torch.ones(64, 64, device=device, dtype=dtype) @ torch.ones(64, 64, device=device, dtype=dtype)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    # what every record of this invocation shares: times from one call compare as ratios, across calls they drift
    invocation = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")

    def emit(record: dict[str, Any]) -> None:
        record = {**record, "device_name": torch.cuda.get_device_name() if on_gpu else "cpu", "invocation": invocation}
        with open(results_path, "a") as results:
            results.write(json.dumps(record) + "\n")
        summary = {
            k: record[k]
            for k in ("suite", "shape", "variant", "mode", "batch", "P", "compiled", "error")
            if k in record
        }
        numbers = {k: round(v, 3) for k, v in record.items() if isinstance(v, float)}
        print(json.dumps({**summary, **numbers}), flush=True)

    sweep_common = {"device": device, "dtype": dtype, "repeats": repeats, "emit": emit}
    for suite in args.suites.split(","):
        started = time.perf_counter()
        if suite == "env":
            emit({"suite": "env", **environment(device), **device_ceilings(device)})
        elif suite == "targets":
            common = {
                "lengths": [defaults["target_length"]],
                "modes": args.target_modes.split(","),
                "fast_compile_options": static_options,
                "generate_compile_config": CompileConfig(),
            }
            cases = [(["stock"], 8), (["P1", "P8"], 1)]
            if args.variants or args.batches:
                cases = [(variants, batch) for batch in batches]
            # One batch size per call: compiled graphs are dropped between calls, so that a second batch size does
            # not recompile with a dynamic batch dimension (torch.compile's automatic dynamic shapes).
            for target_variants, target_batch in cases:
                decode_sweep(
                    defaults["target_shape"],
                    target_variants,
                    [target_batch],
                    **common,
                    **sweep_common,
                    suite="targets",
                    compare_tokens=True,
                )
        elif suite == "profile":
            profiled = (defaults["target_shape"], defaults["sampling_shape"], defaults["sampling_workload"])
            write_profiles(args.out, *profiled, device, dtype, args.tiny, tuple(args.profiles.split(",")))
        elif suite == "equality":
            # Greedy tokens of the fast path against eager generate in float32, where ties are out of reach.
            decode_sweep(
                defaults["target_shape"],
                ["P8"],
                [1],
                [defaults["target_length"]],
                ["eager", "fast", *(mode for mode in args.target_modes.split(",") if mode in FAST_MODES)],
                fast_compile_options=static_options,
                generate_compile_config=None,
                suite="equality",
                compare_tokens=True,
                **{**sweep_common, "dtype": torch.float32},
            )
        elif suite == "sweep":
            for shape in shapes:
                decode_sweep(
                    shape,
                    variants,
                    batches,
                    lengths,
                    ["fast"],
                    fast_compile_options=sweep_options,
                    generate_compile_config=None,
                    compile_per_case=compile_per_case,
                    **sweep_common,
                )
        elif suite == "sweep_eager":
            eager_variants = [v for v in variants if not v.startswith("dense")]
            for shape in shapes:
                decode_sweep(
                    shape,
                    eager_variants,
                    [batches[0], batches[-1]],
                    [lengths[0]],
                    ["eager"],
                    fast_compile_options=None,
                    generate_compile_config=None,
                    suite="sweep_eager",
                    **sweep_common,
                )
        elif suite == "attention_accuracy":
            attentions = args.train_attention.split(",")
            for attention in attentions:  # refused before any is measured
                refusal = accuracy_refusal(attention, device)
                if refusal:
                    raise SystemExit(refusal)
            shape = defaults["attention_shape"]
            for attention in attentions:
                for sharpness in SHARPNESS:
                    emit(attention_errors(attention, **shape, sharpness=sharpness, device=device, dtype=dtype))
        elif suite == "selector":
            selector_compilation(device, dtype, emit, **defaults["selector_logits"])
        elif suite == "sampling":
            for shape in args.shapes.split(",") if args.shapes else [defaults["sampling_shape"]]:
                sampling_throughput(
                    shape,
                    args.variants.split(",") if args.variants else defaults["sampling_variants"],
                    **defaults["sampling_workload"],
                    modes=args.sampling_modes.split(","),
                    **sweep_common,
                )
        elif suite in report.TRAINING_SUITES:
            train_shapes = args.train_shapes.split(",") if args.train_shapes else defaults["train_shapes"]
            train_P = [int(p) for p in args.train_P.split(",")] if args.train_P else defaults["train_P"]
            variants = args.train_variants.split(",") if args.train_variants else [f"P{p}" for p in train_P]
            masks = ["materialised", "lower_right"] if suite == "train_masks" else ["lower_right"]
            loops = args.train_loops.split(",") if suite == "train_loops" else ["plain"]
            settings = [
                (mask, compile_mode, loop, attention)
                for mask in masks
                for compile_mode in args.train_compile.split(",")
                for loop in loops
                for attention in args.train_attention.split(",")
            ]
            for mask, compile_mode, loop, attention in settings:  # refused before any is measured
                conflict = training_setting_conflict(attention, mask, compile_mode, loop, dtype)
                conflict = conflict or flash_attention_impl_missing(attention, device)
                if conflict:
                    raise SystemExit(conflict)
            # One untimed measurement first: a process's first one can also pay for warming the device and its
            # libraries (run I timed P=1 first at 21,246 tokens/s; the same P=1 later that day, 23,616).
            length, batch = args.train_length or defaults["train_length"], args.train_batch or defaults["train_batch"]
            train_throughput(
                train_shapes[0], variants[0], length, batch, device, dtype, steps=1, warmup=1,
                gradient_checkpointing=args.gradient_checkpointing,
            )  # fmt: skip
            free_memory(device)
            for shape in train_shapes:
                for variant in variants:
                    for mask, compile_mode, loop, attention in settings:
                        emit(
                            train_throughput(
                                shape,
                                variant,
                                length,
                                batch,
                                device,
                                dtype,
                                steps=defaults["train_steps"],
                                warmup=defaults["train_warmup"],
                                gradient_checkpointing=args.gradient_checkpointing,
                                mask=mask,
                                compile=compile_mode,
                                loop=loop,
                                attention=attention,
                                init_std=args.train_init_std,
                            )
                            | {"suite": suite}
                        )
                        torch._dynamo.reset()  # the next variant compiles afresh, for static shapes
                        free_memory(device)
        else:
            raise SystemExit(f"Unknown suite {suite!r}.")
        print(f"# {suite}: {time.perf_counter() - started:.1f} s", flush=True)

    if not args.no_report:
        report.write_report(load_records([results_path]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
