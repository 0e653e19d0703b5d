"""Timing, memory and environment helpers shared by the decoding and training benchmarks.

On CUDA, times come from CUDA events recorded in the stream (the device's own clock, read after a synchronisation);
on CPU from `time.perf_counter`. Peak memory is `torch.cuda.max_memory_allocated` after a reset (CUDA only).
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, PretrainedConfig

GIB = 1024**3


class Clock:
    """Marks points in the device's stream of work and reads the milliseconds between them."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def time_ms(self, function: Callable[[], Any]) -> tuple[Any, float]:
        """Run `function` once; return its result and its duration."""
        start = self.mark()
        result = function()
        return result, self.elapsed_ms(start, self.mark())


class StepMarks(LogitsProcessor):
    """A no-op logits processor that marks the clock each time `generate` has the logits of a new token."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.marks = clock, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.marks.append(self.clock.mark())
        return scores


def median(values: list[float]) -> float:
    return statistics.median(values)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None


def random_causal_lm(config: PretrainedConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A causal LM of the given configuration with transformers' random initialisation, built on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def environment(device: torch.device) -> dict[str, Any]:
    """Software versions, device name and the date, recorded with every run."""
    import peft
    import transformers

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        query = "name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit"
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = f"unavailable: {error}"
    return info


def device_ceilings(device: torch.device, repeats: int = 10) -> dict[str, float]:
    """Measured ceilings: device-to-device copy bandwidth (bytes read + written) and a large bf16 matrix product."""
    if device.type != "cuda":
        return {}
    clock = Clock(device)
    source = torch.empty(2 * GIB // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        target.copy_(source)
        torch.mm(a, b)
    copy_ms = median([clock.time_ms(lambda: target.copy_(source))[1] for _ in range(repeats)])
    matmul_ms = median([clock.time_ms(lambda: torch.mm(a, b))[1] for _ in range(repeats)])
    return {
        "copy_tb_per_s": 2 * source.numel() * source.element_size() / (copy_ms * 1e-3) / 1e12,
        "matmul_bf16_tflop_per_s": 2 * 8192**3 / (matmul_ms * 1e-3) / 1e12,
    }
