"""The README is the user's contract: every setting the code reads is documented there, and CI runs
exactly the README's test command."""
import re
from dataclasses import fields
from pathlib import Path

from backend.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]


def test_every_env_variable_is_documented_in_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [env_name(f.name) for f in fields(Settings) if f"`{env_name(f.name)}`" not in readme]
    assert not missing, f"README.md does not document: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Run the tests.*?```bash\n(.*?)\n```", readme, re.S)
    assert block, "README.md has no 'Run the tests' command block"
    command = block.group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci], f".ci/run does not run {command!r}"
