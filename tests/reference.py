"""Independent float64 / arbitrary-precision references for the risk measures and losses.

Written from docs/method.md's definitions by enumerating the atoms of each discrete
distribution, with no code shared with rsa_pl.
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


def _tail_mean(pairs: list[tuple[float, float]], mu: float, upper: bool) -> float:
    """Sort Z (descending for the upper tail, ascending for the lower), take atoms until their
    mass reaches mu (the last fractionally), / mu."""
    remaining, total = mu, []
    for z, p in sorted(pairs, key=lambda a: -a[0] if upper else a[0]):
        take = min(p, remaining)
        total.append(take * z)
        remaining -= take
        if remaining <= 0:
            break
    return math.fsum(total) / mu


def cvar(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> float:
    """The upper mu-tail mean of Z."""
    return _tail_mean(atoms(policy_logps, ref_logps), mu, upper=True)


def cvar_lower(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> float:
    """The lower mu-tail mean of Z: (1/mu) * integral_0^mu of Z's quantile function."""
    return _tail_mean(atoms(policy_logps, ref_logps), mu, upper=False)


def _tail_grad_z(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float, upper: bool) -> np.ndarray:
    """d tail-mean / d Z_v, the symmetric subgradient: walk the distinct values of Z into the
    tail; a value whose atoms fit wholly gives each p_v / mu, the boundary value's atoms share
    what is left of mu in proportion to p_v."""
    grad = np.zeros(len(ref_logps))
    groups: dict[float, list[int]] = {}
    for v, (q, r) in enumerate(zip(policy_logps.tolist(), ref_logps.tolist(), strict=True)):
        if r > -math.inf:
            groups.setdefault(r - q, []).append(v)
    remaining = mu
    for z in sorted(groups, reverse=upper):
        members = groups[z]
        mass = math.fsum(math.exp(ref_logps[v]) for v in members)
        share = min(1.0, remaining / mass)
        for v in members:
            grad[v] = share * math.exp(ref_logps[v]) / mu
        remaining -= mass
        if remaining <= 0:
            break
    return grad


def cvar_grad_z(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> np.ndarray:
    return _tail_grad_z(policy_logps, ref_logps, mu, upper=True)


def cvar_lower_grad_z(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> np.ndarray:
    return _tail_grad_z(policy_logps, ref_logps, mu, upper=False)


def erm(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> float:
    """(1/mu) log E_ref[exp(mu Z)] in 50-digit arithmetic."""
    total = mpmath.fsum(
        mpmath.mpf(p) * mpmath.exp(mpmath.mpf(mu) * mpmath.mpf(z)) for z, p in atoms(policy_logps, ref_logps)
    )
    # The float64 inputs' probabilities sum to 1 only up to rounding: normalise in high precision.
    mass = mpmath.fsum(mpmath.mpf(p) for _, p in atoms(policy_logps, ref_logps))
    return float(mpmath.log(total / mass) / mu)


def erm_lower(policy_logps: np.ndarray, ref_logps: np.ndarray, mu: float) -> float:
    """-(1/mu) log E_ref[exp(-mu Z)] in 50-digit arithmetic."""
    pairs = atoms(policy_logps, ref_logps)
    total = mpmath.fsum(mpmath.mpf(p) * mpmath.exp(-mpmath.mpf(mu) * mpmath.mpf(z)) for z, p in pairs)
    mass = mpmath.fsum(mpmath.mpf(p) for _, p in pairs)
    return float(-mpmath.log(total / mass) / mu)


def cvar_radpo(policy_logps: np.ndarray, ref_logps: np.ndarray, c: float) -> float:
    """Unweighted (linear-interpolation) quantile q of Z at level 1 - c, then sum p Z [Z > q]."""
    pairs = atoms(policy_logps, ref_logps)
    q = float(np.quantile(np.array([z for z, _ in pairs]), 1.0 - c))
    return math.fsum(p * z for z, p in pairs if z > q)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
