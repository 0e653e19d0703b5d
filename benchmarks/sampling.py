"""Sampling throughput for HumanEval's workload: completions per second and time to first token.

One batch of `problems` random prompts of `prompt` tokens, `samples` completions each (`num_return_sequences`, so
each prompt's completions are consecutive rows), up to `new_tokens` new tokens, with the nucleus sampling that
`peft_parscale.humaneval` uses for pass@k (temperature 0.8, top-p 0.95, no top-k). Modes:
- `generate`: `model.generate` (dynamic cache, eager, `torch.multinomial`);
- `fast`: `peft_parscale.decode.fast_generate` (static cache; on CUDA the step compiled for static shapes, CUDA graphs),
  as `evaluate_humaneval` compiles it (one shape for every batch of a run);
- `fast_dynamic`: the same, the step compiled for dynamic shapes, as `evaluate_humaneval` compiled it until 2026-12-05
  (one compilation for batches of every shape): the side-by-side baseline of that change, for its compilation time;
- `fast_uncompiled`: the same loop with the step run eagerly (what `fast_generate(..., compile=False)` does);
- `fast_fused`: `fast` with `fuse_projections=True` (each layer's query, key and value products run as one, and its
  gate and up products), the option that shortened greedy decoding at batch 1 and 8 (BENCHMARKS.md);
- `fast_heads_copied`: `fast` with transformers' own sdpa attention in the decode step, which copies every key/value
  head once per query head of its group (`repeat_kv`), instead of `peft_parscale.decode_attention`'s packing: the
  side-by-side baseline of that change.

completions/s is the batch's rows over the whole generation's time (prefill included); time to first token is the
prefill: for `fast`, timed on its own on the same cache; for `generate`, until the first token's logits. No
end-of-sequence id is set and random weights do not stop by themselves, so every completion runs the full
`new_tokens`: an upper bound on a HumanEval batch, which ends with its longest completion (real completions stop at
their stop sequences, and the fast path stops at its first check after the last one, every 32 steps).

A mode that raises is recorded with its error and the next one runs, so that one device call still measures the rest
(the compiled sampling step once failed to compile on a GPU). `selector_compilation` checks that compilation alone.
"""

from __future__ import annotations

import contextlib
import copy
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface, GenerationConfig, LogitsProcessorList
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peft_parscale.decode import DEFAULT_COMPILE_OPTIONS, causal_lm_of, fast_decoder, fast_generate, forget_fast_decoder
from peft_parscale.decode_attention import PACKED_GQA_SDPA, packed_gqa_sdpa
from peft_parscale.sampling import GREEDY, TokenSelector, draw_uniforms

from .decoding import build_variant, random_prompts
from .measure import Clock, StepMarks, free_memory, median, peak_memory_gib, reset_peak_memory

Record = dict[str, Any]
# The fast path's modes and their compile options on CUDA (on CPU every mode runs uncompiled).
COMPILE_OPTIONS = {
    "fast": DEFAULT_COMPILE_OPTIONS,
    "fast_dynamic": {**DEFAULT_COMPILE_OPTIONS, "dynamic": True},
    "fast_uncompiled": None,
    "fast_heads_copied": DEFAULT_COMPILE_OPTIONS,
    "fast_fused": DEFAULT_COMPILE_OPTIONS,
}
MODES = ("generate", *COMPILE_OPTIONS)
GREEDY_ROWS = (1, 8)  # the rows of a decode step at batch 1 and 8 (P=1 and P=8 alike: the streams are aggregated)


def failure(error: Exception) -> Record:
    """The record of a measurement that raised `error`; its traceback goes to stderr (the device call's output)."""
    traceback.print_exc()
    return {"error": f"{type(error).__name__}: {error}"[:2000]}


@contextlib.contextmanager
def heads_copied() -> Iterator[None]:
    """The fast path's decode attention as transformers' sdpa attention computes it (see `fast_heads_copied`); each
    mode compiles its step afresh, so the swap reaches the compiled step."""
    AttentionInterface.register(PACKED_GQA_SDPA, sdpa_attention_forward)
    try:
        yield
    finally:
        AttentionInterface.register(PACKED_GQA_SDPA, packed_gqa_sdpa)


def humaneval_sampling(new_tokens: int, samples: int) -> GenerationConfig:
    """`peft_parscale.humaneval`'s sampling settings, without an end of sequence."""
    return GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=0,
        num_return_sequences=samples,
        repetition_penalty=1.0,
        pad_token_id=0,
    )


def measure_generate_sampling(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig, repeats: int
) -> Record:
    """`model.generate`: a warm-up of two tokens, then `repeats` timed runs."""
    clock = Clock(input_ids.device)

    def generate(marks: list, generation_config: GenerationConfig = config) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=generation_config,
                logits_processor=LogitsProcessorList(marks),
            )

    warmup = copy.deepcopy(config)
    warmup.max_new_tokens = 2
    _, warmup_ms = clock.time_ms(lambda: generate([], warmup))
    first_token, totals = [], []
    for _ in range(repeats):
        steps = StepMarks(clock)
        start = clock.mark()
        generate([steps])
        totals.append(clock.elapsed_ms(start, clock.mark()))
        first_token.append(clock.elapsed_ms(start, steps.marks[0]))
    return {"ttft_ms": median(first_token), "total_ms": median(totals), "warmup_s": warmup_ms / 1e3}


def sampling_decoder(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    compile_options: dict[str, Any] | None,
    fuse_projections: bool = False,
) -> tuple[Any, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The fast path's decoder for `config`'s samples of every prompt (a cache as long as the whole generation), the
    prompts repeated once per sample, and the uniform numbers of every step (seed 0)."""
    device = input_ids.device
    samples, new_tokens = config.num_return_sequences, config.max_new_tokens
    rows, length = input_ids.shape[0] * samples, input_ids.shape[1] + new_tokens
    selector = TokenSelector.from_generation_config(config)
    compile = compile_options is not None
    decoder = fast_decoder(model, rows, length, selector, compile, compile_options, fuse_projections)
    rows_ids, rows_mask = (tensor.repeat_interleave(samples, dim=0) for tensor in (input_ids, attention_mask))
    uniforms = draw_uniforms(torch.Generator(device).manual_seed(0), rows, new_tokens, device)
    return decoder, rows_ids, rows_mask, uniforms


def measure_fast_sampling(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    repeats: int,
    compile_options: dict[str, Any] | None,
    fuse_projections: bool = False,
) -> Record:
    """`fast_generate`: a warm-up of four tokens on the same cache (compilation, CUDA-graph recording), `repeats` timed
    runs, three prefills."""
    device = input_ids.device
    clock = Clock(device)
    compile = compile_options is not None
    new_tokens = config.max_new_tokens
    decoder, rows_ids, rows_mask, uniforms = sampling_decoder(
        model, input_ids, attention_mask, config, compile_options, fuse_projections
    )
    _, warmup_ms = clock.time_ms(lambda: decoder.run(rows_ids, rows_mask, min(new_tokens, 4), uniforms))

    def generate() -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        return fast_generate(
            model,
            input_ids,
            attention_mask,
            config,
            generator,
            compile=compile,
            compile_options=compile_options,
            fuse_projections=fuse_projections,
        )

    totals = [clock.time_ms(generate)[1] for _ in range(repeats)]
    prefills = [clock.time_ms(lambda: decoder.prefill(rows_ids, rows_mask, uniforms[0]))[1] for _ in range(3)]
    record = {"ttft_ms": median(prefills), "total_ms": median(totals), "warmup_s": warmup_ms / 1e3}
    # whether the timed generations' decoder (the one kept on the model) ran the fused products
    return record | {"fused_projections": causal_lm_of(model)._parscale_fast_decoder.fused is not None}


def sampling_throughput(
    shape: str,
    variants: list[str],
    problems: int,
    samples: int,
    prompt: int,
    new_tokens: int,
    modes: list[str],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    emit: Callable[[Record], None],
) -> None:
    """Measure every (variant, mode) on one batch of the HumanEval workload; `emit` each record (a mode that raises:
    its error)."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"Unknown sampling modes {sorted(unknown)}: use any of {MODES}.")
    config = humaneval_sampling(new_tokens, samples)
    rows = problems * samples
    for variant in variants:
        model, info = build_variant(shape, variant, device, dtype)
        input_ids, attention_mask = random_prompts(problems, prompt, model.config.vocab_size, device)
        for mode in modes:
            reset_peak_memory(device)
            case = {
                "suite": "sampling",
                **info,
                "mode": mode,
                "dtype": str(dtype).removeprefix("torch."),
                "problems": problems,
                "samples_per_problem": samples,
                "batch": rows,
                "prompt": prompt,
                "new_tokens": new_tokens,
            }
            try:
                if mode == "generate":
                    record = measure_generate_sampling(model, input_ids, attention_mask, config, repeats)
                else:
                    options = COMPILE_OPTIONS[mode] if device.type == "cuda" else None
                    with heads_copied() if mode == "fast_heads_copied" else contextlib.nullcontext():
                        fuse = mode == "fast_fused"
                        record = measure_fast_sampling(model, input_ids, attention_mask, config, repeats, options, fuse)
            except Exception as error:  # noqa: BLE001  (recorded, so that the other modes of one device call still run)
                emit({**case, **failure(error)})
            else:
                seconds = record["total_ms"] / 1e3
                emit(
                    {
                        **case,
                        **record,
                        "completions_per_s": rows / seconds,
                        "new_tokens_per_s": rows * new_tokens / seconds,
                        "peak_mem_gib": peak_memory_gib(device),
                    }
                )
            forget_fast_decoder(model)
            torch._dynamo.reset()  # each mode compiles afresh, with its own options
            free_memory(device)
        del model
        free_memory(device)


def selector_compilation(
    device: torch.device,
    dtype: torch.dtype,
    emit: Callable[[Record], None],
    rows: int = 160,
    vocab_size: int = 151936,
    repeats: int = 20,
) -> None:
    """Whether inductor compiles the sampling step's token choice for `rows` × `vocab_size` logits, and its time.

    One record per case: `long_scan`, top-p's sort, softmax and one cumulative sum over the whole vocabulary (the scan
    whose code generation failed with torch 2.11 on an H200); `selector`, `TokenSelector` with HumanEval's settings
    (temperature 0.8, top-p 0.95), compiled for static shapes; `selector_dynamic`, compiled with a dynamic number of
    rows, as the step `evaluate_humaneval` compiled it until 2026-12-05; `selector_top_k`, the same with top-k 50
    before top-p (the one sampling setting HumanEval's workload does not use); `selector_eager`, HumanEval's choice
    uncompiled. Compiled cases record `compiled` (and the error if not), the compilation time, ms per call (the median
    of `repeats`) and the fraction of tokens equal to the same choice's uncompiled.

    Then greedy's choice for the rows of a decode step at batch 1 and 8 (`GREEDY_ROWS`): `argmax`, a plain
    `argmax(-1)`, against `greedy`, the fast path's `GREEDY` (`sampling.first_argmax`), each compiled. On CUDA their
    ms per call is the kernels' alone: a CUDA graph of `repeats` calls, replayed (a call launched from the host
    takes longer than these kernels run), which their records say (`timing`). `tokens_equal_fraction` is against the
    uncompiled `argmax(-1)`.
    """
    clock = Clock(device)
    generator = torch.Generator(device).manual_seed(0)
    logits = (4 * torch.randn(rows, vocab_size, generator=generator, device=device)).to(dtype)
    uniforms = torch.rand(rows, generator=generator, device=device)
    selector = TokenSelector(do_sample=True, temperature=0.8, top_p=0.95)
    top_k_selector = TokenSelector(do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
    common = {"suite": "selector", "rows": rows, "vocab_size": vocab_size, "dtype": str(dtype).removeprefix("torch.")}

    def per_call_ms(function: Callable[..., Any], *inputs: torch.Tensor) -> float:
        function(*inputs)
        return median([clock.time_ms(lambda: function(*inputs))[1] for _ in range(repeats)])

    emit({**common, "variant": "selector_eager", "ms_per_call": per_call_ms(selector, logits, uniforms)})
    dynamic_logits, dynamic_uniforms = logits.clone(), uniforms.clone()
    torch._dynamo.mark_dynamic(dynamic_logits, 0)
    torch._dynamo.mark_dynamic(dynamic_uniforms, 0)

    def long_scan(scores: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return scores.float().sort(-1).values.softmax(-1).cumsum(-1)

    def plain_argmax(scores: torch.Tensor) -> torch.Tensor:
        return scores.argmax(-1)

    # Each case: its record's own fields, the function compiled, its inputs, and the uncompiled choice whose tokens
    # its tokens are compared with (none for the scan, which chooses none).
    cases = [
        ({"variant": "long_scan"}, long_scan, (logits, uniforms), None),
        ({"variant": "selector"}, selector, (logits, uniforms), selector),
        ({"variant": "selector_dynamic"}, selector, (dynamic_logits, dynamic_uniforms), selector),
        ({"variant": "selector_top_k"}, top_k_selector, (logits, uniforms), top_k_selector),
    ]
    # on CUDA the greedy choices' kernels alone (a CUDA graph's replays), on a CPU each call as the cases above
    timing = "cuda_graph" if clock.cuda else "call"
    for greedy_rows in sorted({min(rows, count) for count in GREEDY_ROWS}):
        rows_logits = logits[:greedy_rows].clone()
        for name, function in {"argmax": plain_argmax, "greedy": lambda scores: GREEDY(scores, None)}.items():
            fields = {"variant": name, "rows": greedy_rows, "timing": timing}
            cases.append((fields, function, (rows_logits,), plain_argmax))

    def compile_and_run(function: Callable[..., Any], *inputs: torch.Tensor) -> tuple[Callable[..., Any], Any, float]:
        compiled = torch.compile(function, fullgraph=True)
        output, milliseconds = clock.time_ms(lambda: compiled(*inputs))
        return compiled, output, milliseconds

    for fields, function, inputs, reference in cases:
        torch._dynamo.reset()
        record = {**common, **fields}
        try:
            compiled, tokens, compile_ms = compile_and_run(function, *inputs)
        except Exception as error:  # noqa: BLE001  (what this check is for: recorded, and the other cases still run)
            emit(record | {"compiled": False, **failure(error)})
            continue
        record |= {"compiled": True, "compile_s": compile_ms / 1e3}
        if reference is not None:
            record["tokens_equal_fraction"] = float((tokens == reference(*inputs)).float().mean())
        try:
            if fields.get("timing") == "cuda_graph":
                record["ms_per_call"] = replayed_ms(compiled, *inputs, calls=repeats)
            else:
                record["ms_per_call"] = per_call_ms(compiled, *inputs)
        except Exception as error:  # noqa: BLE001  (a timing that fails, a graph capture say, is recorded apart)
            record |= failure(error)
        emit(record)
    torch._dynamo.reset()


def replayed_ms(function: Callable[..., Any], *inputs: torch.Tensor, calls: int) -> float:
    """GPU milliseconds per call of `function(*inputs)`: `calls` calls captured in one CUDA graph, the median of five
    replays over `calls`, so that the host's launching is not timed."""
    clock = Clock(inputs[0].device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture wants its kernels run once outside it (torch.cuda.graphs' guidance)
        function(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function(*inputs)
    graph.replay()
    return median([clock.time_ms(graph.replay)[1] for _ in range(5)]) / calls
