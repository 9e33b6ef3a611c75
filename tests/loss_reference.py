"""An independent float64 reference of the whole RSA preference loss, for the tests.

Written from docs/method.md ("Notation", "Risk measures", "Ties and gradients", "The loss"),
position by position and atom by atom, and sharing no code with rsa_pl or tests/reference.py:
from policy logits, reference logits, labels and the response mask of a [chosen; rejected]
batch to the per-pair loss

    L = -log sigmoid( beta (M(y_w) - M(y_l)) - alpha (beta D(y_l) - sg(beta D(y_w))) )

with M(y) = sum_t [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)], D(y) = sum_t Phi_mu(Z_t) and
Z_t(v) = log pi_ref(v|s_t) - log pi_theta(v|s_t) over the reference's support. Everything is a
torch float64 expression, so autograd through it gives the reference's gradients; the CVaRs are
written so that this gradient is the documented symmetric subgradient at ties (the atoms tied
at the tail's boundary share its remaining mass in proportion to pi_ref).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100  # the label of prompt and padding positions (docs/method.md, "Notation")

# Drift values closer than this are one value. The tests' ties are exact in real arithmetic,
# but log pi_ref(v) - log pi_theta(v) rounds each atom on its own and can split them by an ulp;
# random drifts never come this close by chance.
TIE = 1e-10


@dataclass(frozen=True)
class Atoms:
    """The drift at one position as a discrete random variable: Z(v) with pi_ref(v) > 0."""

    z: Tensor  # (K,) Z(v), differentiable in the policy's logits
    p: Tensor  # (K,) pi_ref(v)
    log_p: Tensor  # (K,) log pi_ref(v)


def log_softmax(logits: Tensor) -> Tensor:
    """log of softmax, by its definition with the largest logit shifted out: (V,) -> (V,)."""
    top = logits.detach().max()
    return logits - (top + torch.log(torch.exp(logits - top).sum()))


def atoms(policy_logits: Tensor, ref_logits: Tensor) -> Atoms:
    """Z over the reference's support; entries with a -inf reference logit carry no mass and
    are left out. (V,), (V,) -> Atoms of K <= V entries."""
    policy_logps, ref_logps = log_softmax(policy_logits), log_softmax(ref_logits)
    support = [v for v in range(ref_logits.numel()) if float(ref_logits[v]) > -math.inf]
    index = torch.tensor(support)
    log_p = ref_logps[index]
    return Atoms(log_p - policy_logps[index], torch.exp(log_p), log_p)


def log_sum_exp(a: Tensor) -> Tensor:
    """log sum_k e^(a_k), the largest term shifted out: (K,) -> ()."""
    top = a.detach().max()
    return top + torch.log(torch.exp(a - top).sum())


def kl(d: Atoms, mu: float) -> Tensor:
    """E_ref[Z] = KL(pi_ref || pi_theta); mu is ignored."""
    return (d.p * d.z).sum()


def erm(d: Atoms, mu: float) -> Tensor:
    """(1/mu) log E_ref[e^(mu Z)] = (1/mu) log sum_v e^(log pi_ref(v) + mu Z(v))."""
    return log_sum_exp(d.log_p + mu * d.z) / mu


def erm_lower(d: Atoms, mu: float) -> Tensor:
    """-(1/mu) log E_ref[e^(-mu Z)]."""
    return -log_sum_exp(d.log_p - mu * d.z) / mu


def tied_groups(values: list[float], descending: bool) -> list[list[int]]:
    """The atoms' indices sorted by value, consecutive equal values (within TIE) grouped."""
    groups: list[list[int]] = []
    for k in sorted(range(len(values)), key=lambda k: values[k], reverse=descending):
        if groups and abs(values[k] - values[groups[-1][0]]) <= TIE:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def tail_mean(d: Atoms, mu: float, upper: bool) -> Tensor:
    """The pi_ref-weighted mean of the upper (or lower) mu-mass of Z: sort the atoms (largest
    first for the upper tail), take them until their mass reaches mu, the boundary value
    fractionally, and divide by mu.

    Atoms of equal value are taken together, each value's share of its mass spread over its
    atoms in proportion to pi_ref: the same number (they are equal), and autograd then gives
    the symmetric subgradient, pi_ref / mu inside the tail and the boundary value's atoms
    sharing what is left of the unit mass.
    """
    remaining, total = mu, d.z.new_zeros(())
    for group in tied_groups(d.z.detach().tolist(), descending=upper):
        if remaining <= 0.0:
            break
        index = torch.tensor(group)
        mass = math.fsum(d.p[index].tolist())
        take = min(mass, remaining)
        total = total + (take / mass) * (d.p[index] * d.z[index]).sum()
        remaining -= take
    return total / mu


def cvar(d: Atoms, mu: float) -> Tensor:
    """The upper mu-tail mean of Z (>= KL)."""
    return tail_mean(d, mu, upper=True)


def cvar_lower(d: Atoms, mu: float) -> Tensor:
    """The lower mu-tail mean of Z, (1/mu) integral_0^mu F_Z^{-1} (<= KL)."""
    return tail_mean(d, mu, upper=False)


def cvar_radpo(d: Atoms, c: float) -> Tensor:
    """The public Ra-DPO code's estimator: q the unweighted quantile of the support's Z values at
    level 1 - c (linear interpolation between the sorted values), then sum pi_ref Z [Z > q];
    no gradient through q, no 1/c. An atom tied with q (within TIE) is not above it."""
    values = sorted(d.z.detach().tolist())
    h = (len(values) - 1) * (1.0 - c)
    low, high = math.floor(h), math.ceil(h)
    q = values[low] + (h - low) * (values[high] - values[low])
    above = torch.tensor([value > q + TIE for value in d.z.detach().tolist()])
    return (d.p * d.z * above).sum()


MEASURES: dict[str, Callable[[Atoms, float], Tensor]] = {
    "kl": kl,
    "cvar": cvar,
    "erm": erm,
    "cvar_radpo": cvar_radpo,
    "cvar_lower": cvar_lower,
    "erm_lower": erm_lower,
}


@dataclass(frozen=True)
class Reference:
    """The reference's loss and its parts, with their autograd graphs (detach what you log)."""

    losses: Tensor  # (B,) per pair
    logits: Tensor  # (B,) u, the argument of -log sigmoid
    policy_logps: Tensor  # (2B,) sum_t log pi_theta(y_t|s_t), chosen rows first
    ref_logps: Tensor  # (2B,) sum_t log pi_ref(y_t|s_t)
    risk: Tensor  # (2B,) D(y) = sum_t Phi_mu(Z_t); zeros without a measure


def neg_log_sigmoid(u: Tensor) -> Tensor:
    """-log sigmoid(u) = log(1 + e^(-u)), written on each side of 0 so that e^(...) <= 1."""
    if float(u.detach()) >= 0.0:
        return torch.log1p(torch.exp(-u))
    return -u + torch.log1p(torch.exp(u))


def sequence_sums(
    policy_logits: Tensor, ref_logits: Tensor, labels: Tensor, mask: Tensor, measure: str | None, mu: float
) -> tuple[Tensor, Tensor, Tensor]:
    """sum_t log pi_theta(y_t), sum_t log pi_ref(y_t) and D over the response positions of one
    sequence, where logits[t] is the distribution of labels[t]. (T, V), (T, V), (T,), (T,) -> 3 x ()."""
    policy_sum = ref_sum = risk_sum = policy_logits.new_zeros(())
    for t in range(labels.numel()):
        if not bool(mask[t]):
            continue
        y = int(labels[t])
        policy_sum = policy_sum + log_softmax(policy_logits[t])[y]
        ref_sum = ref_sum + log_softmax(ref_logits[t])[y]
        if measure is not None:
            risk_sum = risk_sum + MEASURES[measure](atoms(policy_logits[t], ref_logits[t]), mu)
    return policy_sum, ref_sum, risk_sum


def pair_losses(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    beta: float,
    alpha: float,
    variant: int,
    measure: str | None,
    mu: float,
) -> Reference:
    """The loss of a [chosen; rejected] batch: rows 0..B-1 the chosen responses, rows B..2B-1
    the rejected ones to the same prompts. logits[:, t] is the distribution of labels[:, t];
    mask is True at response positions. (2B, T, V), (2B, T, V), (2B, T), (2B, T) -> Reference.
    Variant 2 stops the gradient through D(y_w); variant 1 does not."""
    policy_logits, ref_logits = policy_logits.double(), ref_logits.double()
    rows = [sequence_sums(policy_logits[n], ref_logits[n], labels[n], mask[n], measure, mu) for n in range(len(labels))]
    policy_logps, ref_logps, risk = (torch.stack(column) for column in zip(*rows, strict=True))
    pairs = len(labels) // 2
    losses, logits = [], []
    for chosen in range(pairs):
        rejected = pairs + chosen
        margin_w = policy_logps[chosen] - ref_logps[chosen]
        margin_l = policy_logps[rejected] - ref_logps[rejected]
        chosen_term = beta * risk[chosen]
        if variant == 2:
            chosen_term = chosen_term.detach()
        u = beta * (margin_w - margin_l) - alpha * (beta * risk[rejected] - chosen_term)
        logits.append(u)
        losses.append(neg_log_sigmoid(u))
    return Reference(torch.stack(losses), torch.stack(logits), policy_logps, ref_logps, risk)


def next_token_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The shift of a causal LM: the logits at position t are the distribution of the token at
    t + 1 (s_{t+1} = [x, y_<=t] is known at t). From the data's labels (N, T), IGNORE off the
    response, to the label each position's logits predict (N, T) and the mask of the positions
    that predict a response token (N, T); the last position predicts nothing."""
    n, t = labels.shape
    targets = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for row in range(n):
        for position in range(t - 1):
            token = int(labels[row, position + 1])
            if token != IGNORE:
                targets[row, position], mask[row, position] = token, True
    return targets, mask
