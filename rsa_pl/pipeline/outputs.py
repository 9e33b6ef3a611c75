"""How stages write their outputs: whole or not at all, and metrics where DVC reads them."""

from __future__ import annotations

import csv
import json
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


def timing(key: str) -> bool:
    """A wall-clock entry (time/..., .../tokens_per_s): it differs between runs of the same model."""
    return key.startswith("time/") or key.endswith("tokens_per_s")


def write_curves(log_dir: Path, target: Path, timings: bool = True) -> None:
    """The CSV logger's step-wise metrics, with a stable column order, for `dvc plots` (timings
    false: less the wall-clock columns, for a model folder)."""
    source = log_dir / "metrics.csv"
    if source.exists():
        rows = list(csv.DictReader(source.open()))
        keys = sorted({k for r in rows for k, v in r.items() if v not in ("", None) and (timings or not timing(k))})
        with target.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=keys)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in keys})


def write_metrics(folder: Path, metrics: dict[str, float]) -> None:
    """folder/metrics.json (a model folder's): the metrics less the wall-clock ones, so that a
    stage rerun that makes the same model writes the same bytes and DVC reruns nothing after it
    (a base re-saved, or a stage retrained after a code change that leaves its numbers alone)."""
    kept = {k: v for k, v in metrics.items() if not timing(k)}
    (folder / "metrics.json").write_text(json.dumps(kept, indent=2) + "\n")


def publish_metrics(
    out: Path, metrics_file: Path | None, metrics: dict[str, float], log_dir: Path | None = None
) -> None:
    """metrics to metrics_file and the curves to <stem>_curves.csv, timings included, for DVC
    (which forbids metrics inside an output folder; no stage depends on these copies): the curves
    from the training logs in log_dir, else out/curves.csv."""
    if metrics_file is None:
        return
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    curves = metrics_file.with_name(f"{metrics_file.stem}_curves.csv")
    if log_dir is not None and (log_dir / "metrics.csv").exists():
        write_curves(log_dir, curves)
    elif (out / "curves.csv").exists():
        shutil.copyfile(out / "curves.csv", curves)
