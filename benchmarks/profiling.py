"""Where the time goes: `torch.profiler` tables of one adapter-training step, of fast-path decode steps at batch 1,
and of fast-path sampling steps of HumanEval's workload, each headed by its self time in families of kernels
(matrix products, attention, ...), which answer "what is the rest of the time spent on" without reading every row."""

from __future__ import annotations

import os
import tempfile

import torch
from peft import get_peft_model
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from peft_parscale import ParScaleConfig
from peft_parscale.decode import fast_decoder

from .decoding import build_variant, random_prompts
from .measure import KERNEL_FAMILIES, OTHER_FAMILY, kernel_family, random_causal_lm
from .sampling import humaneval_sampling, sampling_decoder
from .shapes import shape_config

TABLE_ROWS = 30  # the costliest rows each table lists after its families
NAME_WIDTH = 200  # inductor names each kernel after the operations it fused: wide enough to read them


def family_times(averages) -> tuple[dict[str, float], str]:
    """Self time in microseconds per kernel family, from `profiler.key_averages()`, and what was timed. Where there
    are GPU kernels, only their own entries count, each kernel once (an op's self device time is also its kernels');
    otherwise every CPU op's self time."""
    kernels = [(event.key, event.self_device_time_total) for event in averages if event.device_type == DeviceType.CUDA]
    if kernels:
        timed, what = kernels, "GPU kernels"
    else:
        timed, what = [(event.key, event.self_cpu_time_total) for event in averages], "CPU ops"
    times = dict.fromkeys([family for family, _ in KERNEL_FAMILIES] + [OTHER_FAMILY], 0.0)
    for name, microseconds in timed:
        times[kernel_family(name)] += microseconds
    return times, what


def family_summary(times: dict[str, float], what: str) -> str:
    total = sum(times.values())
    lines = [f"Self time by family ({what}; {total / 1e3:.1f} ms in all):"]
    for family, microseconds in sorted(times.items(), key=lambda item: -item[1]):
        share = microseconds / total if total else 0.0
        lines.append(f"  {family:<36} {microseconds / 1e3:9.2f} ms {share:6.1%}")
    return "\n".join(lines)


def profile_table(function, steps: int) -> str:
    """`steps` calls of `function` profiled: the families' self time, then torch's table of the `TABLE_ROWS` costliest rows."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    averages = profiler.key_averages()
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=NAME_WIDTH)
    return family_summary(*family_times(averages)) + "\n\n" + table


def training_model(shape: str, num_streams: int, device: torch.device, dtype: torch.dtype, compile_layers: bool):
    """A ParScale model in training mode, eager or with each decoder layer compiled (`compile_layers`, regional
    compilation, as the experiments train)."""
    model = get_peft_model(random_causal_lm(shape_config(shape), device, dtype), ParScaleConfig(P=num_streams))
    model.train()
    if compile_layers:
        for layer in model.get_base_model().get_decoder().layers:
            layer.compile()
    return model


def profile_training(
    shape: str, num_streams: int, length: int, device: torch.device, dtype: torch.dtype, compile_layers: bool = False
) -> str:
    """One adapter-training step (forward and backward) of `training_model`."""
    model = training_model(shape, num_streams, device, dtype, compile_layers)
    input_ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    step()
    return profile_table(step, 1)


def profile_trainer_training(
    shape: str, num_streams: int, length: int, device: torch.device, dtype: torch.dtype
) -> str:
    """A `ParScaleSFTTrainer` training of three steps as the experiments train (`benchmarks/trainer_loop.py`: TRL's
    loss, autocast, fused AdamW, the Trainer's bookkeeping; no gradient checkpointing, as the sweep trains since
    2026-12-06), decoder layers compiled, after a first training that compiles them: what the Trainer adds to
    `profile_training`'s step, the host's synchronisations included (`cudaStreamSynchronize` and `aten::item` rows).
    The profile holds the whole `train()` call: its setup and closing log add host rows, not GPU kernels."""
    from .trainer_loop import sft_trainer  # TRL and datasets, which the other tables do without

    model = training_model(shape, num_streams, device, dtype, compile_layers=True)
    batches = torch.randint(0, model.config.vocab_size, (2, 1, length), device=device)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = sft_trainer(model, batches, output_dir, model_loss=False, gradient_checkpointing=False)
        trainer.train()
        return profile_table(trainer.train, 1)


def profile_decoding(
    shape: str,
    num_streams: int,
    prompt: int,
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    fused: bool = False,
) -> str:
    """Fast-path decode steps at batch 1; `fused`: with `fuse_projections` (the `fast_fused` mode)."""
    base = random_causal_lm(shape_config(shape), device, dtype)
    model = get_peft_model(base, ParScaleConfig(P=num_streams), autocast_adapter_dtype=False).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device)
    mask = torch.ones_like(input_ids)
    decoder = fast_decoder(model, 1, prompt + new_tokens, compile=device.type == "cuda", fuse_projections=fused)
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


PROFILES = ("training_P8", "training_P8_layers", "training_P8_trainer", "decode_P8", "decode_P8_fused", "sampling_P8")


def write_profiles(
    out: str,
    shape: str,
    sampling_shape: str,
    sampling_workload: dict[str, int],
    device: torch.device,
    dtype: torch.dtype,
    tiny: bool,
    names: tuple[str, ...] = PROFILES,
) -> None:
    """OUT/profile_<name>.txt for each of `names` (`PROFILES`)."""
    length, prompt, new_tokens = (32, 8, 8) if tiny else (2048, 64, 128)
    sampling_steps = 4 if tiny else 32
    tables = {
        "training_P8": lambda: profile_training(shape, 8, length, device, dtype),
        # the sweep's and HumanEval experiment's training: the sampling shape (0.5B), decoder layers compiled
        "training_P8_layers": lambda: profile_training(sampling_shape, 8, length, device, dtype, compile_layers=True),
        # the same step through the experiments' Trainer (needs TRL and datasets)
        "training_P8_trainer": lambda: profile_trainer_training(sampling_shape, 8, length, device, dtype),
        "decode_P8": lambda: profile_decoding(shape, 8, prompt, new_tokens, device, dtype),
        "decode_P8_fused": lambda: profile_decoding(shape, 8, prompt, new_tokens, device, dtype, fused=True),
        "sampling_P8": lambda: profile_sampling(
            sampling_shape, 8, **sampling_workload, steps=sampling_steps, device=device, dtype=dtype
        ),
    }
    for name in names:
        with open(os.path.join(out, f"profile_{name}.txt"), "w") as file:
            file.write(tables[name]())
        torch._dynamo.reset()
