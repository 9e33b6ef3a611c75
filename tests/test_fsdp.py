"""`train.strategy: fsdp` (rsa_pl/sharded.py) on CPU processes (gloo): trains, checkpoints, resumes
and exports like one process, with a LoRA adapter and with full fine-tuning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file as safetensors_weights

from rsa_pl import modules
from rsa_pl.data.collate import SFTCollator
from rsa_pl.data.datamodule import TokenizedDataModule
from rsa_pl.models import load_causal_lm, load_tokenizer
from rsa_pl.modules import SFTModule
from rsa_pl.params_file import ParamsError, load_params, parse_params
from rsa_pl.pipeline import preference, sft
from rsa_pl.sharded import ShardedStrategy
from rsa_pl.training import build_trainer
from tests.helpers import ROOT, stage_params, tiny_params

QUIET = Console(quiet=True)
STOPPED = 3  # the exit status of a run stopped by STOPPING

# `rsa-pl` that stops training after step 3 (the last checkpoint is step 2's) in every process:
# Lightning starts the other ranks with this same script and arguments.
STOPPING = """
from lightning.pytorch.callbacks import Callback

from rsa_pl.pipeline import cli, preference


class Stop(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            raise SystemExit(3)


build = preference.build_trainer
preference.build_trainer = lambda *a, **k: build(*a, **k, extra=[Stop()])
cli.app()
"""


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "1000"}  # this checkout; one line a message
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fsdp_on_two_cpu_processes_matches_one_process(
    tmp_path: Path, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch, lora: bool
) -> None:
    """`rsa-pl train-reward` with strategy fsdp on 2 gloo processes of batch 2, stopped after step 3
    and resumed from its step-2 checkpoint, trains like one process of batch 4: the same final
    validation metrics and the same exported adapter (LoRA) or weights (full fine-tuning, whose
    frozen reference is sharded too), within float32 reduction order. The one process takes the
    reference's whole logits, as fsdp does (its parameters are whole only inside the forward): the
    block-by-block head route rounds differently, and AdamW turns that into visible differences
    in weights whose gradient is about 0 (tests/test_reference_head.py compares the two routes)."""
    data = pipeline_root / "data"
    monkeypatch.setattr(modules, "plain_head", lambda model: None)

    def stage(name: str, **settings: object) -> tuple[Path, Path]:
        folder = tmp_path / name
        folder.mkdir()
        params = stage_params(folder, lora=lora)
        raw = yaml.safe_load(params.read_text())
        raw["train_reward"]["train"].update(max_steps=6, accelerator="cpu", **settings)
        params.write_text(yaml.safe_dump(raw))
        shutil.copytree(pipeline_root / "models" / "sft", folder / "models" / "sft")
        return folder, params

    one, params = stage("one", batch_size=4, devices=1, strategy="auto")
    expected = preference.run("train_reward", params, data, one / "models", one / "ckpt", QUIET)

    two, params = stage("two", batch_size=2, devices=2, strategy="fsdp")
    args = ["train-reward", "--params", str(params), "--data", str(data), "--models", str(two / "models"),
            "--checkpoints", str(two / "ckpt"), "--metrics", str(two / "live")]  # fmt: skip
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    stopped = _run([sys.executable, str(script), *args])
    assert stopped.returncode == STOPPED, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "Starting with 2 processes" in stopped.stdout + stopped.stderr
    assert not (two / "models" / "reward").exists()
    resumed = _run([sys.executable, "-m", "rsa_pl.pipeline.cli", *args])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {two / 'ckpt' / 'last.ckpt'}" in resumed.stdout

    got = json.loads((two / "models" / "reward" / "metrics.json").read_text())
    assert expected["train/steps"] == got["train/steps"] == 6
    for key in ("val/loss", "val/rewards/margins", "val/logps/chosen", "val/risk/rejected"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a = safetensors_weights(one / "models" / "reward" / weights)
    b = safetensors_weights(two / "models" / "reward" / weights)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    if not lora:  # the model trained: not the SFT weights saved back
        sft = safetensors_weights(pipeline_root / "models" / "sft" / "model.safetensors")
        assert any(not torch.equal(sft[name], b[name]) for name in b)

    def grad_norms(live: Path) -> dict[int, float]:
        rows = (live / "plots" / "metrics" / "train" / "grad_norm.tsv").read_text().splitlines()[1:]
        return {int(step): float(value) for step, value in (row.split("\t") for row in rows)}

    # the logged norm is the whole gradient's, not one rank's shard of it
    one_norms, two_norms = grad_norms(one / "ckpt" / "live"), grad_norms(two / "live")
    assert set(two_norms) & set(one_norms)
    for step in set(two_norms) & set(one_norms):
        assert two_norms[step] == pytest.approx(one_norms[step], rel=1e-3), step


@pytest.mark.slow
def test_sft_under_fsdp_exports_the_model_it_validated(tmp_path: Path, pipeline_root: Path) -> None:
    """`rsa-pl sft` with strategy fsdp on 2 gloo processes saves the model it trained, gathered
    from both: one process validating and sampling the saved model finds the stage's val/loss
    and sample/* metrics (rank 0 sampled from the gathered model)."""
    data = pipeline_root / "data"
    params = tiny_params(tmp_path, accelerator="cpu", batch_size=4, devices=2, strategy="fsdp")
    done = _run([sys.executable, "-m", "rsa_pl.pipeline.cli", "sft", "--params", str(params), "--data", str(data),
                 "--out", str(tmp_path / "sft"), "--checkpoints", str(tmp_path / "ckpt"),
                 "--metrics", str(tmp_path / "live")])  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())

    model = load_causal_lm(tmp_path / "sft", False)
    tokenizer = load_tokenizer(data / "tokenizer", False)
    loaded = load_params(params)
    datamodule = TokenizedDataModule(data / "sft", 4, SFTCollator(tokenizer.pad_token_id), 0, False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    final = trainer.validate(SFTModule(model, loaded.sft.train, "sft"), datamodule=datamodule, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(final["val/loss"], rel=1e-5)
    sampled = sft._sample_quality(loaded, model, tokenizer, data)
    assert sampled == pytest.approx({key: value for key, value in metrics.items() if key.startswith("sample/")})


def test_fsdp_on_the_cpu_builds_the_sharded_strategy(tmp_path: Path) -> None:
    """Lightning's own strategy="fsdp" refuses a CPU accelerator ("requires a GPU accelerator")."""
    train = load_params(ROOT / "params.yaml").train_reward.train
    train = train.model_copy(update={"strategy": "fsdp", "accelerator": "cpu", "devices": 2})
    trainer = build_trainer(train, tmp_path, tmp_path, where="train_reward.train")
    assert isinstance(trainer.strategy, ShardedStrategy)
    assert trainer.strategy.kwargs["use_orig_params"] is True


def test_fsdp_with_4_bit_weights_is_refused_naming_the_key() -> None:
    """torch's FSDP cannot shard bitsandbytes' 4-bit weights ("Cannot flatten integer dtype
    tensors", once the model has loaded): refused with the params, before anything loads."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train_safety"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                           "compute_dtype": "float32"}  # fmt: skip
    raw["train_safety"]["train"]["strategy"] = "fsdp"
    with pytest.raises(ParamsError) as refused:
        parse_params(raw, "params.yaml")
    assert str(refused.value) == (
        "params.yaml: train_safety.train.strategy: fsdp cannot shard 4-bit weights (torch's FSDP flattens no "
        "integer tensors): use ddp with quantization, or quantization: null"
    )


class _RunsCode:
    """Unpickling this opens (creates) a file: a stand-in for code a pickle can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_carries_code_is_refused_by_fsdp_without_running_it(tmp_path: Path) -> None:
    """ShardedStrategy reads a full checkpoint with torch.load(weights_only=True) (Lightning's
    FSDPStrategy reads it with a plain pickle.Unpickler, which would run the code): torch's
    refusal, which errors.weights_only makes one line, before anything is loaded."""
    import pickle

    marker, checkpoint = tmp_path / "code-ran", tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, checkpoint)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ShardedStrategy("32-true").load_checkpoint(checkpoint, weights_only=True)
    assert not marker.exists()
