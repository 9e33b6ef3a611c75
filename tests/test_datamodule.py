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
