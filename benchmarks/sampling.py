"""Sampling throughput for HumanEval's workload: completions per second and time to first token.

One batch of `problems` random prompts of `prompt` tokens, `samples` completions each (`num_return_sequences`, so
each prompt's completions are consecutive rows), up to `new_tokens` new tokens, with the nucleus sampling that
`peft_parscale.humaneval` uses for pass@k (temperature 0.8, top-p 0.95, no top-k). Modes:
- `generate`: `model.generate` (dynamic cache, eager, `torch.multinomial`);
- `fast`: `peft_parscale.decode.fast_generate` (static cache; on CUDA the step compiled for static shapes, CUDA graphs);
- `fast_dynamic`: the same, the step compiled for dynamic shapes, as `evaluate_humaneval` compiles it (one compilation
  for every batch shape of a run).

completions/s is the batch's rows over the whole generation's time (prefill included); time to first token is the
prefill: for `fast`, timed on its own on the same cache; for `generate`, until the first token's logits. No
end-of-sequence id is set and random weights do not stop by themselves, so every completion runs the full
`new_tokens`: an upper bound on a HumanEval batch, which ends with its longest completion (real completions stop at
their stop sequences, and the fast path stops at its first check after the last one, every 32 steps).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList

from peft_parscale.decode import (
    DEFAULT_COMPILE_OPTIONS,
    TokenSelector,
    draw_uniforms,
    fast_decoder,
    fast_generate,
)

from .decoding import build_variant, forget_fast_decoder, random_prompts
from .measure import Clock, StepMarks, free_memory, median, peak_memory_gib, reset_peak_memory

Record = dict[str, Any]
COMPILE_OPTIONS = {"fast": DEFAULT_COMPILE_OPTIONS, "fast_dynamic": {**DEFAULT_COMPILE_OPTIONS, "dynamic": True}}


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


def measure_fast_sampling(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    repeats: int,
    compile_options: dict[str, Any] | None,
) -> Record:
    """`fast_generate`: a warm-up of four tokens on the same cache (compilation, CUDA-graph recording), `repeats` timed
    runs, three prefills."""
    device = input_ids.device
    clock = Clock(device)
    compile = compile_options is not None
    samples, new_tokens = config.num_return_sequences, config.max_new_tokens
    rows, length = input_ids.shape[0] * samples, input_ids.shape[1] + new_tokens
    decoder = fast_decoder(model, rows, length, TokenSelector.from_generation_config(config), compile, compile_options)
    rows_ids, rows_mask = (tensor.repeat_interleave(samples, dim=0) for tensor in (input_ids, attention_mask))
    uniforms = draw_uniforms(torch.Generator(device).manual_seed(0), rows, new_tokens, device)
    _, warmup_ms = clock.time_ms(lambda: decoder.run(rows_ids, rows_mask, min(new_tokens, 4), uniforms))

    def generate() -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        return fast_generate(
            model, input_ids, attention_mask, config, generator, compile=compile, compile_options=compile_options
        )

    totals = [clock.time_ms(generate)[1] for _ in range(repeats)]
    prefills = [clock.time_ms(lambda: decoder.prefill(rows_ids, rows_mask, uniforms[0]))[1] for _ in range(3)]
    return {"ttft_ms": median(prefills), "total_ms": median(totals), "warmup_s": warmup_ms / 1e3}


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
    """Measure every (variant, mode) on one batch of the HumanEval workload; `emit` each record."""
    config = humaneval_sampling(new_tokens, samples)
    for variant in variants:
        model, info = build_variant(shape, variant, device, dtype)
        input_ids, attention_mask = random_prompts(problems, prompt, model.config.vocab_size, device)
        for mode in modes:
            reset_peak_memory(device)
            if mode == "generate":
                record = measure_generate_sampling(model, input_ids, attention_mask, config, repeats)
            else:
                options = COMPILE_OPTIONS[mode] if device.type == "cuda" else None
                record = measure_fast_sampling(model, input_ids, attention_mask, config, repeats, options)
            rows, seconds = problems * samples, record["total_ms"] / 1e3
            emit(
                {
                    "suite": "sampling",
                    **info,
                    "mode": mode,
                    "dtype": str(dtype).removeprefix("torch."),
                    "problems": problems,
                    "samples_per_problem": samples,
                    "batch": rows,
                    "prompt": prompt,
                    "new_tokens": new_tokens,
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
