"""SeededBatches: a fixed order per seed and epoch, DDP slices of one-process batches, resumption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from rsa_pl.data.datamodule import SeededBatches, TokenizedDataModule


@pytest.mark.parametrize("grouped", [False, True])
def test_every_example_once_per_epoch_in_a_seeded_order(grouped: bool) -> None:
    lengths = [(i * 37) % 23 for i in range(103)]
    sampler = SeededBatches(lengths, 8, seed=3, grouped=grouped)
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(103))
    assert len(epoch0) == len(sampler) == 13
    assert list(SeededBatches(lengths, 8, seed=3, grouped=grouped)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


@pytest.mark.parametrize("grouped", [False, True])
def test_ddp_ranks_split_the_one_process_batches(grouped: bool) -> None:
    """2 ranks of batch 4 step through the batches of one process with batch 8 (full ones)."""
    lengths = [(i * 37) % 23 for i in range(803)]
    one = SeededBatches(lengths, 8, seed=1, grouped=grouped).global_batches(world=1)
    two = SeededBatches(lengths, 4, seed=1, grouped=grouped).global_batches(world=2)
    assert two == [b for b in one if len(b) == 8]
    assert len(two) == 100  # the short last batch (3 examples) is dropped under DDP


def test_a_resumed_epoch_skips_the_consumed_batches() -> None:
    lengths = list(range(50))
    full = list(SeededBatches(lengths, 4, seed=0, grouped=False))
    resumed = SeededBatches(lengths, 4, seed=0, grouped=False, consumed=lambda: 5)
    assert list(resumed) == full[5:]
    assert len(resumed) == len(full)  # the loops count the consumed ones as done


def test_making_the_loaders_iterators_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """Each new iterator draws a worker base seed; from torch's global generator, that draw
    shifted the dropout masks after every epoch start, so a run resumed from a checkpoint taken
    at the end of an epoch diverged from the uninterrupted one (seen as a kill -9 test failing
    on a faster machine, whose kill landed on that step)."""
    ids = [[1, 2, 3], [4, 5], [6], [7, 8]]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    DatasetDict({"train": data, "validation": data}).save_to_disk(str(tmp_path / "data"))
    module = TokenizedDataModule(tmp_path / "data", batch_size=2, collate=list, seed=0, group_by_length=False)
    module.setup()
    for loader in (module.train_dataloader(), module.val_dataloader()):
        before = torch.get_rng_state()
        batches = list(loader)
        assert batches
        assert torch.equal(torch.get_rng_state(), before)


def test_lightning_reshuffles_every_epoch(tmp_path: Path) -> None:
    """Through a real Trainer: each epoch takes SeededBatches' order for that epoch (Lightning
    never calls set_epoch on a batch sampler, so every epoch once repeated epoch 0's order)."""
    import lightning as L

    ids = [[i, i + 1] for i in range(12)]
    DatasetDict({"train": Dataset.from_dict({"input_ids": ids}), "validation": Dataset.from_dict({"input_ids": ids})}
                ).save_to_disk(str(tmp_path / "data"))  # fmt: skip
    seen: list[list[int]] = []

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
            seen.append([example["input_ids"][0] for example in batch])
            return self.weight.sum() * 0

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = TokenizedDataModule(tmp_path / "data", batch_size=4, collate=list, seed=0, group_by_length=False)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(Recorder(), datamodule=module)
    epochs = [seen[i : i + 3] for i in range(0, 9, 3)]
    for epoch, batches in enumerate(epochs):
        want = SeededBatches([2] * 12, 4, seed=0, grouped=False)
        want.set_epoch(epoch)
        assert batches == list(want), epoch
    assert epochs[0] != epochs[1] != epochs[2]
