"""Where the time goes: `torch.profiler` tables of one adapter-training step, of fast-path decode steps at batch 1,
and of fast-path sampling steps of HumanEval's workload."""

from __future__ import annotations

import os

import torch
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile

from peft_parscale import ParScaleConfig
from peft_parscale.decode import fast_decoder

from .decoding import build_variant, random_prompts
from .measure import random_causal_lm
from .sampling import humaneval_sampling, sampling_decoder
from .shapes import shape_config


def profile_table(function, steps: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70)


def profile_training(
    shape: str, num_streams: int, length: int, device: torch.device, dtype: torch.dtype, compile_layers: bool = False
) -> str:
    """One adapter-training step (forward and backward), eager or with each decoder layer compiled (`compile_layers`,
    regional compilation, as `parscale sft`'s sweep trains)."""
    model = get_peft_model(random_causal_lm(shape_config(shape), device, dtype), ParScaleConfig(P=num_streams))
    model.train()
    if compile_layers:
        for layer in model.get_base_model().get_decoder().layers:
            layer.compile()
    input_ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    step()
    return profile_table(step, 1)


def profile_decoding(
    shape: str, num_streams: int, prompt: int, new_tokens: int, device: torch.device, dtype: torch.dtype
) -> str:
    base = random_causal_lm(shape_config(shape), device, dtype)
    model = get_peft_model(base, ParScaleConfig(P=num_streams), autocast_adapter_dtype=False).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device)
    decoder = fast_decoder(model, 1, prompt + new_tokens, compile=device.type == "cuda")
    mask = torch.ones_like(input_ids)
    decoder.run(input_ids, mask, new_tokens)
    return profile_table(lambda: decoder.run(input_ids, mask, new_tokens), 1)


def profile_sampling(
    shape: str,
    num_streams: int,
    problems: int,
    samples: int,
    prompt: int,
    new_tokens: int,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
) -> str:
    """`steps` fast-path sampling steps of HumanEval's workload (`benchmarks/sampling.py`: problems × samples rows,
    the cache as long as the whole generation). On CUDA the step is compiled as the `fast` mode compiles it, but
    without CUDA graphs, so that the table lists the step's kernels rather than graph replays."""
    model, _ = build_variant(shape, f"P{num_streams}", device, dtype)
    config = humaneval_sampling(new_tokens, samples)
    options = {"fullgraph": True} if device.type == "cuda" else None
    input_ids, attention_mask = random_prompts(problems, prompt, model.config.vocab_size, device)
    decoder, rows_ids, rows_mask, uniforms = sampling_decoder(model, input_ids, attention_mask, config, options)
    decoder.run(rows_ids, rows_mask, steps, uniforms)  # compilation
    return profile_table(lambda: decoder.run(rows_ids, rows_mask, steps, uniforms), 1)


def write_profiles(
    out: str,
    shape: str,
    sampling_shape: str,
    sampling_workload: dict[str, int],
    device: torch.device,
    dtype: torch.dtype,
    tiny: bool,
) -> None:
    length, prompt, new_tokens = (32, 8, 8) if tiny else (2048, 64, 128)
    sampling_steps = 4 if tiny else 32
    tables = {
        "profile_training_P8.txt": lambda: profile_training(shape, 8, length, device, dtype),
        # the sweep's and HumanEval experiment's training: the sampling shape (0.5B), decoder layers compiled
        "profile_training_P8_layers.txt": lambda: profile_training(
            sampling_shape, 8, length, device, dtype, compile_layers=True
        ),
        "profile_decode_P8.txt": lambda: profile_decoding(shape, 8, prompt, new_tokens, device, dtype),
        "profile_sampling_P8.txt": lambda: profile_sampling(
            sampling_shape, 8, **sampling_workload, steps=sampling_steps, device=device, dtype=dtype
        ),
    }
    for name, make in tables.items():
        with open(os.path.join(out, name), "w") as file:
            file.write(make())
        torch._dynamo.reset()
