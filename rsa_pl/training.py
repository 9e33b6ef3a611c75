"""The Lightning Trainer from params: strategy, precision, callbacks, loggers, checkpoints, resume."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from dvclive import Live
from dvclive.lightning import DVCLiveLogger
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from rsa_pl.config import TrainParams
from rsa_pl.errors import UnavailableError, weights_only
from rsa_pl.sharded import ShardedStrategy

FINGERPRINT = "fingerprint.json"
LAST = "last.ckpt"
JOURNAL = "curves.jsonl"


def fingerprint(identity: dict[str, Any]) -> str:
    """A stable hash of everything that makes a checkpoint belong to a run (params, inputs)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, then renamed over it: a process
    killed while saving (kill -9, preemption) leaves the previous checkpoint whole, never a
    truncated one that would make the resume fail."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, temporary, storage_options)
        os.replace(temporary, target)


def launched_as_rank_zero() -> bool:
    """Whether this process is the global rank 0 of a (possibly distributed) run, from the
    environment its launcher set (Lightning's DDP launcher, torchrun, SLURM), before any
    Trainer exists: the other ranks run the same command and must not touch shared files."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) == "0"


def resumable_checkpoint(
    checkpoint_dir: Path, identity: dict[str, Any], last_name: str = LAST
) -> tuple[Path | None, str]:
    """The last checkpoint of an interrupted run with the same identity, or None; and what was decided.

    A checkpoint from other params is never resumed, nor one of a run that finished (a rerun
    after that means something else changed, the code say): they are removed, and the folder
    is marked with the new identity. last_name: the file (or folder) whose presence means
    there is something to resume from.
    """
    key = fingerprint(identity)
    marker, last = checkpoint_dir / FINGERPRINT, checkpoint_dir / last_name
    recorded = json.loads(marker.read_text()) if marker.exists() else {}
    if last.exists() and recorded.get("fingerprint") == key and not recorded.get("finished"):
        return last, f"resuming from {last}"
    if not launched_as_rank_zero():  # rank 0 decided the same, and cleans up
        return None, "starting fresh"
    note = "starting fresh"
    if checkpoint_dir.exists() and any(checkpoint_dir.iterdir()):
        shutil.rmtree(checkpoint_dir)
        if recorded.get("fingerprint") != key:
            why = "they came from other params"
        else:
            why = "the run there had finished" if recorded.get("finished") else "nothing there to resume from"
        note = f"starting fresh: removed the checkpoints in {checkpoint_dir} ({why})"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": key, "identity": identity}, indent=2, default=str))
    return None, note


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, resume: Path | None) -> None:
    """trainer.fit, resuming from the checkpoint resume (read with weights_only=True) if any: a
    checkpoint that carries code to run is refused in one line (PickledCodeError) naming it, and
    nothing in it runs."""
    advice = f"delete it (or {resume.parent}) to start the stage over" if resume else ""
    with weights_only(resume, advice) if resume else nullcontext():
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)


class _Live(Live):
    """dvclive's run without its DVC-repository side: each stage already is a DVC stage (no
    experiment to save, no dvc.yaml to write), and dvclive's own set-up would `dvc init` a git
    repository that has no DVC yet and fail ("Empty git repo") in one that has no commit yet."""

    def _init_dvc(self) -> None:
        self._dvc_file = "dvc.yaml"  # never written: dvcyaml=None


def live(folder: Path) -> Live:
    """A dvclive run in folder: folder/metrics.json (the summary `dvc metrics` reads) and
    folder/plots/metrics/<name>.tsv (the curves `dvc plots` reads), emptied first."""
    return _Live(dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)


class Curves(DVCLiveLogger):
    """dvclive's Lightning logger, writing a run made by live() in folder, that also journals each
    row to journal (in the checkpoint folder, which DVC leaves alone). DVC empties a stage's
    outputs before running it again, so a resumed fit would start its curves at the step it
    resumes from: instead, before the first row it logs, the journal's rows of the earlier steps
    are logged again (the last value logged for a step wins: a run killed twice leaves a step's
    row twice). Rows logged after the last checkpoint, which training repeats, are not doubled,
    and the row of the checkpoint's own step (logged just after the checkpoint is written) is kept;
    once training is over the curves are written again from the journal (rebuild). One row can
    still be lost: Lightning logs a checkpointed step's row a moment after writing the checkpoint,
    and a kill inside that moment takes the row with it (the resumed run starts after that step).
    The dvclive run (which empties folder) starts with the first row, on rank 0 only: a stage that
    fails before it trains leaves folder as it was."""

    def __init__(self, folder: Path, journal: Path) -> None:
        super().__init__(run_name=None)
        self.folder = folder
        self.journal = journal
        self.replayed = False

    @property
    def experiment(self) -> Live:
        if self._experiment is None and rank_zero_only.rank == 0:
            self._experiment = live(self.folder)
        return self._experiment

    def log_metrics(self, metrics: Any, step: int | None = None, sync: bool | None = False) -> None:
        """Each value at Lightning's step as given (dvclive's own logger turns a step 0 into 1, so
        the first two rows of every curve shared step 1), then the summary written."""
        if rank_zero_only.rank != 0:
            return
        values = {name: float(value) for name, value in metrics.items()}
        if not self.replayed:
            self.replayed = True
            for earlier, row in self._journal_before(step):
                self._log(earlier, row)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with self.journal.open("a") as out:
            out.write(json.dumps({"step": step, "values": values}) + "\n")
        self._log(step, values)

    def _log(self, step: int | None, values: dict[str, float]) -> None:
        run = self.experiment
        if step is not None:
            run.step = step
        for name, value in values.items():
            run.log_metric(name, value)
        run.make_summary()

    def _journal_before(self, step: int | None) -> list[tuple[int, dict[str, float]]]:
        if step is None:
            return []
        return [(earlier, row) for earlier, row in self._journal() if earlier < step]

    def _journal(self) -> list[tuple[int, dict[str, float]]]:
        """Every (step, metric) of the journal once, at the value logged last (a resumed run's
        own rows replace those of the run it resumed), by step."""
        rows: dict[int, dict[str, float]] = {}
        if self.journal.exists():
            for line in self.journal.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    continue
                if row["step"] is not None:
                    rows.setdefault(row["step"], {}).update(row["values"])
        return sorted(rows.items())

    def rebuild(self) -> Live:
        """The dvclive run written again from the journal, once training is over: exactly the rows
        of an uninterrupted run, however often it was resumed and at whatever moment (the replay
        at a resume logs what the journal had before the resumed run's first row; a row Lightning
        logs on a later step, such as an epoch's end, may still only be in the journal)."""
        self._experiment = live(self.folder)
        for step, row in self._journal():
            self._log(step, row)
        return self._experiment

    def log_hyperparams(self, params: Any) -> None:
        """The stage's params are in params.yaml, which DVC tracks: no copy in the metrics folder."""


def record_summary(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """The curves rebuilt from their journal (Curves.rebuild), then a stage's final numbers (time,
    steps, the last validation, samples) into its metrics.json, beside the last value of each
    curve: `dvc metrics show/diff` and `dvc exp show` read them."""
    for logger in trainer.loggers:
        if isinstance(logger, Curves) and rank_zero_only.rank == 0:
            run = logger.rebuild()
            for name, value in metrics.items():
                run.log_metric(name, value, plot=False)
            run.make_summary()


def _loggers(log_dir: Path, live_dir: Path, journal: Path) -> list[Logger]:
    loggers: list[Logger] = [Curves(live_dir, journal)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(str(log_dir), name="tensorboard", version=""))
    return loggers


class LogProgress(Callback):
    """Progress a log can show: when stderr is not a terminal (a `dvc repro` piped to a file, a
    batch job), a line every `every_s` seconds on rank 0: step, share done, loss, tokens/s (real
    tokens, from the batch's attention masks) and the time left at the current rate."""

    def __init__(self, where: str, every_s: float | None = None) -> None:
        self.where = where
        self.every_s = float(os.environ.get("RSA_PL_PROGRESS_S", "30")) if every_s is None else every_s
        self.started = self.last = 0.0
        self.tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = self.last = time.monotonic()
        self.tokens = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if isinstance(batch, dict):
            masks = [v for k, v in batch.items() if k.endswith("attention_mask") and hasattr(v, "sum")]
            self.tokens += int(sum(m.sum() for m in masks)) * trainer.world_size
        now = time.monotonic()
        if now - self.last < self.every_s or not trainer.is_global_zero:
            return
        self.last = now
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        elapsed = now - self.started
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
        known = total != float("inf")
        parts = [f"{self.where}: step {step}" + (f"/{int(total)} ({step / total:.0%})" if known else "")]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{self.tokens / elapsed:,.0f} tokens/s")
        if known and step:
            parts.append(f"ETA {clock(elapsed / step * (total - step))}")
        print(", ".join(parts), file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """h:mm:ss"""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def build_trainer(
    train: TrainParams,
    log_dir: Path,
    checkpoint_dir: Path,
    extra: list[Callback] | None = None,
    where: str = "train",
    live_dir: Path | None = None,
) -> L.Trainer:
    """A Trainer configured entirely by the stage's train params (`where`: their params path,
    for errors: a strategy or device this machine cannot run is one line naming the key),
    logging through dvclive into live_dir (default: checkpoint_dir/live; see Curves)."""
    if train.strategy.startswith("deepspeed"):
        # Lightning's DeepSpeedStrategy refuses a CPUAccelerator, but only once fit starts (the
        # model loaded): "The DeepSpeed strategy is only supported on CUDA GPUs"
        if train.accelerator == "cpu" or (train.accelerator == "auto" and not torch.cuda.is_available()):
            raise UnavailableError(
                f"{where}.strategy: {train.strategy} needs CUDA GPUs (Lightning runs DeepSpeed on "
                f"CUDA only), and {where}.accelerator is {train.accelerator} on this machine; use ddp or fsdp"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise UnavailableError(
                f"{where}.strategy: {train.strategy} needs DeepSpeed, which is not installed "
                "(pip install 'rsa-pl[deepspeed]'); or use ddp / fsdp"
            )
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=str(checkpoint_dir),
            filename="step-{step}",
            save_last=True,
            save_top_k=0,
            every_n_train_steps=train.checkpoint_every_n_steps,
        ),
        *(extra or []),
    ]
    callbacks.append(RichProgressBar() if sys.stderr.isatty() else LogProgress(where.removesuffix(".train")))
    loggers = _loggers(log_dir, checkpoint_dir / "live" if live_dir is None else live_dir, checkpoint_dir / JOURNAL)
    try:
        return _trainer(train, log_dir, callbacks, loggers)
    except (MisconfigurationException, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnavailableError(
            f"{where}: strategy {train.strategy} on {train.devices} {train.accelerator} device(s) x "
            f"{train.num_nodes} node(s), precision {train.precision}: {first}"
        ) from None


def resolve_precision(train: TrainParams) -> str:
    """train.precision, with auto resolved for the machine: bf16-mixed on a CUDA GPU that has bf16
    (Ampere and later), 16-mixed on an older one, 32-true on the CPU (accelerator cpu, or no GPU)."""
    if train.precision != "auto":
        return train.precision
    if train.accelerator in ("auto", "gpu") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _strategy(train: TrainParams) -> str | Strategy:
    """train.strategy as Lightning takes it; fsdp: ShardedStrategy (rsa_pl/sharded.py)."""
    return ShardedStrategy(resolve_precision(train)) if train.strategy == "fsdp" else train.strategy


def _trainer(train: TrainParams, log_dir: Path, callbacks: list[Callback], loggers: list[Logger]) -> L.Trainer:
    return L.Trainer(
        accelerator=train.accelerator,
        strategy=_strategy(train),
        devices=train.devices,
        num_nodes=train.num_nodes,
        precision=resolve_precision(train),
        max_epochs=train.max_epochs,
        max_steps=train.max_steps,
        accumulate_grad_batches=train.accumulate_grad_batches,
        gradient_clip_val=train.gradient_clip_val or None,
        val_check_interval=train.val_every_n_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=train.log_every_n_steps,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=loggers,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=False,  # SeededBatches shards by rank itself
        default_root_dir=str(log_dir),
    )


def mark_finished(checkpoint_dir: Path) -> None:
    """Record that the run in checkpoint_dir completed, so that a later run starts fresh."""
    marker = checkpoint_dir / FINGERPRINT
    recorded = json.loads(marker.read_text())
    marker.write_text(json.dumps({**recorded, "finished": True}, indent=2, default=str))
