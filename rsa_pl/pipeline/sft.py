"""`rsa-pl sft`: the base model. Embedded world: a tiny model trained from scratch on data/sft,
then judged by the oracle on held-out prompts (sampled at the params' temperature). A
pretrained base (hub id or local folder): loaded once and saved to models/sft as safetensors in
its own dtype, with the tokenizer prepare used, so that every later stage reads one local folder,
DVC caches the exact weights the run used (a hub id's revision can move), and base_model.json
records where they came from.

Writes models/sft/ (HF model + tokenizer, metrics.json) atomically, and logs through dvclive to
metrics/sft/ (metrics.json, plots/metrics/: what `dvc metrics`, `dvc plots` and `dvc exp show`
read; DVC forbids metrics inside an output folder). Wall-clock timings go to metrics/sft/ only:
models/sft holds the same bytes whenever it holds the same model, so a rerun that changes nothing
reruns nothing after it. Checkpoints live in checkpoints/sft/, which DVC does not track (so that
its run-cache can restore the stage), so that a killed run resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from datasets import load_from_disk
from rich.console import Console

from rsa_pl.config import Params
from rsa_pl.data.collate import SFTCollator
from rsa_pl.data.datamodule import TokenizedDataModule
from rsa_pl.errors import UnavailableError
from rsa_pl.evaluation.generation import generate
from rsa_pl.evaluation.quality import oracle_quality
from rsa_pl.models import build_scratch_model, count_parameters, load_causal_lm, load_tokenizer
from rsa_pl.modules import SFTModule
from rsa_pl.params_file import load_params
from rsa_pl.pipeline.artifacts import BASE_RECORD
from rsa_pl.pipeline.outputs import flat_numbers, staging_for, swap_in, write_metrics
from rsa_pl.sharded import full_weights
from rsa_pl.training import build_trainer, fit, live, mark_finished, record_summary, resumable_checkpoint


def _sample_quality(params: Params, model: Any, tokenizer: Any, data: Path) -> dict[str, float]:
    sets = {name: load_from_disk(str(data / name)) for name in ("eval_helpful", "eval_redteam")}
    answers = {
        name: generate(
            model,
            tokenizer,
            ds["prompt_input_ids"],
            temperature=params.sft.sample.temperature,
            max_new_tokens=params.sft.sample.max_new_tokens,
            seed=params.sft.sample.seed,
        )
        for name, ds in sets.items()
    }
    pairs = {name: list(zip(sets[name]["prompt"], answers[name], strict=True)) for name in sets}
    quality = oracle_quality(pairs["eval_helpful"], pairs["eval_redteam"], params.prepare.world)
    return {f"sample/{k}": v for k, v in quality.items()}


def run(
    params_path: Path, data: Path, out: Path, checkpoints: Path, console: Console, metrics_dir: Path | None = None
) -> dict[str, float]:
    """Train (or record) the base model into out; its curves and metrics go to the dvclive folder
    metrics_dir (default checkpoints/live)."""
    params = load_params(params_path)
    metrics_dir = checkpoints / "live" if metrics_dir is None else metrics_dir
    staging = staging_for(out)
    try:
        if params.sft.model.kind == "pretrained":
            metrics = _materialize(params, data, staging, checkpoints, console, metrics_dir)
        else:
            metrics = _train(params, data, staging, checkpoints, console, metrics_dir)
        if metrics is None:  # a DDP rank other than 0: rank 0 writes the outputs
            return {}
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


def _materialize(
    params: Params, data: Path, staging: Path, checkpoints: Path, console: Console, metrics_dir: Path
) -> dict[str, float]:
    """The pretrained base as a local folder: its weights in their own dtype (lossless, no float32
    copy of a bf16 7B), data/tokenizer (the one prepare tokenized with), base_model.json."""
    m = params.sft.model
    started = time.perf_counter()
    model = load_causal_lm(str(m.name_or_path), m.trust_remote_code, dtype="auto", gguf_file=m.gguf_file)
    tokenizer = load_tokenizer(data / "tokenizer", params.prepare.tokenizer.trust_remote_code)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UnavailableError(
            f"sft.model.name_or_path: {m.name_or_path} has {rows} token embeddings but prepare's tokenizer "
            f"({data / 'tokenizer'}) has {len(tokenizer)} tokens; tokenize with the model's own tokenizer "
            "(prepare.tokenizer.kind: pretrained, its name_or_path)"
        )
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    revision = getattr(model.config, "_commit_hash", None)
    record = {"source": m.name_or_path, "gguf_file": m.gguf_file, "revision": revision,
              "dtype": str(model.dtype).removeprefix("torch."), "trust_remote_code": m.trust_remote_code}  # fmt: skip
    (staging / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    seconds = time.perf_counter() - started
    metrics = {"base/parameters": float(count_parameters(model)), "train/steps": 0.0, "time/load_s": seconds}
    write_metrics(staging, metrics)
    run = live(metrics_dir)
    for name, value in metrics.items():
        run.log_metric(name, value, plot=False)
    run.make_summary()
    # nothing trained: the loss curve dvc.yaml declares (metrics/sft/plots/metrics), empty
    empty = metrics_dir / "plots" / "metrics" / "train" / "loss_step.tsv"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_text("step\tloss_step\n")
    console.print(f"sft: base model {m.name_or_path} ({count_parameters(model):,} parameters, {record['dtype']}), "
                  f"saved as is: nothing trained")  # fmt: skip
    return metrics


def _train(
    params: Params, data: Path, staging: Path, checkpoints: Path, console: Console, metrics_dir: Path
) -> dict[str, float] | None:
    train = params.sft.train
    identity = {"sft": params.sft.model_dump(), "prepare": params.prepare.model_dump()}
    resume, note = resumable_checkpoint(checkpoints, identity)
    # before anything loads: a strategy or device this machine lacks fails here, in one line
    trainer = build_trainer(train, checkpoints / "logs", checkpoints, where="sft.train", live_dir=metrics_dir)
    L.seed_everything(train.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(data / "tokenizer", params.prepare.tokenizer.trust_remote_code)
    model = build_scratch_model(params.sft.model, tokenizer)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    collate = SFTCollator(tokenizer.pad_token_id)
    datamodule = TokenizedDataModule(data / "sft", train.batch_size, collate, train.seed, train.group_by_length)
    console.print(f"sft: {count_parameters(model):,} parameters ({params.sft.model.architecture}); {note}")
    started = time.perf_counter()
    module = SFTModule(model, train, "sft")
    fit(trainer, module, datamodule, resume)  # a checkpoint that carries code: one line, never run
    seconds = time.perf_counter() - started
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    skipped = {"train/skipped_batches": module.skipped_batches} if module.skipped_batches else {}
    metrics = flat_numbers({**final, "time/train_s": seconds, "train/steps": trainer.global_step, **skipped})
    with full_weights(trainer):  # fsdp: every rank gathers the sharded model onto rank 0
        if not trainer.is_global_zero:
            return None
        model.save_pretrained(str(staging), safe_serialization=True)
        if params.prepare.source.kind == "embedded":
            metrics |= _sample_quality(params, model, tokenizer, data)
    tokenizer.save_pretrained(str(staging))
    write_metrics(staging, metrics)
    record_summary(trainer, metrics)
    mark_finished(checkpoints)
    console.print_json(json.dumps(metrics))
    return metrics
