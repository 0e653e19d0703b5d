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
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LogitsProcessor, PretrainedConfig
from typing_extensions import Self  # typing.Self from Python 3.11; the package supports 3.10

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
    NVML functions (`clock_rate`, `utilization`, `power_draw`, `temperature`) in a background thread, every
    `interval_s` and once more as the region ends.

    Two timed runs of one compiled, graph-replayed decode have differed by more than the streams cost (BENCHMARKS.md,
    run S): a lower SM clock says the card slowed down, a lower load (the share of time a kernel ran) that the host
    fell behind, and neither that the step itself varies. The clock is the card's current one; NVML averages load
    and power over its last sample period (1/6 s to 1 s, by card), so the first readings of a region also describe
    what ran before it: read the median load, not the lowest. A reading taken as the region starts only checks
    which quantities NVML answers for and is not kept. A quantity NVML refuses (load under MIG or vGPU, power in some
    virtual machines) is left out and named in `summary()["error"]`; the others go on. `summary()` is empty on a CPU.
    The interval is about NVML's shortest sample period: reading faster repeats the same averages.

    ```python
    with DeviceState(torch.device("cuda", 0)) as state:
        generate()
    print(state.summary())  # {"sm_mhz": [min, median, max], "load_percent": [...], "power_w_max": ..., ...}
    ```
    """

    def __init__(
        self,
        device: torch.device,
        interval_s: float = 0.25,
        readers: dict[str, Callable[[], float]] | None = None,
        join_timeout_s: float = 10.0,
    ) -> None:
        self.interval_s, self.join_timeout_s = interval_s, join_timeout_s
        self.samples: list[dict[str, float]] = []
        self.errors: dict[str, str] = {}
        self._stop, self._thread, self._lock, self._closed = threading.Event(), None, threading.Lock(), False
        if readers is None and device.type == "cuda":
            readers = {
                "sm_mhz": lambda: torch.cuda.clock_rate(device),
                "load_percent": lambda: torch.cuda.utilization(device),
                "power_w": lambda: torch.cuda.power_draw(device) / 1e3,  # NVML reads milliwatts
                "temperature_c": lambda: torch.cuda.temperature(device),
            }
        self.readers = dict(readers or {})

    def _sample(self, keep: bool = True) -> None:
        reading, errors = {}, {}
        for name, read in list(self.readers.items()):
            try:
                reading[name] = read()
            # Any failure (no nvidia-ml-py, pynvml's own NVMLError for a query the card or runtime does not support)
            # drops that quantity, never the benchmark that the readings describe.
            except Exception as error:  # noqa: BLE001
                del self.readers[name]
                errors[name] = f"{type(error).__name__}: {error}"
        with self._lock:  # what returns after `__exit__` gave up waiting is not kept
            if not self._closed:
                self.errors.update(errors)
                if keep and reading:
                    self.samples.append(reading)

    def _read_until_stopped(self) -> None:
        # Every reading, the first and the last included, is taken here, so that a stalled NVML call can hold up
        # this thread only, never the timed region or the benchmark (`__exit__` waits `join_timeout_s` at most).
        self._sample(keep=False)
        while self.readers and not self._stop.wait(self.interval_s):
            self._sample()
        if self.readers:
            self._sample()

    def __enter__(self) -> Self:
        if self.readers:
            self._thread = threading.Thread(target=self._read_until_stopped, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.join_timeout_s)
            with self._lock:
                self._closed = True
                if self._thread.is_alive():
                    self.errors["thread"] = f"an NVML reading did not return within {self.join_timeout_s} s"

    def summary(self) -> dict[str, Any]:
        """[min, median, max] of the SM clock and load, the highest power and temperature, the number of readings,
        and what NVML refused, if anything."""
        summary: dict[str, Any] = {}
        with self._lock:
            samples, errors = list(self.samples), dict(self.errors)

        def values(key: str) -> list[float]:
            return [sample[key] for sample in samples if key in sample]

        for key in ("sm_mhz", "load_percent"):
            if read := values(key):
                summary[key] = [min(read), statistics.median(read), max(read)]
        for key in ("power_w", "temperature_c"):
            if read := values(key):
                summary[f"{key}_max"] = max(read)
        if samples:
            summary["samples"] = len(samples)
        if errors:
            summary["error"] = "; ".join(f"{name}: {error}" for name, error in errors.items())
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
        info["cudnn"] = torch.backends.cudnn.version()  # its attention's fixes depend on it (padded_attention.py)
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


# Families of GPU kernels (or, on a CPU, ATen ops) by name: the first whose words a lowercased name contains. Flash
# and memory-efficient attention kernels contain "cutlass" or "gemm" too, so attention comes first; inductor names its
# fused kernels triton_*, keeping "softmax" in the name of those that fuse one.
KERNEL_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "aten::mm", "aten::addmm", "aten::bmm")),
    ("softmax and loss", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("optimizer", ("multi_tensor_apply", "fused_adam", "aten::_foreach")),
    ("fused by torch.compile", ("triton",)),
    ("copies and fills", ("memcpy", "memset", "copy", "aten::cat", "aten::fill_", "fillfunctor")),
)
OTHER_FAMILY = "other element-wise and reductions"


def kernel_family(name: str) -> str:
    """The family of `KERNEL_FAMILIES` a kernel (or CPU op) belongs to by its name, else `OTHER_FAMILY`."""
    lowered = name.lower()
    for family, words in KERNEL_FAMILIES:
        if any(word in lowered for word in words):
            return family
    return OTHER_FAMILY


def launched(function: Callable[[], object], device: torch.device) -> list[str]:
    """The names of what `function` runs, in the order of their first launch: on CUDA its GPU kernels, on a CPU the
    operators (torch's profiler)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as profiler:
        function()
        if cuda:
            torch.cuda.synchronize(device)
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    return list(dict.fromkeys(event.name for event in profiler.events() if event.device_type == wanted))
