"""Independent float64 / arbitrary-precision references for the risk measures and losses.

Written from PAPER.md's definitions by enumerating the atoms of each discrete distribution,
with no code shared with rsa_pl.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np

mpmath.mp.dps = 50


def atoms(policy_logps: np.ndarray, ref_logps: np.ndarray) -> list[tuple[float, float]]:
    """(Z, p_ref) for every vocabulary entry with positive reference probability."""
    return [
        (r - q, math.exp(r)) for q, r in zip(policy_logps.tolist(), ref_logps.tolist(), strict=True) if r > -math.inf
    ]


def kl(policy_logps: np.ndarray, ref_logps: np.ndarray) -> float:
    return math.fsum(p * z for z, p in atoms(policy_logps, ref_logps))


def cvar(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> float:
    """Sort Z descending, take atoms until their mass reaches mu (the last fractionally), / mu."""
    remaining, total = mu, []
    for z, p in sorted(atoms(policy_logps, ref_logps), key=lambda a: -a[0]):
        take = min(p, remaining)
        total.append(take * z)
        remaining -= take
        if remaining <= 0:
            break
    return math.fsum(total) / mu


def cvar_grad_z(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> np.ndarray:
    """d cvar / d Z_v of the sorted definition: p_v / mu in the tail, the boundary's share."""
    support = ref_logps > -np.inf
    z = np.full_like(ref_logps, -np.inf)
    z[support] = ref_logps[support] - policy_logps[support]
    grad = np.zeros_like(z)
    order = [v for v in np.argsort(-z, kind="stable") if support[v]]
    remaining = mu
    for v in order:
        take = min(math.exp(ref_logps[v]), remaining)
        grad[v] = take / mu
        remaining -= take
        if remaining <= 0:
            break
    return grad


def erm(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> float:
    """(1/mu) log E_ref[exp(mu Z)] in 50-digit arithmetic."""
    total = mpmath.fsum(
        mpmath.mpf(p) * mpmath.exp(mpmath.mpf(mu) * mpmath.mpf(z)) for z, p in atoms(policy_logps, ref_logps)
    )
    # The float64 inputs' probabilities sum to 1 only up to rounding: normalise in high precision.
    mass = mpmath.fsum(mpmath.mpf(p) for _, p in atoms(policy_logps, ref_logps))
    return float(mpmath.log(total / mass) / mu)


def cvar_radpo(policy_logps: np.ndarray, ref_logps: np.ndarray, c: float) -> float:
    """Unweighted (linear-interpolation) quantile q of Z at level 1 - c, then sum p Z [Z > q]."""
    pairs = atoms(policy_logps, ref_logps)
    q = float(np.quantile(np.array([z for z, _ in pairs]), 1.0 - c))
    return math.fsum(p * z for z, p in pairs if z > q)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
