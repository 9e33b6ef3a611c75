"""Validation metrics are means over the whole validation set: SFT's val/loss over every response
token, the preference stages' val/* over every pair; equal, within float32 summation, to a float64
loop over the set one example at a time, on one process and on two gloo DDP ranks on the CPU,
whichever way the set is split (rsa_pl/modules.py's docstring)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from datasets import Dataset, DatasetDict, load_from_disk
from torch.utils.data import DataLoader, DistributedSampler

from rsa_pl.config import PreferenceStageParams, TrainParams
from rsa_pl.data.collate import PreferenceCollator, SFTCollator
from rsa_pl.data.datamodule import TokenizedDataModule
from rsa_pl.data.tokenize import IGNORE_INDEX
from rsa_pl.models import attach_lora, build_scratch_model
from rsa_pl.modules import PreferenceModule, SFTModule, next_token_targets
from tests.helpers import ROOT, scratch_model_params

EXAMPLES = 7  # validation examples (pairs): batches of 3, 3 and 1; 4 and 3 on two ranks
BATCH = 3
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "risk/chosen", "risk/rejected")  # fmt: skip


class Vocabulary:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 50


def _sequence(g: torch.Generator, prompt: int, response: int) -> tuple[list[int], list[int]]:
    ids = torch.randint(3, 50, (prompt + response,), generator=g).tolist()
    return ids, [IGNORE_INDEX] * prompt + ids[prompt:]


def write_data(folder: Path) -> None:
    """folder/sft and folder/pairs: a few training examples and EXAMPLES validation examples of
    different prompt and response lengths (so batches hold different numbers of tokens)."""
    g = torch.Generator().manual_seed(0)

    def sft(n: int) -> Dataset:
        rows = [_sequence(g, 2 + i % 5, 1 + (7 * i) % 13) for i in range(n)]
        return Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})

    def pairs(n: int) -> Dataset:
        rows: dict[str, list[list[int]]] = {k: [] for k in ("chosen_input_ids", "chosen_labels",
                                                            "rejected_input_ids", "rejected_labels")}  # fmt: skip
        for i in range(n):
            prompt = 2 + i % 4
            chosen, chosen_labels = _sequence(g, prompt, 1 + (5 * i) % 9)
            rejected, rejected_labels = _sequence(g, prompt, 1 + (3 * i) % 7)
            rejected[:prompt] = chosen[:prompt]
            for key, value in zip(rows, (chosen, chosen_labels, rejected, rejected_labels), strict=True):
                rows[key].append(value)
        return Dataset.from_dict(rows)

    DatasetDict({"train": sft(8), "validation": sft(EXAMPLES)}).save_to_disk(str(folder / "sft"))
    DatasetDict({"train": pairs(8), "validation": pairs(EXAMPLES)}).save_to_disk(str(folder / "pairs"))


def modules() -> tuple[SFTModule, PreferenceModule]:
    """The same tiny modules in every process: an SFT model, and a LoRA policy whose adapter
    already moves it off its reference (the committed params' train_reward objective, cvar)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    section = PreferenceStageParams.model_validate(raw["train_reward"])
    torch.manual_seed(0)
    sft = SFTModule(build_scratch_model(scratch_model_params("llama", 64), Vocabulary()),
                    TrainParams.model_validate(raw["sft"]["train"]), "sft")  # fmt: skip
    policy = attach_lora(build_scratch_model(scratch_model_params("llama", 64), Vocabulary()), section.lora)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.1)
    return sft, PreferenceModule(policy, section.train, section.objective(), None)


def sft_reference(module: SFTModule, examples: Dataset) -> dict[str, float]:
    """val/loss as the mean over every response token, one example at a time, summed in float64."""
    total, tokens = 0.0, 0
    module.model.eval()
    with torch.no_grad():
        for example in examples:
            labels = torch.tensor([example["labels"]])
            logits = module.model(input_ids=torch.tensor([example["input_ids"]])).logits
            logits, targets, mask = next_token_targets(logits, labels)
            losses = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="none")
            total += float(losses[mask.flatten()].sum())
            tokens += int(mask.sum())
    return {"val/loss": total / tokens}


def pair_reference(module: PreferenceModule, examples: Dataset) -> dict[str, float]:
    """val/* as means over pairs, one pair at a time, summed in float64."""
    sums = dict.fromkeys(PAIR_METRICS, 0.0)
    module.model.eval()
    with torch.no_grad():
        for pair in examples:
            losses, metrics = module.losses(PreferenceCollator(0)([pair]))
            for name, values in {"loss": losses, **metrics}.items():
                sums[name] += float(values.double().sum())
    return {f"val/{name}": value / len(examples) for name, value in sums.items()}


def references(folder: Path) -> dict[str, dict[str, float]]:
    sft, pairs = modules()
    sft_set, pair_set = (load_from_disk(str(folder / name))["validation"] for name in ("sft", "pairs"))
    padded = [*range(EXAMPLES), 0]  # DistributedSampler's 2 x 4: example 0 again on rank 1
    return {
        "sft": sft_reference(sft, sft_set),
        "pairs": pair_reference(pairs, pair_set),
        "sft padded": sft_reference(sft, sft_set.select(padded)),
        "pairs padded": pair_reference(pairs, pair_set.select(padded)),
        "pairs even": pair_reference(pairs, pair_set.select(range(EXAMPLES - 1))),
    }


class ShardedValidation(TokenizedDataModule):
    """Rank r of w validates examples r, r + w, ...: every example once, shares of different sizes."""

    def val_dataloader(self) -> DataLoader:
        assert self.data is not None
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        part = self.data["validation"].select(range(rank, len(self.data["validation"]), world))
        return DataLoader(part, batch_size=self.batch_size, collate_fn=self.collate)


class PaddedValidation(TokenizedDataModule):
    """torch's DistributedSampler (what Lightning's use_distributed_sampler puts in): equal shares,
    the set padded with its first examples to a multiple of the world size; `examples`: a prefix."""

    def __init__(self, *args: Any, examples: int = EXAMPLES) -> None:
        super().__init__(*args)
        self.examples = examples

    def val_dataloader(self) -> DataLoader:
        assert self.data is not None
        part = self.data["validation"].select(range(self.examples))
        sampler = DistributedSampler(part, shuffle=False)
        return DataLoader(part, batch_size=self.batch_size, collate_fn=self.collate, sampler=sampler)


def validate(module: L.LightningModule, datamodule: L.LightningDataModule, devices: int) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    return {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}


def approx(expected: dict[str, float] | float) -> Any:
    # float32 forwards of padded batches against unpadded float64 sums: ~1e-7 apart
    return pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("validation")
    write_data(folder)
    return folder


def test_validation_metrics_are_means_over_the_whole_set_on_one_process(data: Path) -> None:
    expected = references(data)
    sft, pairs = modules()
    sft_data = TokenizedDataModule(data / "sft", BATCH, SFTCollator(0), 0, False)
    pair_data = TokenizedDataModule(data / "pairs", BATCH, PreferenceCollator(0), 0, False)
    assert validate(sft, sft_data, 1) == approx(expected["sft"])
    assert validate(pairs, pair_data, 1) == approx(expected["pairs"])
    # a second validation starts from zero (Lightning resets the metric objects it logged)
    assert validate(sft, sft_data, 1) == approx(expected["sft"])
    assert validate(pairs, pair_data, 1) == approx(expected["pairs"])

    # What SFT's val/loss was before: each batch's token mean, averaged over batches weighted by
    # sequences (Lightning's epoch mean with batch_size = sequences). Batches of 3, 3 and 1
    # sequences with different token counts put it 3e-4 off the mean over tokens here.
    sft_data.setup()
    means, sequences = [], []
    with torch.no_grad():
        for batch in sft_data.val_dataloader():
            logits, targets, mask = next_token_targets(sft.model(batch["input_ids"], batch["attention_mask"]).logits,
                                                       batch["labels"])  # fmt: skip
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            means.append(float(losses[mask.flatten()].mean()))
            sequences.append(len(mask))
    before = sum(m * n for m, n in zip(means, sequences, strict=True)) / sum(sequences)
    assert abs(before - expected["sft"]["val/loss"]) > 1e-4 * expected["sft"]["val/loss"]


def test_validation_during_fit_counts_no_sanity_check_batch(data: Path) -> None:
    """The sanity check's batch is not carried into the validation after the step: val/loss after
    one step is the trained model's mean over the whole set."""
    sft, _ = modules()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, val_check_interval=1, check_val_every_n_epoch=None,
                        num_sanity_val_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(sft, datamodule=TokenizedDataModule(data / "sft", BATCH, SFTCollator(0), 0, False))
    assert trainer.global_step == 1
    expected = sft_reference(sft, load_from_disk(str(data / "sft"))["validation"])
    assert float(trainer.callback_metrics["val/loss"]) == approx(expected["val/loss"])


@pytest.mark.slow
def test_validation_metrics_on_two_ddp_ranks(data: Path, tmp_path: Path) -> None:
    """Two gloo ranks on the CPU, each launched here (Lightning sees LOCAL_RANK and launches
    nothing), each validating (1) the whole set, as TokenizedDataModule has every rank do;
    (2) shares of 4 and 3 examples; (3) DistributedSampler's shares of 4 and 4: the set padded
    with example 0, which is then counted twice: the means over the padded set, not the set;
    (4) the same on 6 examples, which split evenly: exact. (1) and (2) equal the one-process
    reference; before, (2) gave rank 0's 4 examples only (no sync), and Lightning's sync_dist
    would have divided by 3 pairs per rank instead of 3.5 (an integer mean of 7 over 2 ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "NODE_RANK": "0", "RANK": str(rank), "LOCAL_RANK": str(rank), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
        log = (tmp_path / f"rank{rank}.log").open("w")
        command = [sys.executable, "-m", "tests.test_modules_ddp", str(data), str(out)]
        ranks.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 300
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], logs
    got = json.loads(out.read_text())
    expected = references(data)
    for label in ("whole set", "4 and 3"):
        assert got[f"sft {label}"] == approx(expected["sft"]), label
        assert got[f"pairs {label}"] == approx(expected["pairs"]), label
    assert got["sft padded"] == approx(expected["sft padded"])
    assert got["pairs padded"] == approx(expected["pairs padded"])
    assert got["pairs padded"]["val/loss"] != approx(expected["pairs"]["val/loss"])
    assert got["pairs even"] == approx(expected["pairs even"])


def _rank_main(folder: Path, out: Path) -> None:
    """One DDP rank of test_validation_metrics_on_two_ddp_ranks: rank 0 writes what it logged."""
    sft, pairs = modules()
    results = {}
    for name, module, collate in (("sft", sft, SFTCollator(0)), ("pairs", pairs, PreferenceCollator(0))):
        for label, kind in (("whole set", TokenizedDataModule), ("4 and 3", ShardedValidation),
                            ("padded", PaddedValidation)):  # fmt: skip
            results[f"{name} {label}"] = validate(module, kind(folder / name, BATCH, collate, 0, False), 2)
    even = PaddedValidation(folder / "pairs", BATCH, PreferenceCollator(0), 0, False, examples=EXAMPLES - 1)
    results["pairs even"] = validate(pairs, even, 2)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    assert all(math.isfinite(v) for r in results.values() for v in r.values())


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
