"""Which floating-point format to train and evaluate in: bfloat16 where the hardware computes it natively, else float32.

TRL trains under bfloat16 autocast by default, and ``parscale eval`` loads models in bfloat16. That is the right choice
on GPUs with bfloat16 support and on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), where it is faster than
float32. On CPUs without them (AVX2-only x86 machines, most laptops) PyTorch emulates bfloat16, several times slower
than float32 (BENCHMARKS.md, "bfloat16 or float32 on a CPU", has the timings).

So the quickstart, ``parscale sft`` and ``parscale eval`` take their default from the hardware, and an explicit
setting (``--bf16``/``--no-bf16``, ``--dtype``) always wins. `training_precision` is that choice for ``parscale sft``,
where transformers also needs ``use_cpu`` to train in bfloat16 on a CPU.

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


def training_precision(
    device: str, bf16_native: bool, bf16: bool | None = None, use_cpu: bool | None = None, fp16: bool | None = None
) -> tuple[bool, bool]:
    """``(bf16, use_cpu)`` for a training run on ``device``, keeping the values given explicitly (not ``None``).

    Args:
        device: The kind of device the run trains on: ``"cpu"`` where there is no accelerator (or ``use_cpu`` is
            set), else the accelerator's kind (``"cuda"``, ...).
        bf16_native: Whether that device computes bfloat16 natively (`bf16_is_native`).
        bf16, use_cpu, fp16: The values given on the command line or in a config file, ``None`` where not given.

    transformers' ``TrainingArguments`` refuses bfloat16 without ``use_cpu`` on a machine without a bfloat16 GPU, and
    TRL turns bfloat16 on by default, so on a CPU ``use_cpu`` defaults to True. bfloat16 defaults to what the device
    computes natively (emulated bfloat16 is several times slower than float32), and to float32 where fp16 is asked
    for, or where ``use_cpu`` was explicitly turned off on a CPU (transformers would refuse bfloat16 there).
    """
    if use_cpu is None:
        use_cpu = device == "cpu"
    if bf16 is None:
        bf16 = bf16_native and not fp16 and (use_cpu or device != "cpu")
    return bf16, use_cpu
