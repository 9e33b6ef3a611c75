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

import torch
from torch import Tensor

__all__ = ["RISK_MEASURES", "RiskMeasure", "check_mu", "token_risk"]


def _drift(policy_logps: Tensor, ref_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Z on the reference support, the reference probabilities, and the support mask.

    Returns (z, p, support), each (..., V). Outside the support z is 0 and p is 0, so every
    p * f(z) term vanishes there with a finite gradient.
    """
    dtype = torch.promote_types(torch.promote_types(policy_logps.dtype, ref_logps.dtype), torch.float32)
    policy_logps, ref_logps = policy_logps.to(dtype), ref_logps.to(dtype)
    support = ref_logps > -math.inf  # (..., V)
    z = torch.where(support, ref_logps - policy_logps, 0.0)  # (..., V)
    p = ref_logps.exp()  # (..., V), exactly 0 off the support
    return z, p, support


def kl_risk(policy_logps: Tensor, ref_logps: Tensor, mu: float) -> Tensor:
    """KL(pi_ref || pi_theta) = E_ref[Z] (TDPO's sequential KL term); mu is ignored.

    Shapes: (..., V), (..., V) -> (...).
    """
    z, p, _ = _drift(policy_logps, ref_logps)
    return (p * z).sum(-1)


# Above this value of max(mu * Z) the entropic risk switches from the expm1/log1p form
# (exact for small mu, where log E[exp(mu Z)] ~ mu * KL cancels catastrophically) to the
# plain log-sum-exp form (exact for large arguments, where expm1 would overflow).
_ERM_SWITCH = 1.0


def erm_risk(policy_logps: Tensor, ref_logps: Tensor, mu: float) -> Tensor:
    """Entropic risk (1/mu) log E_ref[exp(mu Z)] = (1/mu) logsumexp(log pi_ref + mu Z).

    A Renyi divergence of order 1 + mu; mu -> 0 gives KL, larger mu is more risk-averse.
    Shapes: (..., V), (..., V) -> (...).
    """
    z, p, support = _drift(policy_logps, ref_logps)
    a = mu * z  # (..., V)
    a_max = torch.where(support, a, -math.inf).amax(-1)  # (...)
    # log E[e^a] = log1p(E[expm1(a)]) keeps full relative precision when a is small.
    small = torch.log1p((p * torch.expm1(a.clamp(max=_ERM_SWITCH))).sum(-1))  # (...)
    ref = ref_logps.to(a.dtype)
    large = torch.logsumexp(torch.where(support, ref + a, -math.inf), dim=-1)  # (...)
    return torch.where(a_max <= _ERM_SWITCH, small, large) / mu


# Histogram bins per refinement level of the CVaR threshold search, the level count after
# which the remaining candidates are ordered by top-k, and the candidate count at which
# refinement stops early.
_CVAR_BINS = 1024
_CVAR_MAX_LEVELS = 3
_CVAR_TOPK_CAP = 64


@torch.no_grad()
def _cvar_boundary_index(z: Tensor, p: Tensor, support: Tensor, mu: float) -> Tensor:
    """Index of the boundary atom of the upper mu-tail of Z under p, without a full sort.

    The boundary atom k is the largest value of Z with P(Z >= Z_k) >= mu * total mass: the
    atoms above it lie wholly in the tail, it lies in it fractionally. Found by refining a
    bracket with weighted histograms (scatter_add), then ordering the few atoms left in the
    boundary bin with top-k. Bin assignment is monotone in Z, so the result is exact.

    Shapes: z, p, support (R, V) -> index (R, 1) int64.
    """
    rows = z.shape[0]
    active = support.clone()  # (R, V) atoms that can still be the boundary
    above = z.new_zeros(rows, 1)  # (R, 1) mass strictly above the active bracket
    target = mu * p.sum(-1, keepdim=True)  # (R, 1) tail mass
    lo = torch.where(active, z, math.inf).amin(-1, keepdim=True)  # (R, 1)
    hi = torch.where(active, z, -math.inf).amax(-1, keepdim=True)  # (R, 1)
    for _ in range(_CVAR_MAX_LEVELS):
        unresolved = hi > lo  # (R, 1) rows whose bracket still holds distinct values
        counts = active.sum(-1, keepdim=True)
        if not bool((unresolved & (counts > _CVAR_TOPK_CAP)).any()):
            break
        scale = torch.where(unresolved, _CVAR_BINS / (hi - lo), 0.0)  # (R, 1)
        bins = ((z - lo) * scale).clamp_(0, _CVAR_BINS - 1).long()  # (R, V), monotone in z
        weights = torch.where(active, p, 0.0)
        hist = z.new_zeros(rows, _CVAR_BINS).scatter_add_(1, bins, weights)  # (R, K)
        at_or_above = above + hist.flip(-1).cumsum(-1).flip(-1)  # (R, K) mass in bins >= j
        boundary_bin = ((at_or_above >= target).sum(-1, keepdim=True) - 1).clamp_(min=0)  # (R, 1)
        above = torch.where(
            boundary_bin < _CVAR_BINS - 1,
            at_or_above.gather(1, (boundary_bin + 1).clamp_(max=_CVAR_BINS - 1)),
            above,
        )
        active &= bins == boundary_bin
        lo = torch.where(active, z, math.inf).amin(-1, keepdim=True)
        hi = torch.where(active, z, -math.inf).amax(-1, keepdim=True)
    # Rows whose remaining atoms all share one value: any of them is the boundary.
    tied_index = active.int().argmax(-1, keepdim=True)  # (R, 1)
    unresolved = hi > lo
    k = int(torch.where(unresolved, active.sum(-1, keepdim=True), 1).max())
    cand_z, cand_index = torch.where(active & unresolved, z, -math.inf).topk(k, dim=-1)  # (R, k) descending
    cand_p = torch.where(cand_z > -math.inf, p.gather(1, cand_index), 0.0)
    reached = above + cand_p.cumsum(-1) >= target  # (R, k)
    last = ((cand_z > -math.inf).sum(-1, keepdim=True) - 1).clamp_(min=0)  # (R, 1)
    # Rounding can leave the total a hair under the target: then the lowest atom is it.
    first = torch.minimum((~reached).sum(-1, keepdim=True), last)  # (R, 1) first crossing
    return torch.where(unresolved, cand_index.gather(1, first), tied_index)


def cvar_risk(policy_logps: Tensor, ref_logps: Tensor, mu: float) -> Tensor:
    """CVaR of Z at tail mass mu: the pi_ref-weighted mean of the upper mu-fraction of Z.

    Atoms are taken from the largest Z down until their mass reaches mu, the boundary atom
    fractionally, divided by mu. Written as eta + E[(Z - eta)_+] / mu with eta the boundary
    atom's value (the Rockafellar-Uryasev form, exact at that eta), so the gradient equals
    the sorted definition's, boundary share included. mu = 1 gives KL; >= KL.
    Shapes: (..., V), (..., V) -> (...).
    """
    z, p, support = _drift(policy_logps, ref_logps)
    batch_shape, vocab = z.shape[:-1], z.shape[-1]
    z2, p2 = z.reshape(-1, vocab), p.reshape(-1, vocab)  # (R, V)
    boundary = _cvar_boundary_index(z2, p2, support.reshape(-1, vocab), mu)  # (R, 1)
    eta = z2.gather(1, boundary)  # (R, 1), differentiable
    tail = (p2 * torch.relu(z2 - eta)).sum(-1, keepdim=True)  # (R, 1)
    return (eta + tail / mu).reshape(batch_shape)


def cvar_radpo_risk(policy_logps: Tensor, ref_logps: Tensor, mu: float) -> Tensor:
    """The public Ra-DPO code's CVaR estimator, kept for comparison (mu = confidence c).

    q is the unweighted quantile of Z over the vocabulary entries (reference support) at
    level 1 - c; the risk is sum_v pi_ref(v) Z(v) [Z(v) > q], with no 1/c. Unlike that code,
    the whole vocabulary axis is used (no split into two halves).
    Shapes: (..., V), (..., V) -> (...).
    """
    z, p, support = _drift(policy_logps, ref_logps)
    with torch.no_grad():
        q = torch.nanquantile(torch.where(support, z, math.nan), 1.0 - mu, dim=-1, keepdim=True)
    return (p * z * (z > q)).sum(-1)


@dataclass(frozen=True)
class RiskMeasure:
    """A named risk measure, its function and the domain of its parameter mu."""

    fn: Callable[[Tensor, Tensor, float], Tensor]
    mu_ok: Callable[[float], bool]
    mu_domain: str


RISK_MEASURES: dict[str, RiskMeasure] = {
    "kl": RiskMeasure(kl_risk, lambda mu: True, "ignored"),
    "cvar": RiskMeasure(cvar_risk, lambda mu: 0.0 < mu <= 1.0, "(0, 1]"),
    "erm": RiskMeasure(erm_risk, lambda mu: mu > 0.0 and math.isfinite(mu), "(0, inf)"),
    "cvar_radpo": RiskMeasure(cvar_radpo_risk, lambda mu: 0.0 < mu <= 1.0, "(0, 1]"),
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
    return RISK_MEASURES[measure].fn(policy_logps, ref_logps, float(mu))
