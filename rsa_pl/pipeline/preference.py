"""`rsa-pl train-reward` and `rsa-pl train-safety`: the two RSA stages (docs/method.md, "Stepwise alignment").

Stage 1 (train_reward) aligns the SFT model for helpfulness on data/helpful_pairs with the SFT
model as reference; stage 2 (train_safety) realigns the stage-1 policy for safety on
data/safety_pairs with the stage-1 policy as reference (its adapter folded into the weights,
then a new adapter trained on top). Each stage's `pairs` param names its set, so swapping
them runs the reverse order (safety first) through the same DAG. Outputs, in Hugging Face format, written atomically:
    models/reward/   the stage-1 LoRA adapter (base: models/sft) or full weights, + tokenizer
    models/safety/   the stage-2 policy as full weights (W + dH + dS), its adapter in adapter/
                     (base: models/sft with models/reward folded in), + tokenizer
plus metrics.json in each, less the wall-clock timings (so that a rerun that trains the same
model writes the same bytes and DVC reruns nothing after it). The curves and the metrics with
the timings go through dvclive to metrics/<stage>/ (metrics.json, plots/metrics/) for DVC.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from peft import PeftModel
from rich.console import Console
from transformers import PreTrainedModel

from rsa_pl.config import Params, PreferenceStageParams, TrainParams
from rsa_pl.data.collate import PreferenceCollator
from rsa_pl.data.datamodule import TokenizedDataModule
from rsa_pl.models import (
    FROZEN_ADAPTER,
    attach_lora,
    check_quantization_backend,
    count_parameters,
    load_aligned_policy,
    load_causal_lm,
    load_quantized,
    load_tokenizer,
    stack_lora,
)
from rsa_pl.modules import PreferenceModule
from rsa_pl.params_file import load_params
from rsa_pl.pipeline.artifacts import base_model, trusts_code
from rsa_pl.pipeline.outputs import flat_numbers, staging_for, swap_in, write_metrics
from rsa_pl.sharded import full_weights
from rsa_pl.training import build_trainer, fit, mark_finished, record_summary, resumable_checkpoint

# stage -> (output folder in models/, the stage whose policy is the reference); the pairs
# each trains on are a param (pairs: helpful | safety), so the reverse order is one swap
STAGES: dict[str, tuple[str, str | None]] = {
    "train_reward": ("reward", None),
    "train_safety": ("safety", "reward"),
}


def pairs_folder(section: PreferenceStageParams) -> str:
    """The data/ folder of the preference set a stage trains on."""
    return f"{section.pairs}_pairs"


class Policy(NamedTuple):
    """A stage's trainable model and its reference (see PreferenceModule)."""

    model: PreTrainedModel
    reference: PreTrainedModel | None
    reference_adapters: list[str] | None


def _device(train: TrainParams) -> str:
    gpu = train.accelerator == "gpu" or (train.accelerator == "auto" and torch.cuda.is_available())
    return "cuda" if gpu else "cpu"


def _starting_policy(models: Path, previous: str | None) -> PreTrainedModel:
    base, trust = base_model(models), trusts_code(models)
    return load_causal_lm(base, trust) if previous is None else load_aligned_policy(base, models / previous, trust)


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def policy_and_reference(section: PreferenceStageParams, models: Path, previous: str | None) -> Policy:
    """The trainable policy and how to get the reference from it (see PreferenceModule).

    Full precision: the starting policy (SFT, or SFT with the stage-1 adapter folded in) with
    a new adapter (reference: adapter disabled) or fully trainable (reference: a frozen copy).
    4-bit (QLoRA): the base loaded in 4 bits with a new adapter; in stage 2 after a LoRA stage 1
    the stage-1 adapter is kept, frozen, under the new one (reference: the stage-1 adapter
    alone), since folding it into 4-bit weights would round it away.
    """
    quant, lora = section.quantization, section.lora
    if quant is None:
        start = _starting_policy(models, previous)
        if lora is None:  # peft leaves a folded stage-1 policy frozen: make it trainable again
            return Policy(start.requires_grad_(True), copy.deepcopy(start).requires_grad_(False), None)
        return Policy(attach_lora(start, lora), None, None)
    assert lora is not None  # params validation: quantization needs lora
    device = _device(section.train)
    check_quantization_backend(quant, device)
    checkpointing = section.train.gradient_checkpointing
    if previous is not None and _is_adapter(models / previous):
        model = load_quantized(base_model(models), quant, device, checkpointing, trusts_code(models))
        return Policy(stack_lora(model, models / previous, lora), None, [FROZEN_ADAPTER])
    start = base_model(models) if previous is None else models / previous
    quantized = load_quantized(start, quant, device, checkpointing, trusts_code(models))
    return Policy(attach_lora(quantized, lora), None, None)


def pairs_path(data: Path, made: Path | None, folder: str) -> Path:
    """Where a stage's pairs are: made on-policy by the pairs stage (made/), else prepared (data/)."""
    return made / folder if made is not None and (made / folder).exists() else data / folder


def run(stage: str, params_path: Path, data: Path, models: Path, checkpoints: Path, console: Console,
        metrics_dir: Path | None = None, made_pairs: Path | None = None) -> dict[str, float]:  # fmt: skip
    """Train one preference stage into models/<reward|safety>; return its final metrics.
    metrics_dir: the dvclive folder of its curves and metrics (default checkpoints/live);
    made_pairs: the pairs stage's folder (used when it holds this stage's pairs)."""
    params = load_params(params_path)
    name, previous = STAGES[stage]
    out = models / name
    staging = staging_for(out)
    try:
        pairs = pairs_path(data, made_pairs, pairs_folder(getattr(params, stage)))
        live_dir = checkpoints / "live" if metrics_dir is None else metrics_dir
        metrics = _train(params, stage, pairs, models, previous, staging, checkpoints, console, data, live_dir)
        if metrics is None:  # a DDP rank other than 0: rank 0 writes the outputs
            return {}
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


def _train(params: Params, stage: str, pairs: Path, models: Path, previous: str | None, staging: Path,
           checkpoints: Path, console: Console, data: Path, live_dir: Path) -> dict[str, float] | None:  # fmt: skip
    section = getattr(params, stage)
    train = section.train
    identity = {
        stage: section.model_dump(),
        "previous": params.train_reward.model_dump() if previous else None,
        "sft": params.sft.model_dump(),
        "prepare": params.prepare.model_dump(),
    }
    resume, note = resumable_checkpoint(checkpoints, identity)
    # before anything loads: a strategy or device this machine lacks fails here, in one line
    trainer = build_trainer(train, checkpoints / "logs", checkpoints, where=f"{stage}.train", live_dir=live_dir)
    L.seed_everything(train.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(data / "tokenizer", params.prepare.tokenizer.trust_remote_code)
    policy, reference, reference_adapters = policy_and_reference(section, models, previous)
    if train.gradient_checkpointing and section.quantization is None:  # load_quantized enabled it
        policy.gradient_checkpointing_enable()
    collate = PreferenceCollator(tokenizer.pad_token_id)
    datamodule = TokenizedDataModule(pairs, train.batch_size, collate, train.seed, train.group_by_length)
    trainable = count_parameters(policy, trainable_only=True)
    console.print(f"{stage}: {trainable:,} trainable parameters, loss {section.loss}; {note}")
    module = PreferenceModule(policy, train, section.objective(), reference, reference_adapters, stage=stage)
    started = time.perf_counter()
    fit(trainer, module, datamodule, resume)  # a checkpoint that carries code: one line, never run
    seconds = time.perf_counter() - started
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    with full_weights(trainer):  # fsdp: every rank gathers the sharded model onto rank 0
        if trainer.is_global_zero:
            _save(policy, models, previous, staging)
    if not trainer.is_global_zero:
        return None
    tokenizer.save_pretrained(str(staging))
    skipped = {"train/skipped_batches": module.skipped_batches} if module.skipped_batches else {}
    metrics = flat_numbers({**final, "time/train_s": seconds, "train/steps": trainer.global_step, **skipped})
    write_metrics(staging, metrics)
    record_summary(trainer, metrics)
    mark_finished(checkpoints)
    console.print_json(json.dumps(metrics))
    return metrics


def _stable_adapter_config(folder: Path) -> None:
    """peft keeps target_modules as a set and writes it in the process's hash order: sorted here,
    so that the same adapter is the same bytes in every run (DVC then reruns nothing after it)."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save(policy: PreTrainedModel, models: Path, previous: str | None, staging: Path) -> None:
    """Full fine-tuning: the weights. Stage 1 with LoRA: the adapter (its base is models/sft).
    Stage 2 with LoRA: the adapter in adapter/ (for RSA(P) merging) and full weights, because
    the adapter's base (SFT with the stage-1 policy folded in) exists nowhere else. With 4-bit
    training the full weights fold the adapters into the float32 weights (QLoRA's usual merge:
    the 4-bit rounding of the frozen base is not baked into the released model)."""
    if not isinstance(policy, PeftModel):
        policy.save_pretrained(str(staging), safe_serialization=True)
        return
    if previous is None:
        policy.save_pretrained(str(staging), selected_adapters=["default"])
        _stable_adapter_config(staging)
        return
    policy.save_pretrained(str(staging / "adapter"), selected_adapters=["default"])
    _stable_adapter_config(staging / "adapter")
    start = _starting_policy(models, previous)
    merged = PeftModel.from_pretrained(start, str(staging / "adapter")).merge_and_unload()
    merged.save_pretrained(str(staging), safe_serialization=True)
