"""Adapter training throughput: frozen backbone, only the adapter trained.

The adapter is a variant: ``P<n>`` (ParScale, the default prefix length), ``P<n>T<t>`` (prefix length t), or
``lora`` (PEFT's LoRA, rank 16, on every linear layer of the decoder: the HumanEval experiment's LoRA arm), so that the
experiment's arms can be timed alone on one GPU under the same conditions. One step = forward and backward of a batch
of random token sequences with next-token labels, then AdamW on the trainable weights. tokens/s counts input tokens
(batch × sequence length), not stream-tokens.

Model FLOPs per step (`training_flops`), the numerator of MFU; recomputation under gradient checkpointing is not
counted, and neither are the frozen weights' gradients, which are never computed:
- linear layers of the backbone, over P × tokens stream-tokens: forward 2·N_lin, backward (input gradients only) 2·N_lin;
- attention scores and weighted sums: forward 4·layers·heads·head_dim per visible key, causal with the T prefix keys
  visible to every query (T + (S + 1)/2 keys on average), backward twice the forward;
- LM head on the aggregated tokens (not × P): forward 2·H·V, backward (input gradients) 2·H·V;
- aggregator (trainable, P > 1): forward 2·(P·H·H + H·P), backward twice that;
- LoRA: forward 2·r·(inputs + outputs) per adapted linear layer, backward twice that (input and weight gradients).
MFU = model FLOPs / (step time × peak); the peak is the H100 SXM dense bf16 figure, 989 TFLOP/s, unless given.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import compile_regions
from peft import LoraConfig, get_peft_model
from torch.nn import attention as torch_attention
from torch.nn.attention import SDPBackend
from transformers import PretrainedConfig

import peft_parscale.layer as parscale_layer
from peft_parscale import ParScaleAttention, ParScaleConfig

from .measure import Clock, kernel_family, launched, median, peak_memory_gib, random_causal_lm, reset_peak_memory
from .padded_attention import padded_prefix_attention
from .shapes import shape_config

H100_SXM_BF16_DENSE_TFLOPS = 989.0
LORA_RANK = 16  # the HumanEval experiment's LoRA arm (experiments/arms.py): rank 16, alpha 32, every linear layer
TRAIN_COMPILE_MODES = ("none", "blocks", "layers", "regions", "model")  # see `train_throughput`
TRAIN_LOOPS = ("plain", "autocast", "trainer", "trainer_model_loss")  # likewise
# the prefix attention's kernels (see `train_throughput`): sdpa's name for each padded variant's only backend
PADDED_ATTENTION_BACKENDS = {"padded_flash": SDPBackend.FLASH_ATTENTION, "padded_cudnn": SDPBackend.CUDNN_ATTENTION}
# The package's bias with sdpa's built-in FlashAttention-2 replaced, for CUDA tensors, by another FlashAttention that
# torch's registry knows (`torch.nn.attention.activate_flash_attention_impl`, torch 2.11 on): it overrides aten's flash
# ops, which the lower-right bias calls, so no model code changes. Its kernels come from a package installed apart
# (FA4: flash-attn-4 and NVIDIA's CUTLASS DSL; at most 4.0.0b18 with torch 2.11 to 2.13, whose glue unpacks two values
# from the forward that later releases extend to four or five: BENCHMARKS.md, "Training throughput").
FLASH_ATTENTION_IMPLS = {"bias_fa4": "FA4"}
TRAIN_ATTENTIONS = ("bias", *FLASH_ATTENTION_IMPLS, "padded", *PADDED_ATTENTION_BACKENDS)
VARIANT = re.compile(r"P(?P<P>[1-9]\d*)(?:T(?P<T>[1-9]\d*))?|lora")


def linear_shapes(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(inputs, outputs) of each matrix product of one decoder layer: query, key, value, output, gate, up, down."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    query, key_value = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    intermediate = config.intermediate_size
    return [(hidden, query), (hidden, key_value), (hidden, key_value), (query, hidden)] + [
        (hidden, intermediate),
        (hidden, intermediate),
        (intermediate, hidden),
    ]


def linear_parameters(config: PretrainedConfig) -> int:
    """Weights of the backbone's matrix products per stream-token (biases and norms left out)."""
    return config.num_hidden_layers * sum(inputs * outputs for inputs, outputs in linear_shapes(config))


def training_flops(
    config: PretrainedConfig, num_streams: int, prefix_length: int, batch_size: int, length: int, lora_rank: int = 0
) -> float:
    """Model FLOPs of one adapter-training step (see the module docstring); `lora_rank` > 0 for LoRA."""
    hidden, vocab = config.hidden_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    tokens = batch_size * length
    stream_tokens = num_streams * tokens
    linear = 4 * linear_parameters(config) * stream_tokens
    visible_keys = prefix_length + (length + 1) / 2
    attention_forward = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * visible_keys
    attention = 3 * attention_forward * stream_tokens
    lm_head = 4 * hidden * vocab * tokens
    aggregator = 6 * (num_streams * hidden * hidden + hidden * num_streams) * tokens if num_streams > 1 else 0
    lora_sizes = sum(inputs + outputs for inputs, outputs in linear_shapes(config)) * config.num_hidden_layers
    lora = 6 * lora_rank * lora_sizes * tokens
    return float(linear + attention + lm_head + aggregator + lora)


def variant_adapter(variant: str, init_std: float | None = None) -> ParScaleConfig | LoraConfig:
    """The adapter a training variant trains (see the module docstring); `init_std`, where given, is the ParScale
    adapter's `init_std` (prefixes and the aggregator's first layer) instead of the config's default."""
    match = VARIANT.fullmatch(variant)
    if match is None:
        raise ValueError(f"Unknown training variant {variant!r}: use 'P<n>', 'P<n>T<t>' or 'lora'.")
    if variant == "lora":
        if init_std is not None:
            raise ValueError("init_std is a ParScale adapter's initialisation; the 'lora' variant has none.")
        return LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM")
    settings: dict[str, int | float] = {}
    if match["T"]:
        settings["prefix_length"] = int(match["T"])
    if init_std is not None:
        settings["init_std"] = init_std
    return ParScaleConfig(P=int(match["P"]), **settings)


@contextlib.contextmanager
def materialised_prefix_mask(device: torch.device) -> Iterator[None]:
    """The training mask as built before the flash-friendly change: an explicit boolean (q, T + q) tensor."""
    bias = parscale_layer.prefix_causal_bias
    parscale_layer.prefix_causal_bias = lambda queries, prefix: bias(queries, prefix)._materialize(device)
    try:
        yield
    finally:
        parscale_layer.prefix_causal_bias = bias


def training_setting_conflict(attention: str, mask: str, compile: str, loop: str, dtype: torch.dtype) -> str | None:
    """Why `train_throughput` would refuse this setting (None if it would not), so that a sweep of settings can be
    refused before any is measured. The Trainer's loops compile the layers in place only. Padding replaces the
    lower-right bias, and another FlashAttention replaces the flash kernel the bias reaches; the materialised mask,
    the whole-model compile (transformers then builds a mask tensor) and autocast over a model in another dtype
    (`mask_with_prefix` then materialises it) never pass the bias to attention. The Trainer's loops take sdpa's
    kernels themselves (every one but cuDNN's), which another FlashAttention replaces for them too."""
    if loop not in TRAIN_LOOPS:
        return f"Unknown training loop {loop!r}: use one of {', '.join(TRAIN_LOOPS)}."
    if attention not in TRAIN_ATTENTIONS:
        return f"Unknown training attention {attention!r}: use one of {', '.join(TRAIN_ATTENTIONS)}."
    trainer_loop = loop.startswith("trainer")
    if trainer_loop and compile in ("regions", "model"):
        return f"The Trainer's loops compile the layers in place: compile {compile!r} is not for them."
    if attention == "bias":
        return None
    if mask == "materialised" or compile == "model" or (loop == "autocast" and dtype != torch.bfloat16):
        return (
            f"attention {attention!r} needs the lower-right bias, which mask {mask!r}, compile {compile!r} or loop "
            f"{loop!r} over {dtype} replace."
        )
    if trainer_loop and attention in PADDED_ATTENTION_BACKENDS:
        return f"The Trainer's loops choose their own sdpa kernels: attention {attention!r} is not for them."
    return None


def flash_attention_impl_missing(attention: str, device: torch.device) -> str | None:
    """Why `attention`'s FlashAttention implementation cannot be timed on `device` (None if it can, or if `attention`
    names none): it replaces CUDA kernels only, and it must be there to put in place (tried, and put back)."""
    if attention not in FLASH_ATTENTION_IMPLS:
        return None
    if device.type != "cuda":
        return f"attention {attention!r} replaces CUDA kernels only: on {device.type} it would time sdpa's own."
    try:
        with flash_attention_impl(FLASH_ATTENTION_IMPLS[attention]):
            return None
    except RuntimeError as error:
        return f"attention {attention!r}: {error}"


@contextlib.contextmanager
def flash_attention_impl(name: str) -> Iterator[None]:
    """sdpa's FlashAttention-2 kernels for CUDA tensors replaced by torch's registered implementation `name` inside
    the block, and put back on exit. RuntimeError, with nothing replaced, where torch does not list `name` or the
    implementation's kernels are not installed."""
    known = torch_attention.list_flash_attention_impls()
    if name not in known:
        raise RuntimeError(
            f"torch {torch.__version__} lists no FlashAttention implementation {name!r} (it has {known})"
        )
    try:
        torch_attention.activate_flash_attention_impl(name)
    except ImportError as error:  # torch imports the implementation's kernels only when it is put in place
        raise RuntimeError(f"FlashAttention implementation {name!r} needs its kernels installed: {error}") from error
    try:
        yield
    finally:
        torch_attention.restore_flash_attention_impl()


def plain_step_times(
    forward: Callable[..., Any],
    trainable: dict[str, torch.nn.Parameter],
    batches: torch.Tensor,
    warmup: int,
    device: torch.device,
) -> tuple[float, list[float], float, dict[str, float]]:
    """The plain loop: forward and backward of each batch in turn, then AdamW. Returns the first step's seconds
    (compilation included; no optimizer step), the timed steps' milliseconds after `warmup` untimed ones, and the first
    step's loss and the gradient norm of each trainable tensor (by name)."""
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4)

    def step(index: int) -> torch.Tensor:
        loss = forward(input_ids=batches[index], labels=batches[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    started = time.perf_counter()
    loss = forward(input_ids=batches[0], labels=batches[0]).loss
    loss.backward()
    first_step_s = time.perf_counter() - started
    gradient_norms = {name: float(p.grad.float().norm()) for name, p in trainable.items() if p.grad is not None}
    optimizer.zero_grad(set_to_none=True)
    for index in range(warmup):
        step(index)
    reset_peak_memory(device)
    clock = Clock(device)
    times = [clock.time_ms(lambda index=index: step(warmup + index))[1] for index in range(len(batches) - warmup)]
    return first_step_s, times, float(loss.detach()), gradient_norms


def train_throughput(
    shape: str,
    variant: str,
    length: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    warmup: int,
    gradient_checkpointing: bool,
    mask: str = "lower_right",
    compile: str = "none",
    loop: str = "plain",
    attention: str = "bias",
    init_std: float | None = None,
    peak_tflops: float = H100_SXM_BF16_DENSE_TFLOPS,
) -> dict[str, Any]:
    """Tokens/s, MFU and peak memory of adapter training (see the module docstring).

    `compile`: "none"; "blocks", every block of each decoder layer but the attention (norms, MLP) compiled on its
    own; "layers", each decoder layer compiled whole (regional compilation: one compiled graph serves all layers;
    attention keeps sdpa's flash kernel); "regions", accelerate's regional compilation (`compile_regions`: the
    layers as "layers" does, and the embedding, final norm and LM head each compiled on their own), which
    ``parscale sft --torch_compile true`` uses; "model", `torch.compile` of the whole model (transformers then
    materialises the attention mask: sdpa's memory-efficient kernel instead of flash).

    `loop`: "plain", the step in the module docstring; "autocast", the same under bfloat16 autocast, as the Trainer runs
    a bfloat16 model with ``bf16=True``; "trainer", `ParScaleSFTTrainer` steps as the experiments take them (TRL's loss
    and metrics, autocast, fused AdamW, gradient clipping: benchmarks/trainer_loop.py; gradient checkpointing as
    `gradient_checkpointing` says, which the experiments took until 2026-12-06 by TRL's default); "trainer_model_loss",
    the same Trainer with the model's own loss. The Trainer's loops need TRL and datasets, and compile in place only
    (`compile` "none", "blocks" or "layers"); they record the mean training loss instead of the first step's loss and
    adapter gradient norm. (The Trainer also trains without cuDNN's attention, `ParScaleSFTTrainer.train`, which the
    prefix's lower-right causal bias never uses: it goes to flash or memory-efficient attention directly.)

    `attention`: "bias", the package's lower-right causal bias (sdpa's flash or memory-efficient kernel); "padded",
    queries padded in front to the keys' length and sdpa's `is_causal`, any kernel sdpa picks
    (benchmarks/padded_attention.py); "padded_flash" and "padded_cudnn", the same limited to that one kernel. The
    Trainer's loops keep the Trainer's kernels (every one but cuDNN's), so they take "bias", "padded" or "bias_fa4"
    only. "bias_fa4": the bias with sdpa's FlashAttention-2 replaced by FlashAttention-4 (`flash_attention_impl`), on
    CUDA only.

    `init_std`: the ParScale adapter's `init_std` (its prefixes' and its aggregator's first layer's initial std)
    instead of the config's 0.02. At 0.02 a new adapter's streams may differ by little more than bf16 rounding; the
    aggregator's output layer, whose gradient is driven by those differences, would then answer to how a kernel
    rounds. Larger prefixes make the streams differ more, as a trained adapter's may.
    """
    conflict = training_setting_conflict(attention, mask, compile, loop, dtype)
    if conflict:
        raise ValueError(conflict)
    missing = flash_attention_impl_missing(attention, device)
    if missing:
        raise ValueError(missing)
    trainer_loop = loop.startswith("trainer")
    if compile != "none":
        torch._dynamo.reset()  # dynamo's guards miss sdpa's kernel choice: a graph compiled under another is not reused
    config = shape_config(shape)
    adapter_config = variant_adapter(variant, init_std)
    lora = isinstance(adapter_config, LoraConfig)
    num_streams, prefix_length = (1, 0) if lora else (adapter_config.P, adapter_config.prefix_length)
    model = get_peft_model(random_causal_lm(config, device, dtype), adapter_config)
    if gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = model.get_base_model().get_decoder().layers
    if compile == "blocks":
        for block in (block for layer in layers for block in layer.children()):
            if not isinstance(block, ParScaleAttention):
                block.compile()
    elif compile == "layers":
        for layer in layers:
            layer.compile()
    forward = torch.compile(model) if compile == "model" else compile_regions(model) if compile == "regions" else model
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    generator = torch.Generator().manual_seed(0)
    batches = torch.randint(0, config.vocab_size, (warmup + steps, batch_size, length), generator=generator).to(device)
    masked: Callable[[], contextlib.AbstractContextManager] = (
        (lambda: materialised_prefix_mask(device)) if mask == "materialised" else contextlib.nullcontext
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if loop == "autocast" else contextlib.nullcontext()
    prefix_attention: contextlib.AbstractContextManager = contextlib.nullcontext()
    if attention in FLASH_ATTENTION_IMPLS:
        prefix_attention = flash_attention_impl(FLASH_ATTENTION_IMPLS[attention])
    elif attention != "bias":
        backend = PADDED_ATTENTION_BACKENDS.get(attention)
        prefix_attention = padded_prefix_attention(model, [backend] if backend else None)
    with masked(), autocast, prefix_attention:
        if trainer_loop:
            from .trainer_loop import trainer_step_times  # TRL and datasets, which the other loops do without

            first_step_s, times, mean_loss = trainer_step_times(
                model, batches, warmup, loop == "trainer_model_loss", gradient_checkpointing
            )
            loss, gradient_norms, attention_kernels = None, None, None
            peak_memory = peak_memory_gib(device)
        else:
            first_step_s, times, loss, gradient_norms = plain_step_times(forward, trainable, batches, warmup, device)
            mean_loss = None
            peak_memory = peak_memory_gib(device)
            # The attention kernels one more step launches: a kernel put in place but not reached would otherwise
            # time and train as the kernel it was meant to replace.
            step = lambda: forward(input_ids=batches[0], labels=batches[0]).loss.backward()
            attention_kernels = [name for name in launched(step, device) if kernel_family(name) == "attention"]
    step_ms = median(times)
    flops = training_flops(config, num_streams, prefix_length, batch_size, length, LORA_RANK if lora else 0)
    record = {
        "suite": "train",
        "shape": shape,
        "variant": variant,
        "P": num_streams,
        "prefix_length": prefix_length,
        "trainable_parameters": sum(parameter.numel() for parameter in trainable.values()),
        "length": length,
        "batch": batch_size,
        "gradient_checkpointing": gradient_checkpointing,
        "mask": mask,
        "compile": compile,
        "loop": loop,
        "attention": attention,
        "init_std": None if lora else adapter_config.init_std,
        "first_step_s": first_step_s,
        "step_ms": step_ms,
        "tokens_per_s": batch_size * length / (step_ms * 1e-3),
        "model_tflop_per_step": flops / 1e12,
        "mfu": flops / (step_ms * 1e-3) / (peak_tflops * 1e12),
        "peak_tflops": peak_tflops,
        "peak_mem_gib": peak_memory,
        # the adapter's gradient norm, and each trainable tensor's (which one a kernel's backward moves)
        "trainable_gradient_norm": None if gradient_norms is None else math.hypot(*gradient_norms.values()),
        "gradient_norms": gradient_norms,
        "attention_kernels": attention_kernels,
        "loss": loss,
        "mean_train_loss": mean_loss,
    }
    return record
