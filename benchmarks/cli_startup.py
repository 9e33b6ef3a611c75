"""How long `rsa-pl` takes to start: `--help`, `--version` and `check-params` against the baseline
of importing every stage module (what each command paid before the CLI imported its stage when it
runs). Each command runs `--repeat` times as a fresh process, one after another on this machine;
the median wall time is printed, with its ratio to the baseline measured in the same run.

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("check_params", "evaluate", "merge", "pairs", "preference", "prepare", "sft")  # rsa_pl.pipeline.<stage>


def _wall(argv: list[str], repeat: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    script = shutil.which("rsa-pl", path=str(Path(sys.executable).parent))
    if script is None:
        sys.exit("rsa-pl is not installed next to this Python (pip install -e .)")
    modules = ", ".join(f"rsa_pl.pipeline.{stage}" for stage in STAGES)
    baseline = _wall([sys.executable, "-c", f"import {modules}"], args.repeat)
    rows = [("import every stage module (the baseline)", baseline)]
    for what, argv in (
        ("rsa-pl --help", [script, "--help"]),
        ("rsa-pl --version", [script, "--version"]),
        ("rsa-pl check-params", [script, "check-params", "--params", str(ROOT / "params.yaml")]),
    ):
        rows.append((what, _wall(argv, args.repeat)))
    print(f"median of {args.repeat} fresh processes each, {os.cpu_count()} cores")
    print(f"{'command':45} {'wall s':>7} {'x baseline':>10}")
    for what, wall in rows:
        print(f"{what:45} {wall:7.2f} {wall / baseline:10.3f}")


if __name__ == "__main__":
    main()
