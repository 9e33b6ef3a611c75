"""Repository contracts: CI runs README's test command; README's commands use what exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

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
    """.ci/run is bash's strict mode, the move to the checkout's root, then README's test command as
    its last line: nothing else runs, and nothing can exit before it. Each run starts from a fresh
    environment (venv --clear) installed from the lock."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    effective = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert effective == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', _readme_commands()[1]]
    fresh = "python3 -m venv --clear .venv && .venv/bin/pip install -r requirements/dev-lock.txt && "
    assert effective[-1].startswith(fresh)


def test_every_dvc_stage_runs_an_existing_cli_command() -> None:
    import yaml
    from typer.main import get_command

    from rsa_pl.pipeline.cli import app

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages
    for name, stage in stages.items():
        command = re.match(r"rsa-pl (\S+)", stage["cmd"]).group(1)
        assert command in get_command(app).commands, name  # type: ignore[attr-defined]
        assert command.replace("-", "_") == name  # one name per stage everywhere


def test_every_named_markdown_file_exists() -> None:
    """Docstrings, comments and docs cite files by path (docs/method.md, "The loss"); each such
    path, and each upper-case name like README.md, must be in the repository (citations of the
    project's shared notes, which live outside it, once dangled)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    cited: dict[str, str] = {}
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".cfg"} and path.name != "Dockerfile":
            continue
        for match in re.finditer(r"(?<![\w./-])([\w./-]+\.md)\b", path.read_text(errors="replace")):
            ref = match.group(1)
            if "/" in ref or ref[:-3].isupper():
                cited.setdefault(ref, name)
    missing = {ref: where for ref, where in cited.items() if not (ROOT / ref).is_file()}
    assert not missing, f"cited but not in the repository: {missing}"
    assert "docs/method.md" in cited


def test_the_pairs_stage_reruns_on_exactly_the_evaluate_params_it_uses() -> None:
    """dvc.yaml's make_pairs params name the evaluate keys its checkpoints' identity holds: a judge
    or device change reruns it; an eval-set change (evaluate.prompt_sets) does not."""
    from rsa_pl.pipeline.pairs import JUDGE_KEYS

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["make_pairs"]
    listed = {p.removeprefix("evaluate.") for p in stage["params"] if p.startswith("evaluate.")}
    assert listed == set(JUDGE_KEYS)


STAGE_MODULES = {"prepare": "prepare", "sft": "sft", "make_pairs": "pairs", "train_reward": "preference",
                 "train_safety": "preference", "merge": "merge", "evaluate": "evaluate"}  # fmt: skip


def _pipeline_closure(module: str) -> set[str]:
    """rsa_pl/pipeline/<module>.py and every pipeline module it imports, transitively (read from the source)."""
    import ast

    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "rsa_pl" / "pipeline" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "rsa_pl.pipeline":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rsa_pl.pipeline."):
                todo.append(node.module.rsplit(".", 1)[1])
    return {f"rsa_pl/pipeline/{name}.py" for name in seen}


def test_each_stage_depends_on_exactly_the_pipeline_modules_it_runs() -> None:
    """dvc.yaml's rsa_pl/pipeline/*.py deps of a stage are its module and what that imports, no more (editing
    sft.py must not retrain the RSA stages) and no less (a change that a stage runs reruns it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, module in STAGE_MODULES.items():
        listed = {d for d in stages[stage]["deps"] if d.startswith("rsa_pl/pipeline/")}
        assert listed == _pipeline_closure(module), stage


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/helpers.py (builders, independent expectations) and
    conftest.py (fixtures): importing a test module from another ties their collection together."""
    for source in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                modules = [f"{node.module}.{a.name}" for a in node.names] if node.module == "tests" else [node.module]
            assert not any((m or "").startswith("tests.test_") for m in modules), f"{source.name}: {modules}"


def test_the_library_never_imports_the_application() -> None:
    """Dependencies point one way, rsa_pl/pipeline -> the rest of rsa_pl (the design's layout): the library
    knows nothing of stages, params.yaml paths or argv."""
    for source in sorted((ROOT / "rsa_pl").rglob("*.py")):
        if (ROOT / "rsa_pl" / "pipeline") in source.parents:
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("rsa_pl.pipeline") for n in names), source
