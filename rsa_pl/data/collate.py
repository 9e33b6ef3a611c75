"""Collation with dynamic padding: SFT batches and concatenated [chosen; rejected] preference batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rsa_pl.data.tokenize import IGNORE_INDEX


def right_pad(sequences: list[list[int]], value: int) -> Tensor:
    """(N, T) int64, each sequence followed by value up to the longest one."""
    longest = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [value] * (longest - len(s)) for s in sequences], dtype=torch.long)


def _batch(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    ids = right_pad(input_ids, pad_id)  # (N, T)
    mask = right_pad([[1] * len(s) for s in input_ids], 0)  # (N, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": right_pad(labels, IGNORE_INDEX)}


class SFTCollator:
    """Examples with input_ids and labels -> input_ids, attention_mask, labels of shape (B, T)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        return _batch([e["input_ids"] for e in examples], [e["labels"] for e in examples], self.pad_id)


class PreferenceCollator:
    """Pairs -> one batch of shape (2B, T): the B chosen sequences, then the B rejected ones.

    One forward of each model serves both halves (split with .chunk(2) in the loss).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, pairs: list[dict[str, Any]]) -> dict[str, Tensor]:
        input_ids = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
        labels = [p["chosen_labels"] for p in pairs] + [p["rejected_labels"] for p in pairs]
        return _batch(input_ids, labels, self.pad_id)
