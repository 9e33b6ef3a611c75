"""Safe loading: no pickle for models or checkpoints, no remote code, only what params name."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from pipeline import preference
from tests.test_preference import stage_params

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("rsa_pl/**/*.py"), *ROOT.glob("pipeline/**/*.py")])


def calls(name: str) -> list[tuple[Path, str]]:
    """Every call of `name(` in the package's sources, with its arguments (up to the closing paren)."""
    found = []
    for path in SOURCES:
        text = path.read_text()
        for match in re.finditer(re.escape(name) + r"\(", text):
            depth, end = 1, match.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            found.append((path, text[match.start() : end]))
    return found


def test_no_remote_code_is_ever_trusted() -> None:
    for path in SOURCES:
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text()), path


def test_every_torch_load_is_weights_only() -> None:
    loads = calls("torch.load")
    assert loads  # the score-model judge reads .bin heads
    for path, call in loads:
        assert "weights_only=True" in call, f"{path}: {call}"


def test_checkpoints_are_resumed_weights_only() -> None:
    fits = calls("trainer.fit")
    assert len(fits) == 2  # sft and the preference stages
    for path, call in fits:
        assert "weights_only=True" in call, f"{path}: {call}"


def test_models_are_written_as_safetensors(pipeline_root: Path) -> None:
    files = [f for f in (pipeline_root / "models").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    pickled = [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]
    assert not pickled


def test_no_secret_from_the_environment_reaches_logs_checkpoints_or_outputs(
    tmp_path: Path, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hf_SECRETdoNotLeak1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    params = stage_params(tmp_path)
    models = tmp_path / "models"
    shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
    console = Console(record=True)
    preference.run("train_reward", params, pipeline_root / "data", models, tmp_path / "ckpt", console,
                   tmp_path / "metrics" / "train_reward.json")  # fmt: skip
    assert secret not in console.export_text()
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "last.ckpt" for f in written)
    assert any(f.name == "metrics.csv" for f in written)
    leaked = [f for f in written if secret.encode() in f.read_bytes()]
    assert not leaked
