"""How stages write their outputs: whole or not at all (the curves and the metrics DVC reads are
dvclive's: rsa_pl.training.Curves)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any


def staging_for(out: Path) -> Path:
    """An empty folder beside out to build the stage's output in, one per process (host and pid:
    the ranks of a multi-node run share the folder, and each removes its own staging folder when
    it ends); when it cannot be made, the error names out (the staging folder is nothing the user
    named)."""
    staging = out.with_name(f".{out.name}.staging-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(out)) from None
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


def write_metrics(folder: Path, metrics: dict[str, float]) -> None:
    """folder/metrics.json (a model folder's): the metrics less the wall-clock ones, so that a
    stage rerun that makes the same model writes the same bytes and DVC reruns nothing after it
    (a base re-saved, or a stage retrained after a code change that leaves its numbers alone)."""
    kept = {k: v for k, v in metrics.items() if not timing(k)}
    (folder / "metrics.json").write_text(json.dumps(kept, indent=2) + "\n")
