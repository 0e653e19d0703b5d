"""Decoding benchmarks: latency per token, prefill time and peak memory of greedy generation.

Three ways to generate, all greedy, on random prompts without padding:
- `eager`: `model.generate(...)` with the default dynamic cache, no compilation.
- `generate_static`: `model.generate(..., cache_implementation="static")`, which transformers compiles by itself on
  CUDA (`torch.compile`, mode "reduce-overhead": CUDA graphs) for the decode steps.
- `fast`: `peft_parscale.decode.greedy_generate` (the fast path: static cache, compiled decode step, no host waits).
- `fast_frozen`, `fast_autotune`, `fast_frozen_autotune`: the fast path with its decode step compiled under other
  inductor settings (`FAST_MODE_OPTIONS`), the compiler-side levers for decode latency, measured beside `fast`.
- `fast_fused`: the fast path with the query/key/value and gate/up products run as one product each, over a copy of
  their weights stacked (`fast_generate`'s `fuse_projections`), the same lever by hand.
- `fast_prefill`: the fast path with the prompts' forward pass compiled too (`fast_generate`'s
  `prefill_compile_options`, `PREFILL_COMPILE_OPTIONS`), for the time to the first token (`prefill_ms`).

Variants of a shape: `stock` (the base model, no adapter), `P<n>` (a fresh ParScale adapter with P = n and the default
prefix length), `P<n>T<t>` (the same with T = t: the single streams with a longer prefix that the HumanEval experiment
compares with), and `dense_P<n>` (the dense model of the quality the scaling law gives P = n:
`shapes.dense_equivalent`).

ms/token is the decode time per token after the first: for `generate`, the time between the logits of the first and
the last new token over (n - 1); for `fast`, (total - prefill) / (n - 1), with the prefill timed on its own on the same
cache. Peak memory of `fast` is measured with the decode step uncompiled (prefill and two steps on the full-length
static cache): CUDA-graph memory pools, which the compiled step adds and keeps across shapes, are not counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import CompileConfig, LogitsProcessorList

from peft_parscale import ParScaleConfig
from peft_parscale.decode import (
    GREEDY,
    FastDecoder,
    causal_lm_of,
    fast_decoder,
    forget_fast_decoder,
    greedy_generate,
)

from .measure import (
    Clock,
    DeviceState,
    StepMarks,
    allocated_gib,
    free_memory,
    median,
    parameter_bytes,
    peak_memory_gib,
    random_causal_lm,
    reset_peak_memory,
)
from .shapes import dense_equivalent, non_embedding_parameters, shape_config

Record = dict[str, Any]

# Other compilations of the fast path's decode step, passed through `fast_generate`'s public `compile_options`.
# torch.compile takes inductor settings in `options` but not together with `mode`, so CUDA graphs (what
# "reduce-overhead" turns on, as `fast` has) are asked for by name.
FAST_MODE_OPTIONS: dict[str, dict[str, Any]] = {
    # weights become constants of the graph, so inductor's freezing passes can fuse the q/k/v products (and gate/up)
    # that read the same input into one product each
    "fast_frozen": {"fullgraph": True, "options": {"triton.cudagraphs": True, "freezing": True}},
    # kernels for the decode step's few rows chosen by timing candidates, as mode "max-autotune" does
    "fast_autotune": {"fullgraph": True, "options": {"triton.cudagraphs": True, "max_autotune": True}},
    "fast_frozen_autotune": {
        "fullgraph": True,
        "options": {"triton.cudagraphs": True, "freezing": True, "max_autotune": True},
    },
}
# The fast path (its compile options) with the products that read one input run as one (`fuse_projections`)
FUSED_MODE = "fast_fused"
# The fast path with its prefill compiled as well: inductor's kernels without CUDA graphs, whose memory pools would stay
# reserved for every prompt shape
PREFILL_MODE = "fast_prefill"
PREFILL_COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": True}
FAST_MODES = (*FAST_MODE_OPTIONS, FUSED_MODE, PREFILL_MODE)


def build_variant(shape: str, variant: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Record]:
    """The model of one variant (see the module docstring) and what describes it."""
    match = re.fullmatch(r"P(\d+)(?:T(\d+))?|dense_P(\d+)|stock", variant)
    if match is None:
        raise ValueError(f"Unknown variant {variant!r}: use 'stock', 'P<n>', 'P<n>T<t>' or 'dense_P<n>'.")
    dense = match.group(3) is not None
    streams = int(match.group(1) or match.group(3) or 1)
    adapter = ParScaleConfig(P=streams, **({"prefix_length": int(match.group(2))} if match.group(2) else {}))
    config = dense_equivalent(shape, streams) if dense else shape_config(shape)
    model = random_causal_lm(config, device, dtype)
    info = {
        "shape": shape,
        "variant": variant,
        "P": 1 if dense or variant == "stock" else streams,
        "non_embedding_params": non_embedding_parameters(config),
        "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size,
    }
    if variant.startswith("P"):
        # Adapter weights in the model's dtype, as served; PEFT's default casts them to float32 (for training).
        model = get_peft_model(model, adapter, autocast_adapter_dtype=False).eval()
        info["prefix_length"] = adapter.prefix_length
        info["adapter_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["weights_gib"] = parameter_bytes(model) / 2**30
    return model, info


def random_prompts(batch_size: int, length: int, vocab_size: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (batch_size, length), generator=generator).to(device)
    return input_ids, torch.ones_like(input_ids)


def token_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> Record:
    """How far two generations agree: equal or not, the fraction of equal new tokens, the first differing step."""
    if reference.shape != candidate.shape:
        return {"equal": False, "matching_fraction": None, "first_difference": None}
    differs = (reference != candidate).any(0).nonzero()
    return {
        "equal": bool(differs.numel() == 0),
        "matching_fraction": float((reference == candidate).float().mean()),
        "first_difference": None if differs.numel() == 0 else int(differs[0]),
    }


def measure_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int,
    repeats: int,
    static: bool,
    compile_config: CompileConfig | None = None,
) -> tuple[Record, torch.Tensor]:
    """`model.generate` with a dynamic (eager) or static (compiled on CUDA) cache: one warm-up, then `repeats` runs."""
    device = input_ids.device
    clock = Clock(device)
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    if static:
        kwargs.update(cache_implementation="static", compile_config=compile_config)

    def generate(processors: list) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_processor=LogitsProcessorList(processors),
                **kwargs,
            )

    _, warmup_ms = clock.time_ms(lambda: generate([]))
    runs = []
    reset_peak_memory(device)
    for _ in range(repeats):
        steps = StepMarks(clock)
        start = clock.mark()
        tokens = generate([steps])
        total_ms = clock.elapsed_ms(start, clock.mark())
        first_ms, last_ms = (clock.elapsed_ms(start, mark) for mark in (steps.marks[0], steps.marks[-1]))
        runs.append((first_ms, (last_ms - first_ms) / max(new_tokens - 1, 1), total_ms))
    record = {
        "prefill_ms": median([run[0] for run in runs]),
        "decode_ms_per_token": median([run[1] for run in runs]),
        "total_ms": median([run[2] for run in runs]),
        "warmup_s": warmup_ms / 1e3,
        "peak_mem_gib": peak_memory_gib(device),
    }
    return record, tokens


def measure_fast_memory(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> Record:
    """Peak memory of the fast path's cache and activations: prefill and two steps, the step uncompiled."""
    device = input_ids.device
    forget_fast_decoder(model)
    free_memory(device)
    before = allocated_gib(device)
    reset_peak_memory(device)
    decoder = FastDecoder(causal_lm_of(model), input_ids.shape[0], input_ids.shape[1] + new_tokens, GREEDY, None)
    decoder.run(input_ids, attention_mask, 3)
    peak = peak_memory_gib(device)
    del decoder
    free_memory(device)
    return {"peak_mem_gib": peak, "allocated_before_gib": before}


def measure_fast(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int,
    repeats: int,
    compile_options: dict[str, Any] | None,
    fuse_projections: bool = False,
    prefill_compile_options: dict[str, Any] | None = None,
) -> tuple[Record, torch.Tensor]:
    """`greedy_generate`: a warm-up of four tokens on the same cache (compilation, CUDA-graph recording), `repeats`
    timed runs, three prefills.

    The record keeps every timed run (`total_ms_runs`), how many times inductor declined to record a CUDA graph in
    this case (`cudagraph_skips`, torch's own counter) and, on a GPU, its clock, load, power and temperature during
    each timed run (`device_state_runs`, `DeviceState`): two calls have disagreed on P=8 while agreeing on P=1, and
    two runs of one case by more than the streams cost (BENCHMARKS.md, runs P, R and S); these tell a slowed card or
    a host that fell behind from a step that ran without its CUDA graph."""
    clock = Clock(input_ids.device)
    compile = compile_options is not None
    skips_before = counters["inductor"]["cudagraph_skips"]
    batch_size, prompt_length = input_ids.shape
    options = (compile, compile_options, fuse_projections, prefill_compile_options)
    decoder = fast_decoder(model, batch_size, prompt_length + new_tokens, GREEDY, *options)
    _, warmup_ms = clock.time_ms(lambda: decoder.run(input_ids, attention_mask, min(new_tokens, 4)))

    def generate() -> torch.Tensor:
        return greedy_generate(
            model,
            input_ids,
            attention_mask,
            new_tokens,
            compile=compile,
            compile_options=compile_options,
            fuse_projections=fuse_projections,
            prefill_compile_options=prefill_compile_options,
        )

    totals, states = [], []
    for _ in range(repeats):
        with DeviceState(input_ids.device) as state:
            tokens, total_ms = clock.time_ms(generate)
        totals.append(total_ms)
        states.append(state.summary())
    prefill_ms = median([clock.time_ms(lambda: decoder.prefill(input_ids, attention_mask))[1] for _ in range(3)])
    total_ms = median(totals)
    record = {
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": (total_ms - prefill_ms) / max(new_tokens - 1, 1),
        "total_ms": total_ms,
        "total_ms_runs": totals,
        "warmup_s": warmup_ms / 1e3,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before,
    }
    if decoder.fused is not None:
        record["fused_groups"] = len(decoder.fused)
    if any(states):
        record["device_state_runs"] = states
    return record, tokens


def decode_sweep(
    shape: str,
    variants: list[str],
    batch_sizes: list[int],
    lengths: list[tuple[int, int]],
    modes: list[str],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    fast_compile_options: dict[str, Any] | None,
    generate_compile_config: CompileConfig | None,
    emit: Callable[[Record], None],
    suite: str = "decode",
    compare_tokens: bool = False,
    compile_per_case: bool = False,
) -> None:
    """Measure every (variant, batch size, (prompt, new tokens), mode) of one shape; `emit` each record.

    For each variant, memory is measured first for every case (before any compiled graph holds memory), then the
    timings. With `compare_tokens`, each mode's tokens are compared with the `eager` mode's (which must come first).
    With `compile_per_case`, compiled graphs are dropped after each case, so that every case is compiled for its own
    static shapes (otherwise torch.compile's automatic dynamic shapes recompile the second shape with dynamic sizes).
    """
    for variant in variants:
        model, info = build_variant(shape, variant, device, dtype)
        vocab_size = model.config.vocab_size
        cases = [(batch, prompt, new) for batch in batch_sizes for prompt, new in lengths]
        memory = {}
        if "fast" in modes:
            for batch, prompt, new in cases:
                input_ids, attention_mask = random_prompts(batch, prompt, vocab_size, device)
                memory[batch, prompt, new] = measure_fast_memory(model, input_ids, attention_mask, new)
        for batch, prompt, new in cases:
            input_ids, attention_mask = random_prompts(batch, prompt, vocab_size, device)
            reference = None
            for mode in modes:
                if mode == "fast":
                    record, tokens = measure_fast(model, input_ids, attention_mask, new, repeats, fast_compile_options)
                    record.update(memory[batch, prompt, new])
                elif mode in FAST_MODE_OPTIONS:
                    options = FAST_MODE_OPTIONS[mode]
                    record, tokens = measure_fast(model, input_ids, attention_mask, new, repeats, options)
                elif mode == FUSED_MODE:
                    # compiled on its own, and its copy of the weights freed after it, so that the next case is not
                    # measured beside it
                    forget_fast_decoder(model)
                    torch._dynamo.reset()
                    record, tokens = measure_fast(
                        model, input_ids, attention_mask, new, repeats, fast_compile_options, fuse_projections=True
                    )
                    forget_fast_decoder(model)
                    torch._dynamo.reset()
                elif mode == PREFILL_MODE:
                    record, tokens = measure_fast(
                        model,
                        input_ids,
                        attention_mask,
                        new,
                        repeats,
                        fast_compile_options,
                        prefill_compile_options=PREFILL_COMPILE_OPTIONS,
                    )
                else:
                    static = mode == "generate_static"
                    config = generate_compile_config if static else None
                    record, tokens = measure_generate(model, input_ids, attention_mask, new, repeats, static, config)
                if compare_tokens:
                    if mode == "eager":
                        reference = tokens
                    elif reference is not None:
                        record["tokens_vs_eager"] = token_agreement(reference, tokens)
                emit(
                    {
                        "suite": suite,
                        **info,
                        "mode": mode,
                        "dtype": str(dtype).removeprefix("torch."),
                        "batch": batch,
                        "prompt": prompt,
                        "new_tokens": new,
                        **record,
                    }
                )
            if compile_per_case:
                forget_fast_decoder(model)
                torch._dynamo.reset()
        forget_fast_decoder(model)
        del model
        torch._dynamo.reset()  # drops compiled graphs (and the models they hold) before the next variant
        free_memory(device)
