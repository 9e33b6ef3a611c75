"""Test-wide settings: no network, deterministic torch."""

import os
import tempfile

# A hub lookup otherwise hangs ~25 s before failing; tests never download anything.
os.environ["HF_HUB_OFFLINE"] = "1"  # forced: an inherited 0 would let tests reach for the hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Code that a test lets a model run (trust_remote_code) is copied here, not into ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf-modules-"))

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def pipeline_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """prepare + sft + train-reward (LoRA) on the tiny world, once for the session.
    Tests that write models do so in copies, except where they say so."""
    from rsa_pl.pipeline import preference, prepare, sft
    from tests.helpers import stage_params

    root = tmp_path_factory.mktemp("pipeline")
    params = stage_params(root)
    quiet = Console(quiet=True)
    prepare.run(params, root / "data", quiet)
    sft.run(params, root / "data", root / "models" / "sft", root / "ckpt" / "sft", quiet)
    preference.run("train_reward", params, root / "data", root / "models", root / "ckpt" / "reward", quiet)
    yield root
    # Tests read it whichever xdist worker runs them, so none may add to it (a stage 2 written
    # here once made what other tests saw depend on how files were split between workers).
    assert sorted(p.name for p in (root / "models").iterdir()) == ["reward", "sft"], "a test wrote into models/"


_GUARDED = ("metrics", "eval", "params.yaml", "dvc.lock", "dvc.yaml")


def _fingerprints() -> dict[str, bytes]:
    root = Path(__file__).resolve().parents[1]
    files = [root / g for g in _GUARDED if (root / g).is_file()]
    for folder in (root / g for g in _GUARDED if (root / g).is_dir()):
        files += [f for f in folder.rglob("*") if f.is_file()]
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


@pytest.fixture(scope="session", autouse=True)
def _committed_results_stay_untouched() -> object:
    """No test may write into the checkout's params, pipeline files or committed results (a CLI
    call with default output paths once overwrote the committed training metrics)."""
    before = _fingerprints()
    yield
    after = _fingerprints()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests changed files of the checkout: {', '.join(changed)}"
