"""Token risk measures Phi_mu of the drift Z between policy and reference (PAPER.md).

At one position s_t the drift is the random variable

    Z(v) = log pi_ref(v|s_t) - log pi_theta(v|s_t),   v ~ pi_ref(.|s_t)

and a risk measure maps its distribution to a number. Every measure here reduces to
KL(pi_ref || pi_theta) = E_ref[Z] in a limit and is >= KL otherwise.

All functions are pure: they take normalised log-probabilities of shape (..., V) and return
the per-position risk of shape (...). They compute in the inputs' dtype promoted to at least
float32. Vocabulary entries with zero reference probability (log-prob -inf) carry no mass and
are excluded; they never produce NaN in values or gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RISK_MEASURES", "Drift", "RiskMeasure", "check_mu", "drift", "token_risk"]


class Drift(NamedTuple):
    """Z = log pi_ref - log pi_theta at some positions, with the reference distribution.

    Outside the reference support z is 0 and p is 0, so every p * f(z) term vanishes there
    with a finite gradient. Tensor fields have shape (..., V), in at least float32.
    """

    z: Tensor  # (..., V)
    p: Tensor  # (..., V) pi_ref, exactly 0 off the support
    support: Tensor | None  # (..., V) bool, pi_ref > 0; None when every entry is in it
    ref_logps: Tensor  # (..., V)


def drift(policy_logps: Tensor, ref_logps: Tensor) -> Drift:
    """The Drift of two normalised log-probability tensors of shape (..., V)."""
    dtype = torch.promote_types(torch.promote_types(policy_logps.dtype, ref_logps.dtype), torch.float32)
    policy_logps, ref_logps = policy_logps.to(dtype), ref_logps.to(dtype)
    support = ref_logps > -math.inf
    if bool(support.all()):  # the usual case (finite logits): no masking needed anywhere
        return Drift(ref_logps - policy_logps, ref_logps.exp(), None, ref_logps)
    z = torch.where(support, ref_logps - policy_logps, 0.0)
    return Drift(z, ref_logps.exp(), support, ref_logps)


def _masked(x: Tensor, support: Tensor | None, fill: float) -> Tensor:
    """x off the support replaced by fill (x itself when the support is everything)."""
    return x if support is None else torch.where(support, x, fill)


def kl_risk(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """KL(pi_ref || pi_theta) = E_ref[Z] (TDPO's sequential KL term); mu is ignored.

    Shapes: Drift (..., V) -> (...).
    """
    return (d.p * d.z).sum(-1)


# Above this value of max(mu * Z) the entropic risk switches from the expm1/log1p form
# (exact for small mu, where log E[exp(mu Z)] ~ mu * KL cancels catastrophically) to the
# plain log-sum-exp form (exact for large arguments, where expm1 would overflow).
_ERM_SWITCH = 1.0


def kl_weights(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """dPhi/dZ of the KL risk: pi_ref itself. Shapes: Drift (..., V) -> (..., V)."""
    return d.p


def erm_weights(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """dPhi/dZ of the entropic risk: pi_ref e^(mu Z) / E_ref[e^(mu Z)], the exponentially
    tilted reference (zero off the support). Shapes: Drift (..., V) -> (..., V)."""
    return torch.softmax(_masked(d.ref_logps + mu * d.z, d.support, -math.inf), dim=-1)


def erm_risk(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """Entropic risk (1/mu) log E_ref[exp(mu Z)] = (1/mu) logsumexp(log pi_ref + mu Z).

    A Renyi divergence of order 1 + mu; mu -> 0 gives KL, larger mu is more risk-averse.
    Shapes: Drift (..., V) -> (...).
    """
    z, p, support, ref = d
    a = mu * z  # (..., V)
    use_small = _masked(a, support, -math.inf).amax(-1) <= _ERM_SWITCH  # (...)
    risk = torch.zeros(use_small.shape, dtype=a.dtype, device=a.device)
    if bool(use_small.any()):
        # log E[e^a] = log1p(E[expm1(a)]) keeps full relative precision when a is small.
        small = torch.log1p((p * torch.expm1(a.clamp(max=_ERM_SWITCH))).sum(-1))  # (...)
        risk = torch.where(use_small, small, risk)
    if not bool(use_small.all()):
        large = torch.logsumexp(_masked(ref + a, support, -math.inf), dim=-1)  # (...)
        risk = torch.where(use_small, risk, large)
    return risk / mu


# Histogram bins per refinement level of the CVaR threshold search, the most levels, and
# the candidate count at or under which the boundary bin's atoms are ordered by top-k. With
# 4096 bins one level usually leaves a few dozen candidates of a 32k vocabulary.
_CVAR_BINS = 4096
_CVAR_MAX_LEVELS = 3
_CVAR_TOPK_CAP = 64


def _active_range(z: Tensor, active: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exact min and max of z over the active atoms of each row: (R, V) -> (R, 1), (R, 1)."""
    if active is None:
        return z.amin(-1, keepdim=True), z.amax(-1, keepdim=True)
    lo = torch.where(active, z, math.inf).amin(-1, keepdim=True)
    hi = torch.where(active, z, -math.inf).amax(-1, keepdim=True)
    return lo, hi


def _count(mask: Tensor) -> Tensor:
    """True entries per row, (R, V) bool -> (R, 1) int64, without an int64 copy of the mask."""
    return torch.count_nonzero(mask, dim=-1).unsqueeze(-1)


@torch.no_grad()
def _cvar_boundary_index(z: Tensor, p: Tensor, support: Tensor | None, mu: float) -> Tensor:
    """Index of the boundary atom of the upper mu-tail of Z under p, without a full sort.

    The boundary atom k is the largest value of Z with P(Z >= Z_k) >= mu * total mass: the
    atoms above it lie wholly in the tail, it lies in it fractionally. Found by refining a
    bracket with weighted histograms (scatter_add), then ordering the few atoms left in the
    boundary bin with top-k. Bin assignment is monotone in Z, so the result is exact.

    Shapes: z, p, support (R, V) -> index (R, 1) int64.
    """
    rows, vocab = z.shape
    active = support  # (R, V) atoms that can still be the boundary; None: all of them
    counts = z.new_full((rows, 1), vocab, dtype=torch.long) if active is None else _count(active)
    above = z.new_zeros(rows, 1)  # (R, 1) mass strictly above the active atoms
    target = mu * p.sum(-1, keepdim=True)  # (R, 1) tail mass
    lo, hi = _active_range(z, active)  # (R, 1) each
    tied = hi <= lo  # (R, 1) rows whose active atoms all share one value: any is the boundary
    for _ in range(_CVAR_MAX_LEVELS):
        if not bool((~tied & (counts > _CVAR_TOPK_CAP)).any()):
            break
        scale = torch.where(tied, 0.0, _CVAR_BINS / (hi - lo))  # (R, 1)
        bins = (z - lo).mul_(scale).clamp_(0, _CVAR_BINS - 1).long()  # (R, V), monotone in z
        hist = z.new_zeros(rows, _CVAR_BINS).scatter_add_(1, bins, _masked(p, active, 0.0))  # (R, K)
        at_or_above = above + hist.flip(-1).cumsum(-1).flip(-1)  # (R, K) mass in bins >= j
        boundary_bin = ((at_or_above >= target).sum(-1, keepdim=True) - 1).clamp_(min=0)  # (R, 1)
        above = torch.where(
            boundary_bin < _CVAR_BINS - 1,
            at_or_above.gather(1, (boundary_bin + 1).clamp_(max=_CVAR_BINS - 1)),
            above,
        )
        in_bin = bins == boundary_bin  # (R, V)
        active = in_bin if active is None else in_bin.logical_and_(active)
        counts = _count(active)
        if bool((~tied & (counts > _CVAR_TOPK_CAP)).any()):  # needed to refine again or find ties
            lo, hi = _active_range(z, active)
            tied = hi <= lo
    k = int(torch.where(tied, 1, counts).max())
    candidates = _masked(z, active, -math.inf)
    if bool(tied.any()):
        candidates = candidates.masked_fill(tied, -math.inf)
    cand_z, cand_index = candidates.topk(k, dim=-1)  # (R, k) descending
    cand_p = torch.where(cand_z > -math.inf, p.gather(1, cand_index), 0.0)
    reached = above + cand_p.cumsum(-1) >= target  # (R, k)
    last = ((cand_z > -math.inf).sum(-1, keepdim=True) - 1).clamp_(min=0)  # (R, 1)
    # Rounding can leave the total a hair under the target: then the lowest atom is it.
    first = torch.minimum((~reached).sum(-1, keepdim=True), last)  # (R, 1) first crossing
    boundary = cand_index.gather(1, first)
    if bool(tied.any()):
        tied_index = torch.zeros_like(first) if active is None else active.int().argmax(-1, keepdim=True)
        boundary = torch.where(tied, tied_index, boundary)
    return boundary


@torch.no_grad()
def cvar_threshold(d: Drift, mu: float) -> Tensor:
    """Index of the boundary atom of the upper mu-tail at every position: Drift (..., V) -> (..., 1)."""
    vocab = d.z.shape[-1]
    support = None if d.support is None else d.support.reshape(-1, vocab)
    return _cvar_boundary_index(d.z.reshape(-1, vocab), d.p.reshape(-1, vocab), support, mu).reshape(*d.z.shape[:-1], 1)


def cvar_risk(d: Drift, mu: float, threshold: Tensor | None = None) -> Tensor:
    """CVaR of Z at tail mass mu: the pi_ref-weighted mean of the upper mu-fraction of Z.

    Atoms are taken from the largest Z down until their mass reaches mu, the boundary atom
    fractionally, divided by mu. Written as eta + E[(Z - eta)_+] / mu with eta the boundary
    atom's value (the Rockafellar-Uryasev form, exact at that eta), so the gradient equals
    the sorted definition's, boundary share included. mu = 1 gives KL; >= KL.
    threshold: the boundary indices (..., 1) of cvar_threshold, found here when None.
    Shapes: Drift (..., V) -> (...).
    """
    boundary = cvar_threshold(d, mu) if threshold is None else threshold  # (..., 1)
    eta = d.z.gather(-1, boundary)  # (..., 1), differentiable
    tail = (d.p * torch.relu(d.z - eta)).sum(-1, keepdim=True)  # (..., 1)
    return (eta + tail / mu).squeeze(-1)


def cvar_weights(d: Drift, mu: float, threshold: Tensor | None = None) -> Tensor:
    """dPhi/dZ of cvar_risk, in closed form: pi_ref / mu on the atoms strictly above the
    boundary atom, and the boundary atom the rest of the unit mass (1 - mass above / mu);
    exactly the gradient autograd gives cvar_risk (relu'(0) = 0: atoms tied with the boundary
    count as not above it). threshold: cvar_threshold's boundary indices (..., 1).
    Shapes: Drift (..., V) -> (..., V)."""
    boundary = cvar_threshold(d, mu) if threshold is None else threshold  # (..., 1)
    eta = d.z.gather(-1, boundary)  # (..., 1)
    weights = torch.where(d.z > eta, d.p, 0.0).div_(mu)  # (..., V)
    return weights.scatter_add_(-1, boundary, 1.0 - weights.sum(-1, keepdim=True))


@torch.no_grad()
def cvar_radpo_threshold(d: Drift, mu: float) -> Tensor:
    """Unweighted quantile of Z over the support at level 1 - mu: Drift (..., V) -> (..., 1)."""
    return torch.nanquantile(_masked(d.z, d.support, math.nan), 1.0 - mu, dim=-1, keepdim=True)


def cvar_radpo_risk(d: Drift, mu: float, threshold: Tensor | None = None) -> Tensor:
    """The public Ra-DPO code's CVaR estimator, kept for comparison (mu = confidence c).

    q is the unweighted quantile of Z over the vocabulary entries (reference support) at
    level 1 - c; the risk is sum_v pi_ref(v) Z(v) [Z(v) > q], with no 1/c. Unlike that code,
    the whole vocabulary axis is used (no split into two halves).
    threshold: the quantiles (..., 1) of cvar_radpo_threshold, found here when None.
    Shapes: Drift (..., V) -> (...).
    """
    q = cvar_radpo_threshold(d, mu) if threshold is None else threshold  # (..., 1)
    return (d.p * d.z * (d.z > q)).sum(-1)


@dataclass(frozen=True)
class RiskMeasure:
    """A named risk measure: its function, the domain of mu, and its threshold search.

    fn(drift, mu, threshold) -> (...). A measure with a threshold (a quantile of Z) finds it
    with `threshold(drift, mu)` under no_grad; callers that evaluate the same positions twice
    (forward, then recomputation in backward) pass it back to skip the search.
    weights(drift, mu, threshold) -> (..., V): dPhi/dZ in closed form, a distribution over the
    vocabulary for every measure here (so the gradient with respect to the policy's logits is
    pi_theta - weights); None where only autograd knows it.
    """

    fn: Callable[[Drift, float, Tensor | None], Tensor]
    mu_ok: Callable[[float], bool]
    mu_domain: str
    threshold: Callable[[Drift, float], Tensor] | None = None
    weights: Callable[[Drift, float, Tensor | None], Tensor] | None = None


RISK_MEASURES: dict[str, RiskMeasure] = {
    "kl": RiskMeasure(kl_risk, lambda mu: True, "ignored", weights=kl_weights),
    "cvar": RiskMeasure(cvar_risk, lambda mu: 0.0 < mu <= 1.0, "(0, 1]", cvar_threshold, cvar_weights),
    "erm": RiskMeasure(erm_risk, lambda mu: mu > 0.0 and math.isfinite(mu), "(0, inf)", weights=erm_weights),
    "cvar_radpo": RiskMeasure(cvar_radpo_risk, lambda mu: 0.0 < mu <= 1.0, "(0, 1]", cvar_radpo_threshold),
}


def check_mu(measure: str, mu: float) -> str | None:
    """The problem with (measure, mu) as one phrase, or None when they are valid."""
    if measure not in RISK_MEASURES:
        return f"unknown measure {measure!r}; allowed: {', '.join(RISK_MEASURES)}"
    spec = RISK_MEASURES[measure]
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not spec.mu_ok(float(mu)):
        return f"must be in {spec.mu_domain} for {measure}, got {mu!r}"
    return None


def token_risk(policy_logps: Tensor, ref_logps: Tensor, measure: str, mu: float) -> Tensor:
    """Per-position risk Phi_mu(Z) of PAPER.md for the named measure.

    Args:
        policy_logps: normalised log-probabilities of the policy, (..., V).
        ref_logps: normalised log-probabilities of the reference, (..., V).
        measure: one of "kl", "cvar", "erm", "cvar_radpo".
        mu: the measure's parameter (tail mass for cvar, risk aversion for erm,
            confidence for cvar_radpo; ignored for kl).

    Returns:
        The risk at every position, shape (...).
    """
    problem = check_mu(measure, mu)
    if problem is not None:
        name = "measure" if measure not in RISK_MEASURES else "mu"
        raise ValueError(f"{name}: {problem}")
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() < 1:
        raise ValueError(
            f"policy_logps and ref_logps: must have the same shape (..., V), "
            f"got {tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}"
        )
    return RISK_MEASURES[measure].fn(drift(policy_logps, ref_logps), float(mu), None)
