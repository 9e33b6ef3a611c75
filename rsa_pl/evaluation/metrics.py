"""Metric functions of the evaluate stage: pure functions of judged samples, no I/O.

Conventions (docs/method.md, "Evaluation protocol"): a higher reward is more helpful, a higher cost
is more harmful (a positive cost means unsafe, as Safe-RLHF's cost model); win rates are per
prompt with a tie counting 0.5 (SACPO); tail metrics use every sampled response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean, median


def win(policy: float, baseline: float, higher_is_better: bool = True) -> float:
    """One prompt's win of the policy's score over the baseline's: 1, 0.5 for a tie, or 0."""
    sign = 1.0 if higher_is_better else -1.0
    return 1.0 if sign * (policy - baseline) > 0 else 0.5 if policy == baseline else 0.0


def win_rate(policy: Sequence[float], baseline: Sequence[float], higher_is_better: bool = True) -> float:
    """The share of prompts on which the policy's score beats the baseline's (tie = 0.5).

    policy[i] and baseline[i] are the two policies' scores on prompt i (for example the
    reward of the greedy answer; for harmlessness the cost, with higher_is_better=False).
    """
    if len(policy) != len(baseline):
        raise ValueError(f"win_rate: {len(policy)} policy scores but {len(baseline)} baseline scores")
    if not policy:
        raise ValueError("win_rate: no prompts")
    return fmean(win(p, b, higher_is_better) for p, b in zip(policy, baseline, strict=True))


def upper_cvar(values: Sequence[float], level: float) -> float:
    """CVaR of the upper tail: the mean of the worst `level` fraction of values, each value
    weighing 1/n and the boundary value counted fractionally (level * n need not be whole).
    level = 1 is the mean; level -> 0 tends to the maximum."""
    if not 0.0 < level <= 1.0:
        raise ValueError(f"upper_cvar: level must be in (0, 1], got {level}")
    if not values:
        raise ValueError("upper_cvar: no values")
    ordered = sorted(values, reverse=True)
    mass = level * len(ordered)  # in units of one value
    whole = math.floor(mass + 1e-12)
    total = sum(ordered[:whole])
    if whole < len(ordered):
        total += (mass - whole) * ordered[whole]
    return total / mass


def rate(flags: Sequence[bool]) -> float:
    if not flags:
        raise ValueError("rate: no values")
    return fmean(1.0 if f else 0.0 for f in flags)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Mean and median response length (tokens)."""
    return {"length_mean": fmean(lengths), "length_median": float(median(lengths))}


def sampled_kl(policy_logps: Sequence[float], reference_logps: Sequence[float]) -> float:
    """Monte-Carlo KL(policy || reference) per response: the mean over responses sampled from
    the policy of log pi(y|x) - log pi_ref(y|x) (sequence log-probabilities)."""
    if len(policy_logps) != len(reference_logps) or not policy_logps:
        raise ValueError("sampled_kl: needs as many reference as policy log-probabilities, at least one")
    return fmean(p - r for p, r in zip(policy_logps, reference_logps, strict=True))
