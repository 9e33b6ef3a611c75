"""A LightningDataModule over a tokenized DatasetDict (train/validation) written by prepare."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
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


def _world() -> tuple[int, int]:
    """(world size, rank) under torch.distributed, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class SeededBatches(Sampler[list[int]]):
    """Seeded random batches, every example once per epoch, optionally of similar lengths.

    Each epoch: shuffle; when grouped, sort groups of _GROUP_BATCHES batches by length (less
    padding, about 2x the tokens/s on the embedded world, but each batch then holds one kind
    of answer: short refusals or long compliance, which biases the last updates); cut into
    global batches of batch_size x world size; shuffle them. Under torch.distributed rank r
    takes the r-th slice of batch_size of every global batch, so that N processes with
    batch_size b see, step by step, the same examples as one process with batch_size N*b
    (the DDP loss is then the one-process loss); the last global batch of an epoch, if
    short, is dropped under DDP so that all ranks step together.

    `consumed()`, asked when an epoch starts, says how many of its batches were already
    trained on: a resumed run answers with its checkpoint's count, so that it continues with
    exactly the batches an uninterrupted run would have seen. `epoch()`, asked then too, says
    which epoch starts (None: the one set_epoch set). Lightning calls set_epoch only on a
    loader's sampler or its batch sampler's sampler, never on a batch sampler itself, so the
    datamodule passes the loop's epoch this way.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, grouped: bool,
                 consumed: Callable[[], int] = lambda: 0,
                 epoch: Callable[[], int | None] = lambda: None) -> None:  # fmt: skip
        self.lengths, self.batch_size, self.seed, self.grouped, self.epoch = lengths, batch_size, seed, grouped, 0
        self.consumed, self.current_epoch = consumed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, world: int) -> list[list[int]]:
        """The epoch's batches of batch_size * world examples, in training order."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * world
        group = size * (_GROUP_BATCHES if self.grouped else 1)
        batches = []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            if self.grouped:
                chunk = sorted(chunk, key=self.lengths.__getitem__)
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        rng.shuffle(batches)
        if world > 1:
            batches = [b for b in batches if len(b) == size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.current_epoch()
        if epoch is not None:
            self.epoch = epoch
        world, rank = _world()
        for batch in self.global_batches(world)[self.consumed() :]:
            yield batch[rank * self.batch_size : (rank + 1) * self.batch_size]

    def __len__(self) -> int:
        world, _ = _world()
        if world > 1:
            return len(self.lengths) // (self.batch_size * world)
        return math.ceil(len(self.lengths) / self.batch_size)


class ResumableLoader(DataLoader):
    """A DataLoader over SeededBatches that Lightning checkpoints and restores.

    The position in the epoch comes from the loops' own progress (SeededBatches.consumed);
    the state saved here identifies the order, so that a checkpoint is only resumed into
    the same order.
    """

    def state_dict(self) -> dict[str, Any]:
        sampler = self.batch_sampler
        assert isinstance(sampler, SeededBatches)
        return {"seed": sampler.seed, "batch_size": sampler.batch_size, "examples": len(sampler.lengths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state != self.state_dict():
            raise ValueError(f"the checkpoint was trained on another data order: {state} != {self.state_dict()}")


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
        batches = SeededBatches(
            example_lengths(train),
            self.batch_size,
            self.seed,
            self.group_by_length,
            consumed=self._consumed_batches,
            epoch=self._current_epoch,
        )
        return ResumableLoader(train, batch_sampler=batches, collate_fn=self.collate, generator=self._generator())

    def _consumed_batches(self) -> int:
        """Batches of the current epoch that the checkpoint being resumed had trained on (else 0).

        Read when the epoch's iterator is made: after Lightning restored the loops' progress
        from the checkpoint and before they run (the loader itself was made earlier, to count
        the steps for the schedule)."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.epoch_loop.restarting:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _current_epoch(self) -> int | None:
        """The epoch the fit loop is starting (the value Lightning gives samplers' set_epoch)."""
        return None if self.trainer is None else self.trainer.fit_loop.epoch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        assert self.data is not None
        return DataLoader(
            self.data["validation"], batch_size=self.batch_size, collate_fn=self.collate, generator=self._generator()
        )

    def _generator(self) -> torch.Generator:
        """A loader's own generator. Making an iterator draws a worker base seed, from torch's
        global generator unless the loader has one: it would shift the dropout masks after
        every epoch start and validation, so that a run resumed from a checkpoint taken at the
        end of an epoch drew other masks than the uninterrupted run (which draws the next
        epoch's seed after that checkpoint, the resumed run before restoring its RNG state)."""
        return torch.Generator().manual_seed(self.seed)
