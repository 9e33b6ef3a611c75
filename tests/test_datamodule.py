"""SeededBatches: a fixed order per seed and epoch, DDP slices of one-process batches, resumption."""

from __future__ import annotations

import pytest

from rsa_pl.data.datamodule import SeededBatches


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
