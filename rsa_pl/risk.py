"""Token risk measures Phi_mu of the drift Z between policy and reference (docs/method.md).

At one position s_t the drift is the random variable

    Z(v) = log pi_ref(v|s_t) - log pi_theta(v|s_t),   v ~ pi_ref(.|s_t)

and a risk measure maps its distribution to a number. Every measure here reduces to
KL(pi_ref || pi_theta) = E_ref[Z] in a limit. Two families read the tail differently
(docs/method.md, "Which tail"): the upper-tail measures (cvar, erm: the public Ra-DPO code's
reading) are >= KL; the lower-tail ones (cvar_lower, erm_lower: the paper's printed formulas)
are <= KL. A lower-tail measure is the upper-tail one of -Z, negated.

This module holds the formulas in their plain form: each measure's value, its gradient
dPhi/dZ in closed form, and for the CVaRs the boundary of the tail found by a full sort. The
optimised paths the training step uses (a sort-free boundary search, chunked terms with a
closed-form backward) live in rsa_pl.fast and are tested equal to these.

All functions are pure: they take normalised log-probabilities of shape (..., V) and return
the per-position risk of shape (...). They compute in the inputs' dtype promoted to at least
float32. Vocabulary entries with zero reference probability (log-prob -inf) carry no mass and
are excluded; they never produce NaN in values or gradients.

Ties: a CVaR is not differentiable where atoms tie at the boundary of its tail. Its gradient
here is the symmetric subgradient: the atoms tied with the boundary share the boundary's
remaining mass in proportion to pi_ref. A row whose atoms all tie (policy == reference, as at
the first step with a fresh LoRA adapter) then gets dPhi/dZ = pi_ref, the same as KL.
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
    return _drift_of(ref_logps - policy_logps, ref_logps)


def drift_from_logits(
    policy_logits: Tensor, ref_logits: Tensor, policy_lse: Tensor, ref_lse: Tensor, full_support: bool | None = None
) -> Drift:
    """The Drift of logits (..., V) with their log-normalisers (...,): Z = (r - x) + (lse_x -
    lse_r), one subtraction pass instead of normalising both first (callers that build Z twice
    for the same positions get the same bits, so CVaR boundary ties agree). full_support:
    whether the reference has no -inf logit, when the caller already knows (None: checked)."""
    ref_logps = ref_logits - ref_lse.unsqueeze(-1)
    z = (ref_logits - policy_logits).add_((policy_lse - ref_lse).unsqueeze(-1))
    return _drift_of(z, ref_logps, full_support)


def has_full_support(ref_logps: Tensor) -> bool:
    """Whether every vocabulary entry has reference mass (no -inf log-probability or logit)."""
    return not bool(torch.isneginf(ref_logps).any())


def _drift_of(z: Tensor, ref_logps: Tensor, full_support: bool | None = None) -> Drift:
    if full_support is None:
        full_support = has_full_support(ref_logps)
    if full_support:  # the usual case (finite logits): no masking needed anywhere
        return Drift(z, ref_logps.exp(), None, ref_logps)
    support = ref_logps > -math.inf
    return Drift(torch.where(support, z, 0.0), ref_logps.exp(), support, ref_logps)


def negated(d: Drift) -> Drift:
    """The same positions with -Z: the lower tail of Z is the upper tail of -Z."""
    return Drift(-d.z, d.p, d.support, d.ref_logps)


def _masked(x: Tensor, support: Tensor | None, fill: float) -> Tensor:
    """x off the support replaced by fill (x itself when the support is everything)."""
    return x if support is None else torch.where(support, x, fill)


# --- KL (TDPO) ---------------------------------------------------------------------------


def kl_risk(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """KL(pi_ref || pi_theta) = E_ref[Z] (TDPO's sequential KL term); mu is ignored.

    Shapes: Drift (..., V) -> (...).
    """
    return (d.p * d.z).sum(-1)


def kl_weights(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """dPhi/dZ of the KL risk: pi_ref itself. Shapes: Drift (..., V) -> (..., V)."""
    return d.p


# --- Entropic risk -------------------------------------------------------------------------

# Above this value of max(mu * Z) the entropic risk switches from the expm1/log1p form
# (exact for small mu, where log E[exp(mu Z)] ~ mu * KL cancels catastrophically) to the
# plain log-sum-exp form (exact for large arguments, where expm1 would overflow).
_ERM_SWITCH = 1.0


def erm_risk(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """Entropic risk (1/mu) log E_ref[exp(mu Z)] = (1/mu) logsumexp(log pi_ref + mu Z).

    A Renyi divergence of order 1 + mu; mu -> 0 gives KL, larger mu is more risk-averse; >= KL.
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


def erm_weights(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """dPhi/dZ of the entropic risk: pi_ref e^(mu Z) / E_ref[e^(mu Z)], the exponentially
    tilted reference (zero off the support). Shapes: Drift (..., V) -> (..., V)."""
    return torch.softmax(_masked(d.ref_logps + mu * d.z, d.support, -math.inf), dim=-1)


def erm_lower_risk(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """The paper's entropic sign: -(1/mu) log E_ref[exp(-mu Z)], the upper-tail erm of -Z negated.

    Between 0 and KL for mu in (0, 1] (Hoelder: E_ref[exp(-mu Z)] = sum pi_ref^(1-mu)
    pi_theta^mu <= 1; Jensen: <= E[Z]); mu -> 0 gives KL. Above mu = 1 it can be negative,
    rewarding drift, so the domain stops at 1. Shapes: Drift (..., V) -> (...).
    """
    return -erm_risk(negated(d), mu)


def erm_lower_weights(d: Drift, mu: float, threshold: None = None) -> Tensor:
    """dPhi/dZ of erm_lower: pi_ref e^(-mu Z) / E_ref[e^(-mu Z)], tilted towards low drift.
    Shapes: Drift (..., V) -> (..., V)."""
    return erm_weights(negated(d), mu)


# --- CVaR: the upper tail (Ra-DPO code) and the lower tail (the paper's formula) ------------


@torch.no_grad()
def cvar_boundary(d: Drift, mu: float) -> Tensor:
    """The value eta of the boundary atom of the upper mu-tail of Z under pi_ref, by a full sort.

    Sort Z descending; the boundary atom is the first whose cumulative pi_ref mass reaches
    mu * (total mass): the atoms before it lie wholly in the tail, it lies in it fractionally.
    Off-support atoms are never in it. When rounding leaves the total a hair under the target,
    the last atom of the support is the boundary; at mu = 1 it is the smallest atom (the whole
    distribution is the tail). Shapes: Drift (..., V) -> (..., 1).
    """
    if mu >= 1.0:  # the whole distribution: the smallest atom, whatever the cumsum's rounding
        return lowest_atom(d)
    z = _masked(d.z, d.support, -math.inf)
    z_sorted, order = z.sort(dim=-1, descending=True)  # (..., V) each
    mass = d.p.gather(-1, order).cumsum(-1)  # (..., V) mass at or above each sorted atom
    reached = mass >= mu * d.p.sum(-1, keepdim=True)  # (..., V)
    last = (z_sorted > -math.inf).sum(-1, keepdim=True).clamp_(min=1) - 1  # (..., 1) last support atom
    reached.scatter_(-1, last, True)
    first = reached.int().argmax(-1, keepdim=True)  # (..., 1) first atom that reaches the target
    return z_sorted.gather(-1, first)


def lowest_atom(d: Drift) -> Tensor:
    """The smallest value of Z on the support: Drift (..., V) -> (..., 1)."""
    return _masked(d.z, d.support, math.inf).amin(-1, keepdim=True)


def _tied_mass(d: Drift, eta: Tensor) -> tuple[Tensor, Tensor]:
    """The atoms tied with the boundary value (..., V) bool and their pi_ref mass (..., 1),
    kept away from zero (an underflowed boundary atom then gets no share instead of NaN)."""
    tied = d.z == eta
    if d.support is not None:
        tied = tied & d.support
    mass = torch.where(tied, d.p, 0.0).sum(-1, keepdim=True)
    return tied, mass.clamp(min=torch.finfo(mass.dtype).tiny)


def cvar_risk(d: Drift, mu: float, threshold: Tensor | None = None) -> Tensor:
    """CVaR of Z at tail mass mu: the pi_ref-weighted mean of the upper mu-fraction of Z.

    Atoms are taken from the largest Z down until their mass reaches mu, the boundary atom
    fractionally, divided by mu. Written as eta + E[(Z - eta)_+] / mu with eta the boundary
    value (the Rockafellar-Uryasev form, exact at that eta). eta enters as the pi_ref-weighted
    mean of the atoms tied with it (the same value, to the bit), so autograd gives the
    symmetric subgradient: pi_ref / mu above the boundary, the tied atoms sharing the rest in
    proportion to pi_ref (cvar_weights). mu = 1 gives KL; >= KL.
    threshold: the boundary values (..., 1) of cvar_boundary (or the fast search); found here
    when None. Shapes: Drift (..., V) -> (...).
    """
    eta = (cvar_boundary(d, mu) if threshold is None else threshold).detach()  # (..., 1)
    tied, tied_mass = _tied_mass(d, eta)
    # Exactly zero in value (tied atoms equal eta); carries the gradient to the tied atoms.
    eta = eta + torch.where(tied, d.p * (d.z - eta), 0.0).sum(-1, keepdim=True) / tied_mass  # (..., 1)
    tail = (d.p * torch.relu(d.z - eta)).sum(-1, keepdim=True)  # (..., 1); relu'(0) = 0 at ties
    return (eta + tail / mu).squeeze(-1)


def cvar_weights(d: Drift, mu: float, threshold: Tensor | None = None) -> Tensor:
    """dPhi/dZ of cvar_risk, in closed form: pi_ref / mu on the atoms above the boundary value,
    and the rest of the unit mass, 1 - (mass above) / mu, shared by the atoms tied with it in
    proportion to pi_ref. A valid subgradient: 0 <= w <= pi_ref / mu, sum w = 1.
    threshold: the boundary values (..., 1). Shapes: Drift (..., V) -> (..., V)."""
    eta = cvar_boundary(d, mu) if threshold is None else threshold  # (..., 1)
    weights = torch.where(d.z > eta, d.p, 0.0).div_(mu)  # (..., V); off-support p = 0
    tied, tied_mass = _tied_mass(d, eta)
    share = (1.0 - weights.sum(-1, keepdim=True)) / tied_mass  # (..., 1)
    return weights.add_(torch.where(tied, d.p * share, 0.0))


@torch.no_grad()
def cvar_lower_boundary(d: Drift, mu: float) -> Tensor:
    """The boundary of the lower mu-tail of Z, as the value of -Z: Drift (..., V) -> (..., 1)."""
    return cvar_boundary(negated(d), mu)


def cvar_lower_risk(d: Drift, mu: float, threshold: Tensor | None = None) -> Tensor:
    """The paper's printed CVaR, (1/mu) * integral_0^mu F_Z^{-1}: the pi_ref-weighted mean of the
    LOWER mu-fraction of Z (atoms from the smallest Z up, the boundary fractionally), computed
    as -cvar(-Z). mu = 1 gives KL; <= KL; can be negative (it then rewards drift).
    threshold: cvar_lower_boundary's values of -Z (..., 1). Shapes: Drift (..., V) -> (...).
    """
    return -cvar_risk(negated(d), mu, threshold)


def cvar_lower_weights(d: Drift, mu: float, threshold: Tensor | None = None) -> Tensor:
    """dPhi/dZ of cvar_lower: cvar_weights of -Z (pi_ref / mu below the boundary, the tied atoms
    sharing the rest). Shapes: Drift (..., V) -> (..., V)."""
    return cvar_weights(negated(d), mu, threshold)


# --- The public Ra-DPO code's estimator ---------------------------------------------------


@torch.no_grad()
def cvar_radpo_threshold(d: Drift, mu: float) -> Tensor:
    """Unweighted quantile of Z over the support at level 1 - mu: Drift (..., V) -> (..., 1)."""
    return torch.nanquantile(_masked(d.z, d.support, math.nan), 1.0 - mu, dim=-1, keepdim=True)


def cvar_radpo_risk(d: Drift, mu: float, threshold: Tensor | None = None) -> Tensor:
    """The public Ra-DPO code's CVaR estimator, kept for comparison (mu = confidence c).

    q is the unweighted quantile of Z over the vocabulary entries (reference support) at
    level 1 - c; the risk is sum_v pi_ref(v) Z(v) [Z(v) > q], with no 1/c. Unlike that code,
    the whole vocabulary axis is used (no split into two halves). Atoms tied with q are not
    above it: a row whose atoms all tie (policy == reference) has risk 0 and gradient 0 with
    respect to the policy's logits, as KL has there. Its weights do not sum to 1 (no closed
    form is registered; the training step recomputes it under autograd).
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
    vocabulary for every measure that has one (so the gradient with respect to the policy's
    logits is pi_theta - weights); None where only autograd knows it.
    """

    fn: Callable[[Drift, float, Tensor | None], Tensor]
    mu_ok: Callable[[float], bool]
    mu_domain: str
    threshold: Callable[[Drift, float], Tensor] | None = None
    weights: Callable[[Drift, float, Tensor | None], Tensor] | None = None


def _unit_interval(mu: float) -> bool:
    return 0.0 < mu <= 1.0


RISK_MEASURES: dict[str, RiskMeasure] = {
    "kl": RiskMeasure(kl_risk, lambda mu: True, "ignored", weights=kl_weights),
    "cvar": RiskMeasure(cvar_risk, _unit_interval, "(0, 1]", cvar_boundary, cvar_weights),
    "erm": RiskMeasure(erm_risk, lambda mu: mu > 0.0 and math.isfinite(mu), "(0, inf)", weights=erm_weights),
    "cvar_radpo": RiskMeasure(cvar_radpo_risk, _unit_interval, "(0, 1]", cvar_radpo_threshold),
    "cvar_lower": RiskMeasure(cvar_lower_risk, _unit_interval, "(0, 1]", cvar_lower_boundary, cvar_lower_weights),
    "erm_lower": RiskMeasure(erm_lower_risk, _unit_interval, "(0, 1]", weights=erm_lower_weights),
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
    """Per-position risk Phi_mu(Z) of docs/method.md for the named measure (plain formulas).

    Args:
        policy_logps: normalised log-probabilities of the policy, (..., V).
        ref_logps: normalised log-probabilities of the reference, (..., V).
        measure: one of "kl", "cvar", "erm", "cvar_radpo", "cvar_lower", "erm_lower".
        mu: the measure's parameter (tail mass for cvar and cvar_lower, risk aversion for erm
            and erm_lower, confidence for cvar_radpo; ignored for kl).

    Returns:
        The risk at every position, shape (...). Differentiable with respect to both inputs.
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
