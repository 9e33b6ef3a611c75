"""What the stages' output folders hold, by convention, for the stages after them to read.

One module, imported by every stage that reads another's outputs, so that each stage's code
depends on this file and its own module only: dvc.yaml lists exactly those (a test checks), and
editing one stage reruns that stage and what follows it, not the stages it happens to share a
helper with.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE_RECORD = "base_model.json"
"""In models/sft: where a pretrained base came from (the sft stage's record)."""
MERGE_RECORD = "merge.json"
"""In each models/merged/q<q>: the ratio q and how the policy was merged."""


def base_model(models: Path) -> str:
    """The SFT model: models/sft (trained there, or a pretrained base saved there by the sft stage)."""
    return str(models / "sft")


def trusts_code(models: Path) -> bool:
    """Whether the recorded pretrained base may run its own code (sft.model.trust_remote_code
    when the sft stage recorded it); models built from scratch never need to."""
    record = models / "sft" / BASE_RECORD
    return bool(json.loads(record.read_text()).get("trust_remote_code")) if record.exists() else False


def merged_folder(q: float) -> str:
    """q0_25, q0_5, q1: the folder of the policy merged at ratio q, and its name in eval/ (no dot:
    eval/metrics.json keys are <policy>.<metric>, and tools split them on the dots)."""
    return "q" + f"{q:g}".replace(".", "_")
