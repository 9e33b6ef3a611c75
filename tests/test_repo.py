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
    assert "dvc repro" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [line.strip() for line in ci]


def test_every_dvc_stage_runs_an_existing_cli_command() -> None:
    import yaml
    from typer.main import get_command

    from pipeline.cli import app

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages
    for name, stage in stages.items():
        command = re.match(r"rsa-pl (\S+)", stage["cmd"]).group(1)
        assert command in get_command(app).commands, name  # type: ignore[attr-defined]
        assert command.replace("-", "_") == name  # one name per stage everywhere (DESIGN.md)
