"""Reading a stage's dvclive folder as DVC does: the summary flattened, the curves per metric."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def summary(folder: Path) -> dict[str, float]:
    """folder/metrics.json with its nesting joined by "/" (dvclive nests "train/loss" as
    {"train": {"loss": ...}}), less dvclive's own "step"."""

    def flat(node: dict[str, Any], prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in node.items():
            if isinstance(value, dict):
                out |= flat(value, f"{prefix}{key}/")
            else:
                out[f"{prefix}{key}"] = value
        return out

    found = flat(json.loads((folder / "metrics.json").read_text()))
    found.pop("step", None)
    return found


def curve(folder: Path, name: str) -> list[tuple[int, float]]:
    """The (step, value) rows of the metric name ("train/loss_step") in folder/plots/metrics."""
    path = folder / "plots" / "metrics" / f"{name}.tsv"
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    column = name.rsplit("/", 1)[-1]
    return [(int(row["step"]), float(row[column])) for row in rows]


def curves(folder: Path) -> list[str]:
    """The names of the metrics folder holds a curve of."""
    root = folder / "plots" / "metrics"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.tsv"))
