"""Repository contracts: CI runs README's test command; README's commands use what exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_readme_gives_exactly_two_setup_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "rsa-pl" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [line.strip() for line in ci]


def test_readme_main_job_command_exists_in_the_cli() -> None:
    from typer.main import get_command

    from pipeline.cli import app

    main_job = _readme_commands()[0]
    subcommand = re.search(r"rsa-pl (\S+)", main_job).group(1)
    assert subcommand in get_command(app).commands  # type: ignore[attr-defined]
