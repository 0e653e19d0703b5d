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
import threading
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


class DeviceState:
    """The GPU's state while a timed region runs: SM clock, load, power and temperature, read through torch.cuda's
    NVML functions (`clock_rate`, `utilization`, `power_draw`, `temperature`) every `interval_s` in a background
    thread and at the end. NVML averages some readings over its last sample period (1/6 s to 1 s), so a reading taken
    as the region starts describes what ran before it: it only checks that NVML answers, and is not kept.

    Two timed runs of one compiled, graph-replayed decode have differed by more than the streams cost (BENCHMARKS.md,
    run S): a lower SM clock says the card slowed down, a lower load (the share of time a kernel ran) that the host
    fell behind, and neither that the step itself varies. `summary()` is empty on a CPU, and names the error where
    NVML cannot be read (no nvidia-ml-py, a driver or runtime that does not answer).

    ```python
    with DeviceState(torch.device("cuda")) as state:
        generate()
    print(state.summary())  # {"sm_mhz": [min, median, max], "load_percent": [...], "power_w_max": ..., ...}
    ```
    """

    def __init__(
        self, device: torch.device, interval_s: float = 0.05, read: Callable[[], dict[str, float]] | None = None
    ) -> None:
        self.interval_s, self.samples, self.read, self.error = interval_s, [], read, None
        self._stop, self._thread = threading.Event(), None
        if read is None and device.type == "cuda":
            self.read = lambda: {
                "sm_mhz": torch.cuda.clock_rate(device),
                "load_percent": torch.cuda.utilization(device),
                "power_w": torch.cuda.power_draw(device) / 1e3,  # NVML reads milliwatts
                "temperature_c": torch.cuda.temperature(device),
            }

    def _sample(self, keep: bool = True) -> None:
        try:
            reading = self.read()
            if keep:
                self.samples.append(reading)
        # Any failure (no nvidia-ml-py, pynvml's own NVMLError for a query the card or runtime does not support)
        # stops the readings, never the benchmark that they describe.
        except Exception as error:  # noqa: BLE001
            self.read, self.error = None, f"{type(error).__name__}: {error}"

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s) and self.read is not None:
            self._sample()

    def __enter__(self) -> DeviceState:
        if self.read is not None:
            self._sample(keep=False)
        if self.read is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.read is not None:
            self._sample()

    def summary(self) -> dict[str, Any]:
        """[min, median, max] of the SM clock and load, the highest power and temperature, the number of readings,
        and the error that stopped them, if any."""
        summary: dict[str, Any] = {}
        if self.samples:

            def spread(key: str) -> list[float]:
                values = [sample[key] for sample in self.samples]
                return [min(values), statistics.median(values), max(values)]

            summary = {
                "sm_mhz": spread("sm_mhz"),
                "load_percent": spread("load_percent"),
                "power_w_max": max(sample["power_w"] for sample in self.samples),
                "temperature_c_max": max(sample["temperature_c"] for sample in self.samples),
                "samples": len(self.samples),
            }
        if self.error is not None:
            summary["error"] = self.error
        return summary


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
