"""`rsa-pl train-reward` and `rsa-pl train-safety`: the two RSA stages (PAPER.md, "Stepwise alignment").

Stage 1 (train_reward) aligns the SFT model for helpfulness on data/helpful_pairs with the SFT
model as reference; stage 2 (train_safety) realigns the stage-1 policy for safety on
data/safety_pairs with the stage-1 policy as reference (its adapter folded into the weights,
then a new adapter trained on top). Outputs, in Hugging Face format, written atomically:
    models/reward/   the stage-1 LoRA adapter (base: models/sft) or full weights, + tokenizer
    models/safety/   the stage-2 policy as full weights (W + dH + dS), its adapter in adapter/
                     (base: models/sft with models/reward folded in), + tokenizer
plus metrics.json and curves.csv in each, copied to metrics/<stage>.json for DVC.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import lightning as L
from rich.console import Console
from transformers import AutoTokenizer, PreTrainedModel

from pipeline.outputs import flat_numbers, publish_metrics, staging_for, swap_in, write_curves
from pipeline.sft import BASE_RECORD
from rsa_pl.config import Params, load_params
from rsa_pl.data.collate import PreferenceCollator
from rsa_pl.data.datamodule import TokenizedDataModule
from rsa_pl.models import attach_lora, count_parameters, load_aligned_policy, load_causal_lm
from rsa_pl.modules import PreferenceModule
from rsa_pl.training import build_trainer, mark_finished, resumable_checkpoint

# stage -> (pairs set in data/, output folder in models/, the stage whose policy is the reference)
STAGES: dict[str, tuple[str, str, str | None]] = {
    "train_reward": ("helpful_pairs", "reward", None),
    "train_safety": ("safety_pairs", "safety", "reward"),
}


def base_model(models: Path) -> str:
    """The SFT model: models/sft, or the pretrained model it records."""
    record = models / "sft" / BASE_RECORD
    return json.loads(record.read_text())["name_or_path"] if record.exists() else str(models / "sft")


def _starting_policy(models: Path, previous: str | None) -> PreTrainedModel:
    base = base_model(models)
    return load_causal_lm(base) if previous is None else load_aligned_policy(base, models / previous)


def run(stage: str, params_path: Path, data: Path, models: Path, checkpoints: Path, console: Console,
        metrics_file: Path | None = None) -> dict[str, float]:  # fmt: skip
    """Train one preference stage into models/<reward|safety>; return its final metrics."""
    params = load_params(params_path)
    pairs, name, previous = STAGES[stage]
    out = models / name
    staging = staging_for(out)
    try:
        metrics = _train(params, stage, data / pairs, models, previous, staging, checkpoints, console)
        if metrics is None:  # a DDP rank other than 0: rank 0 writes the outputs
            return {}
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    publish_metrics(out, metrics_file)
    return metrics


def _train(params: Params, stage: str, pairs: Path, models: Path, previous: str | None, staging: Path,
           checkpoints: Path, console: Console) -> dict[str, float] | None:  # fmt: skip
    section = getattr(params, stage)
    train = section.train
    L.seed_everything(train.seed, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(str(pairs.parent / "tokenizer"))
    start = _starting_policy(models, previous)
    if section.lora is not None:
        policy, reference = attach_lora(start, section.lora), None
    else:
        policy, reference = start, copy.deepcopy(start)
    if train.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    collate = PreferenceCollator(tokenizer.pad_token_id)
    datamodule = TokenizedDataModule(pairs, train.batch_size, collate, train.seed, train.group_by_length)
    identity = {
        stage: section.model_dump(),
        "previous": params.train_reward.model_dump() if previous else None,
        "sft": params.sft.model_dump(),
        "prepare": params.prepare.model_dump(),
    }
    resume, note = resumable_checkpoint(checkpoints, identity)
    trainable = count_parameters(policy, trainable_only=True)
    console.print(f"{stage}: {trainable:,} trainable parameters, loss {section.loss}; {note}")
    module = PreferenceModule(policy, train, section.objective(), reference)
    trainer = build_trainer(train, checkpoints / "logs", checkpoints)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return None
    _save(policy, section.lora is not None, previous is not None, staging)
    tokenizer.save_pretrained(str(staging))
    metrics = flat_numbers({**final, "time/train_s": seconds, "train/steps": trainer.global_step})
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_curves(checkpoints / "logs", staging / "curves.csv")
    mark_finished(checkpoints)
    console.print_json(json.dumps(metrics))
    return metrics


def _save(policy: PreTrainedModel, adapter: bool, stacked: bool, staging: Path) -> None:
    """Stage 1 with LoRA: the adapter (its base is models/sft). Stage 2 with LoRA: full weights,
    because its adapter's base (SFT + stage-1 adapter) exists nowhere else, and the adapter in
    adapter/ for RSA(P) merging. Full fine-tuning: the weights."""
    if adapter and not stacked:
        policy.save_pretrained(str(staging))
        return
    if adapter:
        policy.save_pretrained(str(staging / "adapter"))
        policy = policy.merge_and_unload()
    policy.save_pretrained(str(staging), safe_serialization=True)
