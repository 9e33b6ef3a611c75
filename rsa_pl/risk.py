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


# Histogram bins per refinement level of the CVaR threshold search, the most levels, and the
# candidates per row at or under which the boundary bin's atoms are simply sorted. With 4096
# bins one level usually leaves a few dozen candidates of a 32k vocabulary.
_CVAR_BINS = 4096
_CVAR_MAX_LEVELS = 4
_CVAR_SORT_CAP = 512


def _boundary_bin(hist: Tensor, above: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The bin holding each row's boundary and the mass strictly above that bin.

    hist (R, K) mass per bin (bin K - 1 holds the largest values), above (R,) mass above every
    bin, target (R,) -> bin (R,) int64, mass above it (R,)."""
    bins = hist.shape[-1]
    at_or_above = above.unsqueeze(-1) + hist.flip(-1).cumsum(-1).flip(-1)  # (R, K) mass in bins >= j
    boundary = ((at_or_above >= target.unsqueeze(-1)).sum(-1) - 1).clamp_(min=0)  # (R,)
    next_bin = (boundary + 1).clamp(max=bins - 1).unsqueeze(-1)
    return boundary, torch.where(boundary < bins - 1, at_or_above.gather(1, next_bin).squeeze(-1), above)


@torch.no_grad()
def _cvar_boundary_index(z: Tensor, p: Tensor, support: Tensor | None, mu: float) -> Tensor:
    """Index of the boundary atom of the upper mu-tail of Z under p, without a full sort.

    The boundary atom k is the largest value of Z with P(Z >= Z_k) >= mu * total mass: the
    atoms above it lie wholly in the tail, it lies in it fractionally. One dense pass bins every
    atom of a row into equal-width bins between the row's extremes (a weighted histogram,
    scatter_add) and finds the bin where the mass from the top reaches the target; only that
    bin's atoms are kept, compacted, refined with further histograms while a row keeps more
    than _CVAR_SORT_CAP of them, then sorted: bin assignment is monotone in Z, so the result is
    exact. Rows whose atoms all share one value (policy equal to reference) take their first
    atom. Of atoms tied with the boundary, the one with the lowest index is taken.

    Shapes: z, p, support (R, V) -> index (R, 1) int64.
    """
    rows = z.shape[0]
    target = mu * p.sum(-1)  # (R,) tail mass
    if support is None:
        lo, hi = z.amin(-1), z.amax(-1)  # (R,) each
    else:
        lo = torch.where(support, z, math.inf).amin(-1)
        hi = torch.where(support, z, -math.inf).amax(-1)
    tied = hi <= lo  # (R,) every atom the same value: any of them is the boundary
    first_atom = z.new_zeros(rows, dtype=torch.long) if support is None else support.int().argmax(-1)
    if bool(tied.all()):
        return first_atom.unsqueeze(-1)

    # Level 1, dense over (R, V): each atom's bin, offset by its row's, in int32 (half the
    # memory traffic of int64) for one weighted bincount over all rows.
    scale = torch.where(tied, 0.0, _CVAR_BINS / (hi - lo)).unsqueeze(-1)  # (R, 1)
    flat = (z - lo.unsqueeze(-1)).mul_(scale).clamp_(0, _CVAR_BINS - 1).to(torch.int32)  # (R, V), monotone in z
    offsets = torch.arange(0, rows * _CVAR_BINS, _CVAR_BINS, dtype=torch.int32, device=z.device).unsqueeze(-1)
    flat.add_(offsets)
    weights = _masked(p, support, 0.0).reshape(-1)
    hist = torch.bincount(flat.view(-1), weights=weights, minlength=rows * _CVAR_BINS).to(z.dtype)
    boundary_bin, above = _boundary_bin(hist.view(rows, _CVAR_BINS), z.new_zeros(rows), target)
    in_bin = flat == (boundary_bin.to(torch.int32) + offsets.squeeze(-1)).unsqueeze(-1)  # (R, V)
    if support is not None:
        in_bin.logical_and_(support)
    if bool(tied.any()):
        in_bin.masked_fill_(tied.unsqueeze(-1), False)
    row, col = in_bin.nonzero(as_tuple=True)  # the candidates, compacted (row-major)
    zc, pc = z[row, col], p[row, col]

    # Further levels on the candidates only, while some row has many.
    for _ in range(_CVAR_MAX_LEVELS - 1):
        if row.numel() == 0 or int(torch.bincount(row, minlength=rows).max()) <= _CVAR_SORT_CAP:
            break
        lo_c = zc.new_full((rows,), math.inf).scatter_reduce_(0, row, zc, "amin")
        hi_c = zc.new_full((rows,), -math.inf).scatter_reduce_(0, row, zc, "amax")
        flat = hi_c <= lo_c  # (R,) rows whose candidates all tie (or none left): keep them all
        scale_c = torch.where(flat, 0.0, _CVAR_BINS / (hi_c - lo_c))
        bins_c = ((zc - lo_c[row]) * scale_c[row]).clamp_(0, _CVAR_BINS - 1).long()
        hist = zc.new_zeros(rows * _CVAR_BINS).scatter_add_(0, row * _CVAR_BINS + bins_c, pc)
        next_bin, next_above = _boundary_bin(hist.view(rows, _CVAR_BINS), above, target)
        keep = (bins_c == next_bin[row]) | flat[row]
        above = torch.where(flat, above, next_above)
        row, col, zc, pc = row[keep], col[keep], zc[keep], pc[keep]

    # Exact: each row's candidates by descending Z (lowest index first among ties), mass
    # accumulated from above the bin down to the first atom that reaches the target.
    order = torch.argsort(zc, descending=True, stable=True)
    order = order[torch.argsort(row[order], stable=True)]
    row, col, pc = row[order], col[order], pc[order]
    counts = torch.bincount(row, minlength=rows)  # (R,)
    ends = counts.cumsum(0)  # (R,) one past each row's last candidate
    total = pc.cumsum(0)
    before = torch.cat([total.new_zeros(1), total])[ends - counts]  # (R,) mass of earlier rows
    reached = above[row] + (total - before[row]) >= target[row]
    position = torch.arange(row.numel(), device=z.device)
    first = torch.full_like(counts, row.numel()).scatter_reduce_(
        0, row, torch.where(reached, position, row.numel()), "amin"
    )
    # Rounding can leave the total a hair under the target: then the row's lowest atom is it.
    first = torch.minimum(first, ends - 1).clamp_(min=0)
    boundary = col[first] if row.numel() else first_atom
    return torch.where(tied | (counts == 0), first_atom, boundary).unsqueeze(-1)


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
