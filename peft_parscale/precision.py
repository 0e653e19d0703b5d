"""Which floating-point format to train and evaluate in: bfloat16 where the hardware computes it natively, else float32.

TRL trains under bfloat16 autocast by default, and ``parscale eval`` loads models in bfloat16. That is the right choice
on GPUs with bfloat16 support and on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), where it is faster than
float32. On CPUs without them (AVX2-only x86 machines, most laptops) PyTorch emulates bfloat16, several times slower
than float32 (BENCHMARKS.md, "bfloat16 or float32 on a CPU", has the timings).

So the quickstart, ``parscale sft`` and ``parscale eval`` take their default from the hardware, and an explicit
setting (``--bf16``/``--no-bf16``, ``--dtype``) always wins.

Example::

    from peft_parscale.precision import bf16_is_native, default_dtype_name

    SFTConfig(..., bf16=bf16_is_native())
    AutoModelForCausalLM.from_pretrained(path, dtype=default_dtype_name())
"""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions that PyTorch uses (x86: AVX512-BF16 or AMX)."""
    # PyTorch has no public query for this; `torch.cpu` exposes the checks its own kernels dispatch on. Other
    # processors (e.g. Arm) answer False: float32 is the safe default there.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def bf16_is_native(device: str | torch.device | None = None) -> bool:
    """Whether bfloat16 arithmetic is native on ``device`` (default: CUDA if available, else the CPU)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def default_dtype_name(device: str | torch.device | None = None) -> str:
    """``"bfloat16"`` where it is native on ``device`` (see `bf16_is_native`), else ``"float32"``."""
    return "bfloat16" if bf16_is_native(device) else "float32"
