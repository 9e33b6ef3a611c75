"""The chunked loss core of this checkout against the one of another git revision, in one process.

rsa_pl/fast/chunked.py and rsa_pl/fast/cvar.py are read from the revision (git show) into a
temporary package and imported beside this checkout's; rsa_pl.risk is this checkout's for both
(the revision's must have the same interface). Each step is chunked_sequence_terms forward and
backward to the policy's logits (the terms every training step computes), on the same random
(2B, T, V) policy and reference logits, both versions alternating round by round; the table gives
the minimum and median over rounds and this checkout's time as a ratio to the revision's.

    python benchmarks/loss_ab.py --base 40ea4cd                     # V 49152, dpo/kl/cvar/erm
    python benchmarks/loss_ab.py --base 40ea4cd --vocab 151936 --measures none cvar

Prints a table, writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rsa_pl.fast import chunked as current  # noqa: E402


def _revision(base: str, folder: Path):
    """The revision's chunked module, its cvar module imported as a sibling."""
    for name in ("cvar", "chunked"):
        source = subprocess.run(["git", "show", f"{base}:rsa_pl/fast/{name}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
        source = source.replace("from rsa_pl.fast.cvar import", "from base_cvar import")
        (folder / f"base_{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("base_chunked", folder / "base_chunked.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=96, help="positions per sequence (the first 8 are prompt)")
    parser.add_argument("--measures", nargs="+", default=["none", "kl", "cvar", "erm"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, t, v = 2 * args.pairs, args.seq, args.vocab
    policy = (torch.randn(n, t, v) * 2).requires_grad_()
    with torch.no_grad():
        ref = torch.randn(n, t, v) * 2 + 0.9 * policy
    labels = torch.randint(0, v, (n, t))
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[:, :8] = False
    positions = mask.reshape(-1).nonzero().squeeze(1)
    with tempfile.TemporaryDirectory() as folder:
        base = _revision(args.base, Path(folder))
        versions = {f"{args.base}": base, "this checkout": current}

        def step(module, measure: str | None) -> None:
            terms = module.chunked_sequence_terms(policy, ref, labels, positions, measure, 0.95)
            (terms[0].sum() + 0.3 * terms[2].sum()).backward()
            policy.grad = None

        times: dict[tuple[str, str], list[float]] = {}
        for measure in args.measures:
            for name, module in versions.items():
                step(module, None if measure == "none" else measure)  # warm-up
                times[(measure, name)] = []
        for _ in range(args.rounds):
            for measure in args.measures:
                for name, module in versions.items():
                    start = time.perf_counter()
                    step(module, None if measure == "none" else measure)
                    times[(measure, name)].append(time.perf_counter() - start)
    print(f"chunked terms forward + backward, (2B, T, V) = ({n}, {t}, {v}), {positions.numel()} response "
          f"positions, {args.threads} thread(s), {args.rounds} alternating rounds")  # fmt: skip
    print(f"\n| measure | {args.base} min / median (s) | this checkout min / median (s) | ratio (min) |")
    print("|---|---:|---:|---:|")
    for measure in args.measures:
        old, new = times[(measure, args.base)], times[(measure, "this checkout")]
        print(f"| {'dpo (none)' if measure == 'none' else measure} | {min(old):.3f} / {statistics.median(old):.3f} "
              f"| {min(new):.3f} / {statistics.median(new):.3f} | {min(new) / min(old):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
