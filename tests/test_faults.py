"""Faults inside a training stage: a non-finite loss or gradient stops the run in one line
keeping the last checkpoint (train.nonfinite: stop), or skips the update and counts it (skip)."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from rsa_pl.modules import NonFiniteError, PreferenceModule, SFTModule
from rsa_pl.pipeline import outputs, preference, sft
from rsa_pl.pipeline.cli import app
from tests import live
from tests.helpers import ROOT, stage_params

QUIET = Console(quiet=True)
BAD_STEP = 4


def setup(tmp_path: Path, pipeline_root: Path, nonfinite: str) -> tuple[Path, Path]:
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["train_reward"]["train"].update(max_steps=6, checkpoint_every_n_steps=2, nonfinite=nonfinite)
    params.write_text(yaml.safe_dump(raw))
    models = tmp_path / "models"
    shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
    return params, models


@pytest.fixture
def nan_loss_at_step_4(monkeypatch: pytest.MonkeyPatch) -> None:
    losses = PreferenceModule.losses

    def poisoned(self: PreferenceModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        values, metrics = losses(self, batch)
        return (values * math.nan if self.training and self.global_step == BAD_STEP else values), metrics

    monkeypatch.setattr(PreferenceModule, "losses", poisoned)


def poison_gradient_at_step_4(monkeypatch: pytest.MonkeyPatch, module: type, method: str) -> None:
    """module.method's first output (the losses) keeps its finite values, but its backward gives
    NaN gradients at BAD_STEP (as an overflow in a kernel would)."""
    original = getattr(module, method)

    def poisoned(self: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        values, extra = original(self, batch)
        if self.training and self.global_step == BAD_STEP:
            values.register_hook(lambda g: g * math.nan)  # the forward stays finite
        return values, extra

    monkeypatch.setattr(module, method, poisoned)


@pytest.fixture
def nan_gradient_at_step_4(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_gradient_at_step_4(monkeypatch, PreferenceModule, "losses")


def test_a_nan_loss_stops_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, pipeline_root: Path, nan_loss_at_step_4: None
) -> None:
    params, models = setup(tmp_path, pipeline_root, "stop")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(NonFiniteError, match=r"^train_reward: non-finite loss at step 4 \(epoch 0, batch 4\)"):
        preference.run("train_reward", params, pipeline_root / "data", models, ckpt, QUIET)
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == BAD_STEP  # the last good step is kept
    assert not (models / "reward").exists()
    result = CliRunner().invoke(app, ["train-reward", "--params", str(params), "--data", str(pipeline_root / "data"),
                                      "--models", str(models), "--checkpoints", str(ckpt),
                                      "--metrics", str(tmp_path / "live")])  # fmt: skip
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "rerun to resume from it, or set train_reward.train.nonfinite: skip" in lines[0]


@pytest.mark.parametrize("fault", ["nan_loss_at_step_4", "nan_gradient_at_step_4"])
def test_skip_mode_skips_the_update_and_counts_it(
    tmp_path: Path, pipeline_root: Path, fault: str, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue(fault)
    params, models = setup(tmp_path, pipeline_root, "skip")
    metrics = preference.run("train_reward", params, pipeline_root / "data", models, tmp_path / "ckpt", QUIET)
    assert metrics["train/skipped_batches"] == 1
    assert metrics["train/steps"] == 6
    assert math.isfinite(metrics["val/loss"])
    weights = load_file(str(models / "reward" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_nan_gradient_stops_in_stop_mode(tmp_path: Path, pipeline_root: Path, nan_gradient_at_step_4: None) -> None:
    params, models = setup(tmp_path, pipeline_root, "stop")
    with pytest.raises(NonFiniteError, match=r"^train_reward: non-finite gradient at step 4"):
        preference.run("train_reward", params, pipeline_root / "data", models, tmp_path / "ckpt", QUIET)


def sft_setup(tmp_path: Path, nonfinite: str) -> Path:
    """The session's params with sft checkpointing every 2 of its 6 steps (one checkpoint at step 4)."""
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["sft"]["train"].update(max_steps=6, checkpoint_every_n_steps=2, nonfinite=nonfinite)
    params.write_text(yaml.safe_dump(raw))
    return params


def poison_sft_loss_at_step_4(monkeypatch: pytest.MonkeyPatch) -> None:
    token_losses = SFTModule._token_losses

    def poisoned(self: SFTModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        losses, mask = token_losses(self, batch)
        return (losses * math.nan if self.training and self.global_step == BAD_STEP else losses), mask

    monkeypatch.setattr(SFTModule, "_token_losses", poisoned)


@pytest.fixture
def sft_nan_loss_at_step_4(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_sft_loss_at_step_4(monkeypatch)


@pytest.fixture
def sft_nan_gradient_at_step_4(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_gradient_at_step_4(monkeypatch, SFTModule, "_token_losses")


def test_a_nan_loss_in_sft_stops_in_one_line_and_the_rerun_resumes_to_the_same_model(
    tmp_path: Path, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the preference stages (train.nonfinite: stop): exit 1 with one line naming the step
    and the params key, the last checkpoint kept (step 4, before the bad update), no model
    written; the rerun, the fault gone, resumes there and ends with the model and metrics of a run
    that never met it."""
    params = sft_setup(tmp_path, "stop")
    data = str(pipeline_root / "data")

    def command(name: str) -> list[str]:
        return ["sft", "--params", str(params), "--data", data, "--out", str(tmp_path / name / "sft"),
                "--checkpoints", str(tmp_path / name / "ckpt"), "--metrics", str(tmp_path / name / "live")]  # fmt: skip

    with monkeypatch.context() as fault:
        poison_sft_loss_at_step_4(fault)
        stopped = CliRunner().invoke(app, command("faulty"))
    assert stopped.exit_code == 1, stopped.output
    assert isinstance(stopped.exception, SystemExit), repr(stopped.exception)
    assert "Traceback" not in stopped.output
    lines = [line for line in stopped.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stopped.output
    assert re.fullmatch(
        r"error: sft: non-finite loss at step 4 \(epoch \d+, batch \d+\); the last checkpoint is kept: rerun to "
        r"resume from it, or set sft\.train\.nonfinite: skip to skip such batches",
        lines[0],
    ), lines[0]
    state = torch.load(tmp_path / "faulty" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == BAD_STEP
    assert not (tmp_path / "faulty" / "sft").exists()

    trained: list[int] = []  # the steps the rerun trains
    with monkeypatch.context() as spy:
        token_losses = SFTModule._token_losses

        def counted(self: SFTModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            if self.training:
                trained.append(self.global_step)
            return token_losses(self, batch)

        spy.setattr(SFTModule, "_token_losses", counted)
        resumed = CliRunner().invoke(app, command("faulty"))
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in " ".join(resumed.output.split())
    assert trained == [4, 5]  # from the checkpoint on, not from scratch
    whole = CliRunner().invoke(app, command("whole"))
    assert whole.exit_code == 0, whole.output
    got, expected = (json.loads((tmp_path / run / "sft" / "metrics.json").read_text()) for run in ("faulty", "whole"))
    assert got["train/steps"] == 6
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    weights, reference = (load_file(str(tmp_path / run / "sft" / "model.safetensors")) for run in ("faulty", "whole"))
    assert weights.keys() == reference.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(weight, reference[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("fault", ["sft_nan_loss_at_step_4", "sft_nan_gradient_at_step_4"])
def test_skip_mode_in_sft_skips_the_update_and_counts_it(
    tmp_path: Path, pipeline_root: Path, fault: str, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue(fault)
    params = sft_setup(tmp_path, "skip")
    out = tmp_path / "models" / "sft"
    metrics = sft.run(params, pipeline_root / "data", out, tmp_path / "ckpt", QUIET, tmp_path / "live")
    assert metrics["train/skipped_batches"] == 1
    assert metrics["train/steps"] == 6
    assert math.isfinite(metrics["val/loss"])
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_nan_gradient_in_sft_stops_in_stop_mode(
    tmp_path: Path, pipeline_root: Path, sft_nan_gradient_at_step_4: None
) -> None:
    params = sft_setup(tmp_path, "stop")
    with pytest.raises(NonFiniteError, match=r"^sft: non-finite gradient at step 4"):
        sft.run(params, pipeline_root / "data", tmp_path / "sft", tmp_path / "ckpt", QUIET, tmp_path / "live")
    assert not (tmp_path / "sft").exists()


def test_disk_full_is_one_line_and_keeps_the_previous_outputs(
    tmp_path: Path, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params, models = setup(tmp_path, pipeline_root, "stop")
    shutil.copytree(pipeline_root / "models" / "reward", models / "reward")
    before = {f.name: f.read_bytes() for f in (models / "reward").iterdir() if f.is_file()}

    def full(policy: object, models_: Path, previous: object, staging: Path) -> None:
        (staging / "adapter_model.safetensors").write_bytes(b"half")  # a partial write, then ENOSPC
        raise OSError(28, "No space left on device", str(staging / "adapter_model.safetensors"))

    monkeypatch.setattr(preference, "_save", full)
    result = CliRunner().invoke(app, ["train-reward", "--params", str(params), "--data", str(pipeline_root / "data"),
                                      "--models", str(models), "--checkpoints", str(tmp_path / "ckpt"),
                                      "--metrics", str(tmp_path / "live")])  # fmt: skip
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "cannot write: No space left on device" in lines[0]
    after = {f.name: f.read_bytes() for f in (models / "reward").iterdir() if f.is_file()}
    assert after == before  # the previous stage-1 output is untouched ...
    assert not list(models.glob(".reward.staging-*"))  # ... and no partial output is left beside it


def test_processes_on_two_hosts_of_one_pid_stage_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank of a multi-node run makes a staging folder in the shared models/ and removes its
    own when it ends: two hosts' processes of the same pid must not share one (the other rank's
    cleanup would delete rank 0's output while it writes it)."""
    out = tmp_path / "models" / "reward"
    monkeypatch.setattr(outputs.socket, "gethostname", lambda: "node-a")
    a = outputs.staging_for(out)
    monkeypatch.setattr(outputs.socket, "gethostname", lambda: "node-b")
    b = outputs.staging_for(out)
    assert a != b
    assert a.is_dir()
    assert b.is_dir()
    assert a.name.startswith(".reward.staging-")


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "output"), [("sft", "sft"), ("train_reward", "reward"), ("train_safety", "safety")])
def test_kill_9_mid_stage_then_rerun_ends_like_an_uninterrupted_run(
    tmp_path: Path, pipeline_root: Path, stage: str, output: str
) -> None:
    """SIGKILL at a random moment after the first checkpoint (LoRA dropout on in train_reward);
    the rerun resumes and ends with the uninterrupted run's metrics and curves (bit-identical
    here; rel 1e-6 allowed), and the killed run left no output that looks complete. The metrics
    folder is emptied before the rerun, as DVC empties a stage's outputs: the curves up to the
    checkpoint come back from the checkpoint."""
    params, _ = setup(tmp_path, pipeline_root, "stop")
    raw = yaml.safe_load(params.read_text())
    raw["train_reward"]["lora"]["dropout"] = raw["train_safety"]["lora"]["dropout"] = 0.1
    raw[stage]["train"].update(max_steps=120, max_epochs=10, checkpoint_every_n_steps=5, val_every_n_steps=50)
    params.write_text(yaml.safe_dump(raw))

    def command(name: str) -> list[str]:
        folder = tmp_path / name
        common = ["--params", str(params), "--data", str(pipeline_root / "data"), "--checkpoints",
                  str(folder / "ckpt"), "--metrics", str(folder / "live")]  # fmt: skip
        if stage == "sft":
            return [
                sys.executable,
                "-m",
                "rsa_pl.pipeline.cli",
                "sft",
                *common,
                "--out",
                str(folder / "models" / "sft"),
            ]
        for upstream in ("sft", "reward") if stage == "train_safety" else ("sft",):
            if not (folder / "models" / upstream).exists():
                shutil.copytree(pipeline_root / "models" / upstream, folder / "models" / upstream)
        command = "train-reward" if stage == "train_reward" else "train-safety"
        return [sys.executable, "-m", "rsa_pl.pipeline.cli", command, *common, "--models", str(folder / "models")]

    whole = subprocess.run(command("whole"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = live.summary(tmp_path / "whole" / "live")

    victim = subprocess.Popen(command("killed"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(stage).uniform(0.0, 1.0))
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "models" / output).exists()  # nothing that looks complete
    assert (tmp_path / "killed" / "live" / "plots").exists()
    shutil.rmtree(tmp_path / "killed" / "live")  # what `dvc repro` does to a stage's outputs before it runs

    resumed = subprocess.run(command("killed"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in " ".join(resumed.stdout.split())  # Rich may wrap the line
    got = live.summary(tmp_path / "killed" / "live")
    timing = {"time/train_s", "train/tokens_per_s"}
    assert {k: v for k, v in got.items() if k not in timing} == pytest.approx(
        {k: v for k, v in expected.items() if k not in timing}, rel=1e-6, abs=1e-7
    )
    names = live.curves(tmp_path / "whole" / "live")
    assert {"train/loss_step", "val/loss"} <= set(names)
    assert live.curves(tmp_path / "killed" / "live") == names
    # *_epoch: Lightning restarts an epoch's running means when a run resumes inside that epoch, so
    # the interrupted epoch's value covers the steps after the resume only. And Lightning logs a
    # checkpointed step's own row just after writing the checkpoint (every 5 steps here): a kill in
    # between loses that one step, which the resumed run does not train again (Curves' docstring)
    lost: set[int] = set()
    for name in set(names) - timing:
        exact = not name.endswith("_epoch")
        whole_rows, killed_rows = (live.curve(tmp_path / run / "live", name) for run in ("whole", "killed"))
        steps = [s for s, _ in killed_rows]
        assert len(steps) == len(set(steps)), name  # no step twice
        lost |= {s for s, _ in whole_rows} - set(steps)
        assert set(steps) <= {s for s, _ in whole_rows}, name
        whole_rows = [(s, v) for s, v in whole_rows if s in set(steps)]
        assert [s for s, _ in killed_rows] == [s for s, _ in whole_rows], name
        if exact:
            assert [v for _, v in killed_rows] == pytest.approx([v for _, v in whole_rows], rel=1e-6, abs=1e-7), name
    assert len(lost) <= 1, lost
    assert all((step + 1) % 5 == 0 for step in lost), lost  # the row of a checkpointed step, if any


# (command, the option whose path cannot be written); each command's other options lead into tmp_path
UNWRITABLE = [
    ("prepare", "--out"),
    ("sft", "--out"),
    ("sft", "--checkpoints"),
    ("sft", "--metrics"),
    ("train-reward", "--checkpoints"),
    ("train-reward", "--metrics"),
    ("train-safety", "--checkpoints"),
    ("train-safety", "--metrics"),
    ("merge", "--out"),
    ("evaluate", "--out"),
    ("evaluate", "--checkpoints"),
    ("make-pairs", "--out"),
    ("make-pairs", "--checkpoints"),
]
OPTIONS = {
    "prepare": ["--out"],
    "sft": ["--data", "--out", "--checkpoints", "--metrics"],
    "train-reward": ["--data", "--models", "--checkpoints", "--metrics"],
    "train-safety": ["--data", "--models", "--checkpoints", "--metrics"],
    "merge": ["--models", "--out"],
    "evaluate": ["--data", "--models", "--out", "--checkpoints", "--judge-cache"],
    "make-pairs": ["--data", "--models", "--out", "--checkpoints", "--judge-cache"],
}


@pytest.mark.parametrize(("command", "option"), UNWRITABLE)
def test_an_output_that_cannot_be_written_is_one_line_before_the_work(
    command: str, option: str, tmp_path: Path, pipeline_root: Path
) -> None:
    """The option's path lies under a regular file, so that no folder can be made there, as root
    too (CI containers run as root, which permissions do not stop): one line naming the path (or,
    for prepare, the file in its way), exit 2, no traceback, and the stage stops before its work (no
    checkpoint, no judged answers, no model written). A preference stage's own output, models/reward
    or models/safety, is made beside the models it reads, so it cannot be blocked that way; the
    disk-full test above covers its failed write."""
    blocker = tmp_path / "a-file"
    blocker.write_text("a file, not a folder\n")
    target = blocker / "output"
    models = tmp_path / "models"
    for name in ("sft", "reward"):
        shutil.copytree(pipeline_root / "models" / name, models / name)
    shutil.copytree(pipeline_root / "models" / "sft", models / "safety")  # full weights: merge and evaluate read it
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    paths = {"--data": pipeline_root / "data", "--models": models, "--out": tmp_path / "out",
             "--checkpoints": tmp_path / "checkpoints", "--metrics": tmp_path / "metrics",
             "--judge-cache": tmp_path / "judge_cache.sqlite", option: target}  # fmt: skip
    args = [command, "--params", str(pipeline_root / "params.yaml")]
    args += [word for name in OPTIONS[command] for word in (name, str(paths[name]))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    if command == "prepare":  # it makes the output's parent first (exist_ok): the file is what exists
        assert lines == [f"error: {blocker}: cannot write: File exists"]
    else:
        assert lines == [f"error: {target}: cannot write: Not a directory"]
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert not [p for p in written if p.suffix == ".ckpt" or p.parent.name == "answers"]  # no work done
    assert not (tmp_path / "out").exists()
    assert [p for p in written if p.parts[0] == "models"] == [p for p in before if p.parts[0] == "models"]
