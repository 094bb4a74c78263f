"""CI must run exactly the test command that README.md gives newcomers."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running the tests", 1)[1]
    return re.search(r"```(?:bash)?\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command_verbatim():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_ci_installs_cpu_torch_before_anything_else():
    command = _readme_test_command()
    installs = re.findall(r"pip install ([^&]+)", command)
    assert installs[0].strip() == "torch==2.13.0", installs
