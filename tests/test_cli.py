"""The `rsa-pl` console script: only working commands, clear one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from rsa_pl.pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_the_working_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("check-params", "prepare", "sft", "train-reward", "train-safety", "merge", "evaluate"):
        assert f" {command} " in result.output, command


def test_check_params_accepts_the_committed_file() -> None:
    result = runner.invoke(app, ["check-params", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output
    assert "train_safety" in result.output


def test_check_params_reports_every_problem_and_fails(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text()
    bad = tmp_path / "params.yaml"
    bad.write_text(text.replace("mu: 0.95", "mu: 1.5", 1).replace("beta: 0.05", "betta: 0.05"))
    result = runner.invoke(app, ["check-params", "--params", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert f"error: {bad}: train_reward.risk.mu: must be in (0, 1] for cvar, got 1.5" in lines
    assert f"error: {bad}: train_safety.betta: unknown key; did you mean 'beta'?" in lines
    assert f"error: {bad}: train_safety.beta: missing (every key is required; params have no hidden defaults)" in lines


def test_check_params_names_a_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check-params", "--params", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "absent.yaml: file not found" in result.output


def test_console_script_is_installed() -> None:
    script = shutil.which("rsa-pl", path=str(Path(sys.executable).parent))
    assert script is not None, "rsa-pl is not installed next to this Python (pip install -e .)"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("rsa-pl ")
