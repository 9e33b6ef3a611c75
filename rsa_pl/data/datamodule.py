"""A LightningDataModule over a tokenized DatasetDict (train/validation) written by prepare."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from datasets import Dataset, DatasetDict, load_from_disk
from torch.utils.data import DataLoader, Sampler

# Examples per sorting group, in batches: larger groups pad less but batches vary less in order.
_GROUP_BATCHES = 50


def example_lengths(dataset: Dataset) -> list[int]:
    """Tokens of each example (the longer side of a pair), which is what padding is paid on."""
    if "input_ids" in dataset.column_names:
        return [len(ids) for ids in dataset["input_ids"]]
    return [
        max(len(c), len(r)) for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"], strict=True)
    ]


class SeededBatches(Sampler[list[int]]):
    """Seeded random batches, every example once per epoch, optionally of similar lengths.

    Each epoch: shuffle; when grouped, sort groups of _GROUP_BATCHES batches by length (less
    padding, about 2x the tokens/s on the embedded world, but each batch then holds one kind
    of answer: short refusals or long compliance, which biases the last updates); cut into
    batches; shuffle the batches. Under torch.distributed each rank takes every
    world_size-th batch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, grouped: bool) -> None:
        self.lengths, self.batch_size, self.seed, self.grouped, self.epoch = lengths, batch_size, seed, grouped, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        group = self.batch_size * (_GROUP_BATCHES if self.grouped else 1)
        batches = []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            if self.grouped:
                chunk = sorted(chunk, key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            batches = batches[: len(batches) // world * world][rank::world]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        n = math.ceil(len(self.lengths) / self.batch_size)
        return n // world if world > 1 else n


class TokenizedDataModule(L.LightningDataModule):
    """Seeded training batches (SeededBatches) and ordered validation batches, collated by `collate`."""

    def __init__(
        self, path: str | Path, batch_size: int, collate: Callable[[list[dict]], Any], seed: int, group_by_length: bool
    ) -> None:
        super().__init__()
        self.path, self.batch_size, self.collate, self.seed = Path(path), batch_size, collate, seed
        self.group_by_length = group_by_length
        self.data: DatasetDict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = load_from_disk(str(self.path))

    def train_dataloader(self) -> DataLoader:
        assert self.data is not None
        train = self.data["train"]
        batches = SeededBatches(example_lengths(train), self.batch_size, self.seed, self.group_by_length)
        return DataLoader(train, batch_sampler=batches, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        assert self.data is not None
        return DataLoader(self.data["validation"], batch_size=self.batch_size, collate_fn=self.collate)
