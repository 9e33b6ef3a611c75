"""How every benchmark leaves its result: <stem>.json (everything) and <stem>.md (the table), printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(stem: Path, payload: dict[str, Any], table: str) -> None:
    """Write stem.json and stem.md (creating the folder) and print the table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table.rstrip("\n") + "\n")
    print(table)
