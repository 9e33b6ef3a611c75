"""Per-token terms and the preference loss of docs/method.md, as pure tensor functions.

One loss serves every stage (docs/method.md, "The loss"):

    L = -log sigmoid( beta * (M(y_w) - M(y_l)) - alpha * (beta * D(y_l) - sg(beta * D(y_w))) )

with M(y) = sum_t [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)] and D(y) = sum_t Phi_mu(Z_t).
alpha = 0 is DPO; measure "kl" is TDPO2 (variant 1, no stop-gradient, is TDPO1 at alpha = 1);
the other measures (cvar, erm and their lower-tail readings) are RSA.

sequence_terms states M(y) and D(y) plainly; the training step uses the same terms computed
block by block with a closed-form backward (rsa_pl.fast.chunked, through sequence_terms_chunked
and preference_loss_from_logits), tested equal to the plain ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rsa_pl.fast.chunked import ReferenceHead, chunked_sequence_terms
from rsa_pl.risk import RISK_MEASURES, check_mu, drift_from_logits

__all__ = [
    "SequenceTerms",
    "preference_loss",
    "preference_loss_from_logits",
    "sequence_terms",
    "sequence_terms_chunked",
]

VARIANTS = (1, 2)


@dataclass(frozen=True)
class SequenceTerms:
    """Sequence-level sums over response positions, one entry per sequence."""

    policy_logps: Tensor  # (N,) sum_t log pi_theta(y_t|s_t)
    ref_logps: Tensor  # (N,) sum_t log pi_ref(y_t|s_t)
    risk: Tensor | None  # (N,) D(y) = sum_t Phi_mu(Z_t); None when no measure was asked for


def _check_measure(measure: str | None, mu: float) -> None:
    if measure is None:
        return
    problem = check_mu(measure, mu)
    if problem is not None:
        raise ValueError(f"{'mu' if measure in RISK_MEASURES else 'measure'}: {problem}")


def _response_positions(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    measure: str | None,
    mu: float,
    ref_head: ReferenceHead | None = None,
) -> Tensor:
    """Checks the inputs of sequence_terms; returns the flat indices (P,) of response positions."""
    if policy_logits.dim() != 3:
        raise ValueError(f"policy_logits: must have shape (N, T, V), got {tuple(policy_logits.shape)}")
    if ref_head is not None:
        n, t, v = policy_logits.shape
        weight = tuple(ref_head.weight.shape)
        if len(weight) != 2 or weight[0] != v:
            raise ValueError(f"ref_head: weight must have shape (V, H) with V = {v}, got {weight}")
        if ref_logits.shape != (n, t, weight[1]):
            raise ValueError(
                f"ref_logits: with ref_head, the reference's hidden states of shape {(n, t, weight[1])}, "
                f"got {tuple(ref_logits.shape)}"
            )
        if ref_logits.requires_grad or ref_head.weight.requires_grad:
            raise ValueError("ref_head: the reference's hidden states and head take no gradient")
    elif ref_logits.shape != policy_logits.shape:
        raise ValueError(
            f"ref_logits: must have the shape of policy_logits {tuple(policy_logits.shape)}, "
            f"got {tuple(ref_logits.shape)}"
        )
    n, t, v = policy_logits.shape
    if labels.shape != (n, t) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: must be integer ids of shape {(n, t)}, got {labels.dtype} {tuple(labels.shape)}")
    if loss_mask.shape != (n, t) or loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask: must be bool of shape {(n, t)}, got {loss_mask.dtype} {tuple(loss_mask.shape)}")
    _check_measure(measure, mu)
    response_labels = labels[loss_mask]
    if response_labels.numel() and (response_labels.min() < 0 or response_labels.max() >= v):
        raise ValueError(f"labels: response positions hold ids outside [0, {v}) (vocabulary size V = {v})")
    return loss_mask.reshape(-1).nonzero().squeeze(1)  # (P,)


def sequence_terms(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    measure: str | None,
    mu: float,
) -> SequenceTerms:
    """Sampled-token margin terms and the sequential risk D(y) of every sequence, plainly:

        M(y) = sum_t [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)],   D(y) = sum_t Phi_mu(Z_t)

    over response positions t. Positions are already aligned: logits[:, t] is the distribution
    of labels[:, t]; positions where loss_mask is False (prompt, padding) change neither values
    nor gradients. Computes in float32 (float64 stays float64) whatever the logits' dtype. This
    holds full (N, T, V) log-probabilities; sequence_terms_chunked gives the same terms in
    bounded memory and is what training uses.

    Args:
        policy_logits: (N, T, V) logits of pi_theta.
        ref_logits: (N, T, V) logits of pi_ref (normally without gradient).
        labels: (N, T) integer token ids y_t (any value off the response).
        loss_mask: (N, T) bool, True at response positions.
        measure: risk measure name for D (rsa_pl.risk.RISK_MEASURES), or None to skip it.
        mu: the measure's parameter.

    Returns:
        SequenceTerms with policy_logps (N,), ref_logps (N,) and risk (N,) or None.
    """
    positions = _response_positions(policy_logits, ref_logits, labels, loss_mask, measure, mu)
    n, t, v = policy_logits.shape
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    x = policy_logits.reshape(n * t, v)[positions].to(dtype)  # (P, V) response positions only
    r = ref_logits.reshape(n * t, v)[positions].to(dtype)  # (P, V)
    lse_x, lse_r = torch.logsumexp(x, -1), torch.logsumexp(r, -1)  # (P,) log-normalisers
    tokens = labels.reshape(n * t)[positions].unsqueeze(-1)  # (P, 1)
    policy_tok = x.gather(-1, tokens).squeeze(-1) - lse_x  # (P,) log pi_theta(y_t|s_t)
    ref_tok = r.gather(-1, tokens).squeeze(-1) - lse_r  # (P,) log pi_ref(y_t|s_t)
    sequence = positions // t  # (P,) the sequence of each response position

    def per_sequence(values: Tensor) -> Tensor:  # (P,) -> (N,)
        return values.new_zeros(n).index_add(0, sequence, values)

    risk = None
    if measure is not None:
        # Z as (r - x) + (lse_x - lse_r): atoms whose logit differences tie keep tying in Z
        # (normalising each model first would round them apart); the chunked path does the same.
        d = drift_from_logits(x, r, lse_x, lse_r)  # (P, V)
        risk = per_sequence(RISK_MEASURES[measure].fn(d, float(mu), None))
    return SequenceTerms(per_sequence(policy_tok), per_sequence(ref_tok), risk)


def sequence_terms_chunked(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    measure: str | None,
    mu: float,
    chunk_size: int | None = None,
    ref_head: ReferenceHead | None = None,
    consume_logits: bool = False,
) -> SequenceTerms:
    """sequence_terms computed block by block (rsa_pl.fast.chunked): the same values and
    gradients, with no full (N, T, V) float32 copy held and a closed-form backward.

    Arguments as sequence_terms, plus chunk_size: positions per block (default: as many as
    fit 2**18 logits on a CPU, 2**24 on a GPU); ref_head: ref_logits are the reference's last
    hidden states (N, T, H) and its logits are computed block by block with this head (never
    held whole); consume_logits: the backward overwrites policy_logits with their gradient
    (one (N, T, V) buffer less; the caller must not read them after backward).
    """
    positions = _response_positions(policy_logits, ref_logits, labels, loss_mask, measure, mu, ref_head)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    policy_logps, ref_logps, risk = chunked_sequence_terms(
        policy_logits, ref_logits, labels, positions, measure, mu, chunk_size, ref_head, consume_logits
    )
    return SequenceTerms(policy_logps, ref_logps, risk if measure is not None else None)


def _check_objective(beta: float, alpha: float, variant: int) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not (0.0 < beta < math.inf):
        raise ValueError(f"beta: must be a finite number > 0, got {beta!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (0.0 <= alpha < math.inf):
        raise ValueError(f"alpha: must be a finite number >= 0, got {alpha!r}")
    if variant not in VARIANTS or isinstance(variant, bool):
        raise ValueError(f"variant: must be one of {VARIANTS}, got {variant!r}")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_risk: Tensor | None,
    rejected_risk: Tensor | None,
    *,
    beta: float,
    alpha: float,
    variant: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The docs/method.md preference loss from sequence-level terms.

        L = -log sigmoid( beta (M_w - M_l) - alpha (beta D_l - sg(beta D_w)) )

    Variant 2 stops the gradient through D(y_w) (TDPO2, Ra-DPO_2, RSA Eq. 15); variant 1 lets
    it flow (TDPO1 at alpha = 1). With alpha = 0 this is DPO and the risks may be None.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) sum_t log pi_theta(y_t|s_t).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under pi_ref.
        chosen_risk, rejected_risk: (B,) D(y_w), D(y_l), or None when alpha = 0.
        beta: temperature, > 0. alpha: weight of the risk term, >= 0. variant: 1 or 2.

    Returns:
        Per-example losses (B,) and detached per-example metrics (B,) named as docs/method.md logs
        them: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected} and,
        when the risks are given, risk/{chosen,rejected}.
    """
    _check_objective(beta, alpha, variant)
    shape = policy_chosen_logps.shape
    named = {
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_risk": chosen_risk,
        "rejected_risk": rejected_risk,
    }
    for name, value in named.items():
        if value is not None and value.shape != shape:
            raise ValueError(
                f"{name}: must have the shape of policy_chosen_logps {tuple(shape)}, got {tuple(value.shape)}"
            )
    if alpha > 0 and (chosen_risk is None or rejected_risk is None):
        raise ValueError(f"chosen_risk, rejected_risk: required when alpha > 0 (alpha = {alpha})")
    chosen_margin = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_margin = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_margin - rejected_margin)  # (B,)
    if alpha > 0:
        chosen_term = beta * chosen_risk
        if variant == 2:
            chosen_term = chosen_term.detach()
        logits = logits - alpha * (beta * rejected_risk - chosen_term)
    losses = -F.logsigmoid(logits)  # (B,)

    chosen_rewards = (beta * chosen_margin).detach()
    rejected_rewards = (beta * rejected_margin).detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }
    if chosen_risk is not None and rejected_risk is not None:
        metrics["risk/chosen"] = chosen_risk.detach()
        metrics["risk/rejected"] = rejected_risk.detach()
    return losses, metrics


def preference_loss_from_logits(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    beta: float,
    alpha: float,
    variant: int,
    measure: str | None,
    mu: float,
    chunk_size: int | None = None,
    ref_head: ReferenceHead | None = None,
    consume_logits: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The preference loss of a concatenated [chosen; rejected] batch, from logits.

    The first half of the batch holds the chosen responses, the second half the rejected
    ones to the same prompts, in the same order (one forward per model for both).

    Args:
        policy_logits, ref_logits: (2B, T, V), aligned with labels.
        labels: (2B, T) token ids. loss_mask: (2B, T) bool, True at response positions.
        beta, alpha, variant: as preference_loss.
        measure, mu: the risk measure of D; measure may be None only when alpha = 0.
        chunk_size, ref_head, consume_logits: see sequence_terms_chunked (ref_logits are then
            the reference's hidden states).

    Returns:
        Per-pair losses (B,) and detached per-pair metrics, as preference_loss.
    """
    _check_objective(beta, alpha, variant)
    if alpha > 0 and measure is None:
        raise ValueError(f"measure: required when alpha > 0 (alpha = {alpha}); allowed: {', '.join(RISK_MEASURES)}")
    if policy_logits.dim() != 3 or policy_logits.shape[0] % 2:
        raise ValueError(
            f"policy_logits: must be a [chosen; rejected] batch of shape (2B, T, V), got {tuple(policy_logits.shape)}"
        )
    terms = sequence_terms_chunked(
        policy_logits,
        ref_logits,
        labels,
        loss_mask,
        measure=measure,
        mu=mu,
        chunk_size=chunk_size,
        ref_head=ref_head,
        consume_logits=consume_logits,
    )
    policy_chosen, policy_rejected = terms.policy_logps.chunk(2)
    ref_chosen, ref_rejected = terms.ref_logps.chunk(2)
    chosen_risk, rejected_risk = terms.risk.chunk(2) if terms.risk is not None else (None, None)
    return preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        chosen_risk,
        rejected_risk,
        beta=beta,
        alpha=alpha,
        variant=variant,
    )
