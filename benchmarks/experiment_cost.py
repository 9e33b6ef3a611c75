"""What one experiment of the tail experiment (experiments/embedded.py) spends evaluating, before
and after `evaluate.policies`: `rsa-pl evaluate` on this checkout's models (params.yaml's world and
DAG, after `dvc repro`), once with every policy (sft, reward, safety and each merged q: what every
round-1 experiment evaluated) and once per policies list the grid uses, one run after another in
this process's machine, the same threads each. A run's wall time includes its start (imports,
model loading), as a DVC stage's does.

    python benchmarks/experiment_cost.py                 # 1 thread (as each of the queue's 2 jobs)
    python benchmarks/experiment_cost.py --threads 2

Prints the table and writes benchmarks/results/experiment_cost.json (reports/embedded.md reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "experiment_cost.json"
VARIANTS = (  # (what, evaluate.policies)
    ("every policy (round 1: sft, reward, safety, 3 merges)", None),
    ("headline TDPO: [sft, reward, safety]", ["sft", "reward", "safety"]),
    ("headline RSA: [safety] (+ SFT's greedy answers)", ["safety"]),
)


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rsa_pl = shutil.which("rsa-pl", path=str(Path(sys.executable).parent))
    if rsa_pl is None:
        sys.exit("rsa-pl: not found next to this Python; pip install -e . first")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    merged = sorted(p.name for p in (ROOT / "models" / "merged").glob("q*"))
    if not (ROOT / "models" / "safety").exists() or len(merged) < 3:
        sys.exit("models/: run `dvc repro` first (the default pipeline's sft, reward, safety and 3 merged policies)")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for what, policies in VARIANTS:
            params = Path(tmp) / "params.yaml"
            base["evaluate"]["policies"] = policies
            params.write_text(yaml.safe_dump(base))
            out = Path(tmp) / "eval"
            shutil.rmtree(out, ignore_errors=True)
            command = [rsa_pl, "evaluate", "--params", str(params), "--data", "data", "--models", "models",
                       "--out", str(out)]  # fmt: skip
            started = time.perf_counter()
            subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            rows.append({"what": what, "policies": policies, "wall_s": wall})
            print(f"{what}: {wall:.1f} s", flush=True)
    for row in rows:
        row["ratio"] = row["wall_s"] / rows[0]["wall_s"]
    result = {
        "command": "python benchmarks/experiment_cost.py" + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "threads": args.threads,
        "machine": _machine(),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'evaluate':58} {'wall s':>8} {'x every policy':>15}")
    for row in rows:
        print(f"{row['what']:58} {row['wall_s']:8.1f} {row['ratio']:15.2f}")


if __name__ == "__main__":
    main()
