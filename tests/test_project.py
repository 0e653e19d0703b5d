"""CI runs the README's two commands: the test command as written, the quickstart shortened by its own flags only."""

import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICKSTART_SHORTENING_FLAGS = {"--P", "--steps", "--eval-sequences", "--seq-len", "--batch-size", "--time-budget"}


def readme_command(section: str) -> str:
    text = (ROOT / "README.md").read_text().split(f"## {section}", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", text, re.DOTALL).group(1).strip()


def ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_test_command():
    assert readme_command("Tests") in ci_lines()


def test_ci_runs_the_readme_quickstart_shortened_by_its_own_flags_only():
    command = readme_command("Quickstart")
    assert command.endswith("python examples/quickstart.py")
    runs = [line for line in ci_lines() if line.startswith(command + " ")]
    assert len(runs) == 1, "CI must run the README's quickstart line, with flags appended"
    flags = shlex.split(runs[0][len(command) :])
    assert {flag for flag in flags if flag.startswith("-")} <= QUICKSTART_SHORTENING_FLAGS
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index(readme_command("Tests")) < ci.index(runs[0])  # after the tests, in a fresh clone and venv
    assert 'export PARSCALE_CACHE="$quickstart/model-cache"' in ci  # an empty model cache
