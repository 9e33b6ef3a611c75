"""How stages write their outputs: whole or not at all, and metrics where DVC reads them."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any


def staging_for(out: Path) -> Path:
    """An empty folder beside out to build the stage's output in."""
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: Path, out: Path) -> None:
    """Replace out with staging so that out is always either the old or the new whole output."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def flat_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of metrics as floats, sorted by key (dvc metrics diff-friendly)."""
    return {k: float(v) for k, v in sorted(metrics.items()) if hasattr(v, "__float__")}


def write_curves(log_dir: Path, target: Path) -> None:
    """The CSV logger's step-wise metrics, with a stable column order, for `dvc plots`."""
    source = log_dir / "metrics.csv"
    if source.exists():
        rows = list(csv.DictReader(source.open()))
        keys = sorted({k for r in rows for k, v in r.items() if v not in ("", None)})
        with target.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=keys)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in keys})


def publish_metrics(out: Path, metrics_file: Path | None) -> None:
    """Copy out/metrics.json (and out/curves.csv) to metrics_file (and <stem>_curves.csv) for DVC,
    which forbids metrics inside an output folder."""
    if metrics_file is None:
        return
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "metrics.json", metrics_file)
    if (out / "curves.csv").exists():
        shutil.copyfile(out / "curves.csv", metrics_file.with_name(f"{metrics_file.stem}_curves.csv"))
