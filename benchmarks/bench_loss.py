"""Forward + backward time and peak memory of the loss core alone, as ratios to DPO.

One step = rsa_pl.losses.preference_loss_from_logits on given (2B, T, V) policy and reference
logits, then backward to the policy logits. Each measurement runs in a fresh child process
(so peak RSS is that step's own), methods alternate round by round (so drift of the machine
hits all alike), and the table reports medians over rounds.

    python benchmarks/bench_loss.py                      # B = 8 pairs, T = 256, V = 32000
    python benchmarks/bench_loss.py --vocab 4096 --rounds 2

Writes benchmarks/results/bench_loss.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import write_report  # benchmarks/report.py (scripts run with benchmarks/ on sys.path)

METHODS: dict[str, dict] = {
    "dpo": {"alpha": 0.0, "measure": None, "mu": 1.0},
    "tdpo": {"alpha": 0.5, "measure": "kl", "mu": 1.0},
    "rsa-cvar": {"alpha": 0.5, "measure": "cvar", "mu": 0.95},
    "rsa-erm": {"alpha": 0.5, "measure": "erm", "mu": 5.0},
    "rsa-cvar_radpo": {"alpha": 0.5, "measure": "cvar_radpo", "mu": 0.95},
    "rsa-cvar_lower": {"alpha": 0.5, "measure": "cvar_lower", "mu": 0.95},
    "rsa-erm_lower": {"alpha": 0.5, "measure": "erm_lower", "mu": 0.5},
    # Not methods, comparisons: rsa-cvar with a full-vocabulary sort to find the CVaR boundary
    # (the plain way, which the histogram search of rsa_pl.fast replaces), rsa-cvar through the
    # plain formulas (rsa_pl.losses.sequence_terms: full log-probabilities, sort, autograd), and
    # DPO the textbook way (one full float32 log_softmax over (2B, T, V)), to show what the
    # optimisations save.
    "rsa-cvar-sort": {"alpha": 0.5, "measure": "cvar", "mu": 0.95},
    "rsa-cvar-plain": {"alpha": 0.5, "measure": "cvar", "mu": 0.95},
    "dpo-unchunked": {},
}
BASELINE = "dpo"


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _unchunked_dpo(policy, ref, labels, mask, beta: float):
    import torch.nn.functional as F

    def seq_logps(logits):
        logps = F.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logps * mask).sum(-1)

    policy_lp, ref_lp = seq_logps(policy), seq_logps(ref)
    pc, pr = policy_lp.chunk(2)
    rc, rr = ref_lp.chunk(2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def _use_sorted_cvar_boundary() -> None:
    """Swap the CVaR boundary search for rsa_pl.risk's full sort of every position's vocabulary."""
    from rsa_pl.fast import cvar

    del cvar.FAST_THRESHOLDS["cvar"]  # the chunked path then takes the measure's plain search


def _plain_loss(policy, ref, labels, mask, objective: dict):
    """The loss through the plain formulas: rsa_pl.losses.sequence_terms, then preference_loss."""
    from rsa_pl.losses import preference_loss, sequence_terms

    terms = sequence_terms(policy, ref, labels, mask, measure=objective["measure"], mu=objective["mu"])
    (pc, pr), (rc, rr), (dc, dr) = (x.chunk(2) for x in (terms.policy_logps, terms.ref_logps, terms.risk))
    return preference_loss(pc, pr, rc, rr, dc, dr, beta=0.1, alpha=objective["alpha"], variant=2)[0]


def child(method: str, pairs: int, seq: int, vocab: int, steps: int) -> dict:
    """Time `steps` forward+backward steps after one warm-up; peak RSS above the inputs."""
    import torch

    from rsa_pl.losses import preference_loss_from_logits

    torch.manual_seed(0)
    n = 2 * pairs
    policy = torch.randn(n, seq, vocab).requires_grad_(True)
    ref = policy.detach() + 0.1 * torch.randn(n, seq, vocab)
    prompt = seq // 4  # a quarter of each row is prompt, the rest response then padding
    lengths = torch.randint(seq // 2, seq - prompt + 1, (n,))
    positions = torch.arange(seq)
    mask = (positions >= prompt) & (positions < prompt + lengths.unsqueeze(1))
    labels = torch.randint(0, vocab, (n, seq))
    objective = METHODS[method]
    if method == "rsa-cvar-sort":
        _use_sorted_cvar_boundary()

    def step() -> None:
        if method == "dpo-unchunked":
            losses = _unchunked_dpo(policy, ref, labels, mask, beta=0.1)
        elif method == "rsa-cvar-plain":
            losses = _plain_loss(policy, ref, labels, mask, objective)
        else:
            losses, _ = preference_loss_from_logits(policy, ref, labels, mask, beta=0.1, variant=2, **objective)
        losses.mean().backward()
        policy.grad = None

    inputs_rss = _rss_mib()
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "time_s": statistics.median(times),
        "peak_mib": peak_rss - inputs_rss,
        "response_tokens": int(mask.sum()),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3, help="child processes per method, alternating")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per child after one warm-up")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_loss")
    parser.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.pairs, args.seq, args.vocab, args.steps)))
        return

    shape = ["--pairs", str(args.pairs), "--seq", str(args.seq), "--vocab", str(args.vocab), "--steps", str(args.steps)]
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for round_index in range(args.rounds):
        order = args.methods[round_index % len(args.methods) :] + args.methods[: round_index % len(args.methods)]
        for method in order:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, *shape], capture_output=True, text=True, check=True
            )
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1}/{args.rounds} {method}: {runs[method][-1]}", file=sys.stderr)

    summary = {
        m: {
            "time_s": statistics.median(r["time_s"] for r in rs),
            "peak_mib": statistics.median(r["peak_mib"] for r in rs),
            "response_tokens": rs[0]["response_tokens"],
        }
        for m, rs in runs.items()
    }
    base = summary.get(BASELINE)
    for values in summary.values():
        values["time_ratio"] = values["time_s"] / base["time_s"] if base else None
        values["memory_ratio"] = values["peak_mib"] / base["peak_mib"] if base else None
        values["tokens_per_s"] = values["response_tokens"] / values["time_s"]
    meta = {
        "pairs": args.pairs,
        "seq": args.seq,
        "vocab": args.vocab,
        "rounds": args.rounds,
        "steps": args.steps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": next(iter(runs.values()))[0]["threads"],
        "python": platform.python_version(),
    }
    lines = [
        f"Loss core, forward + backward: B = {args.pairs} pairs, T = {args.seq}, V = {args.vocab}, "
        f"float32 on CPU ({meta['machine']}, {meta['threads']} threads); median of {args.rounds} alternating "
        f"runs of {args.steps} steps; memory = peak RSS above the inputs.",
        "",
        "| method | time (s) | x dpo | response tokens/s | peak extra memory (MiB) | x dpo |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, v in summary.items():
        ratio_t = f"{v['time_ratio']:.2f}" if v["time_ratio"] is not None else "-"
        ratio_m = f"{v['memory_ratio']:.2f}" if v["memory_ratio"] is not None else "-"
        lines.append(
            f"| {method} | {v['time_s']:.3f} | {ratio_t} | {v['tokens_per_s']:.0f} | {v['peak_mib']:.0f} | {ratio_m} |"
        )
    table = "\n".join(lines)
    write_report(args.out, {"meta": meta, "runs": runs, "summary": summary}, table)


if __name__ == "__main__":
    main()
