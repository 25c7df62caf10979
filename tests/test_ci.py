"""CI runs what the README tells a new user to type, in the same order, then the baseline check."""

from __future__ import annotations

import re
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def readme_commands(text: str) -> list[str]:
    """The command after each numbered comment (``# 1. ...``) in the README's first bash block."""
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no ```bash block"
    commands, numbered = [], False
    for line in block.group(1).splitlines():
        if re.match(r"#\s*\d+\.", line.strip()):
            numbered = True
        elif numbered and line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
            numbered = False
    return commands


def ci_commands() -> list[str]:
    lines = (PROJECT / ".ci/run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_commands_in_order_then_checks_the_metrics():
    first, second = readme_commands((PROJECT / "README.md").read_text())[:2]
    assert first.endswith("dvc repro") and "pytest" in second
    commands = ci_commands()
    assert commands[0] == "set -euo pipefail"
    assert commands[-3:] == [first, second, "python scripts/check_metrics.py"]


def test_readme_commands_are_read_from_the_numbered_lines():
    text = "intro\n```bash\n# 1. set up\nmake all\n\n# 2. test\n  make test\n```\n```bash\n# 3. other\nls\n```\n"
    assert readme_commands(text) == ["make all", "make test"]
