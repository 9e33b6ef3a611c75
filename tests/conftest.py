"""Test-wide settings: no network, deterministic torch."""

import os

# A hub lookup otherwise hangs ~25 s before failing; tests never download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from rich.console import Console


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def pipeline_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare + sft + train-reward (LoRA) on the tiny world, once for the session.
    Tests that write models do so in copies, except where they say so."""
    from pipeline import preference, prepare, sft
    from tests.test_preference import stage_params

    root = tmp_path_factory.mktemp("pipeline")
    params = stage_params(root)
    quiet = Console(quiet=True)
    prepare.run(params, root / "data", quiet)
    sft.run(params, root / "data", root / "models" / "sft", root / "ckpt" / "sft", quiet)
    preference.run("train_reward", params, root / "data", root / "models", root / "ckpt" / "reward", quiet)
    return root
