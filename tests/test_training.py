"""The Trainer from params: what this machine cannot run is one line naming the params key."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rsa_pl.config import TrainParams
from rsa_pl.errors import UnavailableError
from rsa_pl.params_file import load_params
from rsa_pl.pipeline.cli import app
from rsa_pl.training import build_trainer, resolve_precision
from tests.helpers import stage_params

ROOT = Path(__file__).resolve().parents[1]


def train_params(**changes: object) -> TrainParams:
    return load_params(ROOT / "params.yaml").train_reward.train.model_copy(update=changes)


def test_deepspeed_without_deepspeed_names_the_key_and_the_extra(tmp_path: Path) -> None:
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    train = train_params(strategy="deepspeed_stage_2", accelerator="gpu")
    with pytest.raises(UnavailableError) as refused:
        build_trainer(train, tmp_path, tmp_path, where="train_reward.train")
    assert str(refused.value) == (
        "train_reward.train.strategy: deepspeed_stage_2 needs DeepSpeed, which is not installed "
        "(pip install 'rsa-pl[deepspeed]'); or use ddp / fsdp"
    )


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_deepspeed_on_the_cpu_names_the_key_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accelerator: str
) -> None:
    """Lightning's own refusal comes only once fit starts, after the model has loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train = train_params(strategy="deepspeed_stage_3", accelerator=accelerator)
    with pytest.raises(UnavailableError) as refused:
        build_trainer(train, tmp_path, tmp_path, where="train_reward.train")
    assert str(refused.value) == (
        "train_reward.train.strategy: deepspeed_stage_3 needs CUDA GPUs (Lightning runs DeepSpeed on CUDA only), "
        f"and train_reward.train.accelerator is {accelerator} on this machine; use ddp or fsdp"
    )


@pytest.mark.parametrize(
    ("accelerator", "cuda", "bf16", "expected"),
    [
        ("auto", False, False, "32-true"),
        ("cpu", True, True, "32-true"),  # asked for the CPU: no mixed precision there
        ("auto", True, True, "bf16-mixed"),
        ("gpu", True, True, "bf16-mixed"),
        ("gpu", True, False, "16-mixed"),  # a GPU without bf16 (before Ampere)
    ],
)
def test_auto_precision_follows_the_machine(
    monkeypatch: pytest.MonkeyPatch, accelerator: str, cuda: bool, bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision(train_params(precision="auto", accelerator=accelerator)) == expected
    assert resolve_precision(train_params(precision="16-mixed", accelerator=accelerator)) == "16-mixed"


def test_auto_precision_builds_a_cpu_trainer(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU resolution")
    trainer = build_trainer(train_params(precision="auto"), tmp_path, tmp_path)
    assert trainer.precision == "32-true"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_gpu_stage_on_a_cpu_machine_is_one_line(tmp_path: Path, pipeline_root: Path) -> None:
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["train_reward"]["train"]["accelerator"] = "gpu"
    params.write_text(yaml.safe_dump(raw))
    models = tmp_path / "models"
    (models / "sft").mkdir(parents=True)
    for item in (pipeline_root / "models" / "sft").iterdir():
        (models / "sft" / item.name).symlink_to(item)
    result = CliRunner().invoke(
        app,
        ["train-reward", "--params", str(params), "--data", str(pipeline_root / "data"), "--models", str(models),
         "--checkpoints", str(tmp_path / "ckpt")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: train_reward.train: strategy auto on 1 gpu device(s)")
    assert not (models / "reward").exists()


def test_a_preference_stage_without_its_inputs_is_one_line(tmp_path: Path, pipeline_root: Path) -> None:
    """train-reward with no SFT model, train-safety with no stage-1 model, and a stage whose pairs
    are in neither data/ nor pairs/: one line naming the missing folder and the command that makes
    it, before anything loads or is written."""
    params = stage_params(tmp_path)
    data, models, made = pipeline_root / "data", tmp_path / "models", tmp_path / "pairs"
    common = ["--params", str(params), "--checkpoints", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "live")]

    def run(command: str, data_folder: Path) -> list[str]:
        result = CliRunner().invoke(
            app, [command, *common, "--data", str(data_folder), "--models", str(models), "--pairs", str(made)]
        )
        assert result.exit_code == 2, result.output
        return [line for line in result.output.splitlines() if line.strip()]

    assert run("train-reward", data) == [f"error: {models / 'sft'}: not found; run `rsa-pl sft` first"]
    assert run("train-safety", data) == [f"error: {models / 'reward'}: not found; run `rsa-pl train-reward` first"]
    empty = tmp_path / "data"
    (empty / "tokenizer").mkdir(parents=True)
    lines = run("train-reward", empty)
    assert len(lines) == 1
    assert lines[0].startswith(
        f"error: {empty / 'helpful_pairs'}: no pairs (nor in {made}); run `rsa-pl prepare` first"
    )
    assert not (tmp_path / "ckpt").exists()
    assert not (tmp_path / "live").exists()
