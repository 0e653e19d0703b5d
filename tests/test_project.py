"""CI runs the README's commands: the test command as written, the quickstart shortened by its own flags only, and
the laptop block as written (which recipes/README.md repeats)."""

import pathlib
import shlex

from benchmarks.laptop import LAPTOP_SECTION, readme_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICKSTART_SHORTENING_FLAGS = {"--P", "--steps", "--eval-sequences", "--seq-len", "--batch-size", "--time-budget"}
QUICKSTART_SECTION = "Quickstart: recycle Qwen2.5-Coder-0.5B-Instruct on a CPU, offline"


def readme_command(section: str, readme: pathlib.Path = ROOT / "README.md") -> str:
    return readme_block(section, readme).strip()


def ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_test_command():
    assert readme_command("Tests") in ci_lines()


def test_ci_runs_the_readme_quickstart_shortened_by_its_own_flags_only():
    command = readme_command(QUICKSTART_SECTION)
    assert command.endswith("python examples/quickstart.py")
    runs = [line for line in ci_lines() if line.startswith(command + " ")]
    assert len(runs) == 1, "CI must run the README's quickstart line, with flags appended"
    flags = shlex.split(runs[0][len(command) :])
    assert {flag for flag in flags if flag.startswith("-")} <= QUICKSTART_SHORTENING_FLAGS
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index(readme_command("Tests")) < ci.index(runs[0])  # after the tests, in a fresh clone and venv
    assert 'export PARSCALE_CACHE="$quickstart/model-cache"' in ci  # an empty model cache


def laptop_block(readme: pathlib.Path) -> list[str]:
    return [line.strip() for line in readme_command(LAPTOP_SECTION, readme).splitlines()]


def test_ci_runs_the_readme_laptop_block_as_written_in_the_fresh_clone():
    block = laptop_block(ROOT / "README.md")
    assert {"parscale sft", "parscale eval"} <= {" ".join(line.split()[:2]) for line in block}
    lines = ci_lines()
    starts = [i for i in range(len(lines)) if lines[i : i + len(block)] == block]
    assert len(starts) == 1, "CI must run the README's laptop block, every line as written and in order"
    quickstart = next(i for i, line in enumerate(lines) if line.startswith(readme_command(QUICKSTART_SECTION) + " "))
    assert starts[0] > quickstart  # after it, in its fresh clone, virtual environment and empty model cache


def test_recipes_readme_carries_the_same_laptop_block():
    assert laptop_block(ROOT / "recipes" / "README.md") == laptop_block(ROOT / "README.md")
