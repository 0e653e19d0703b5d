"""The README's test command is the one CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    tests_section = readme.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", tests_section, re.DOTALL).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
