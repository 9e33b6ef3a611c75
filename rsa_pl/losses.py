"""Per-token terms and the preference loss of PAPER.md, as pure tensor functions.

One loss serves every stage (PAPER.md, "The loss"):

    L = -log sigmoid( beta * (M(y_w) - M(y_l)) - alpha * (beta * D(y_l) - sg(beta * D(y_w))) )

with M(y) = sum_t [log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)] and D(y) = sum_t Phi_mu(Z_t).
alpha = 0 is DPO; measure "kl" is TDPO2 (variant 1, no stop-gradient, is TDPO1 at alpha = 1);
measures "cvar" and "erm" are RSA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rsa_pl.risk import RISK_MEASURES, check_mu, drift_from_logits, has_full_support

__all__ = ["SequenceTerms", "preference_loss", "preference_loss_from_logits", "sequence_terms"]

# Elements of one (positions x V) float32 block the chunked terms work on at a time (8 MiB):
# small enough to stay cache-friendly and memory-bounded, large enough to amortise overhead.
_CHUNK_ELEMENTS = 1 << 21
VARIANTS = (1, 2)


@dataclass(frozen=True)
class SequenceTerms:
    """Sequence-level sums over response positions, one entry per sequence."""

    policy_logps: Tensor  # (N,) sum_t log pi_theta(y_t|s_t)
    ref_logps: Tensor  # (N,) sum_t log pi_ref(y_t|s_t)
    risk: Tensor | None  # (N,) D(y) = sum_t Phi_mu(Z_t); None when no measure was asked for

    @property
    def margin(self) -> Tensor:
        """M(y) = sum_t m_t, shape (N,)."""
        return self.policy_logps - self.ref_logps


def _chunk_terms(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    measure: str | None,
    mu: float,
    threshold: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Sampled-token log-probs of both models and the token risk at a block of positions.

    Shapes: (P, V), (P, V), (P,) -> (P,), (P,), (P,) and the measure's threshold (P, 1) or
    None (pass it back to skip the search when the block is recomputed). At least float32.
    Differentiable (the backward of _ChunkedTerms uses it where no closed form applies).
    """
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    x, r = policy_logits.to(dtype), ref_logits.to(dtype)
    lse_x, lse_r = torch.logsumexp(x, dim=-1), torch.logsumexp(r, dim=-1)  # (P,)
    index = labels.unsqueeze(-1)
    policy_tok = x.gather(-1, index).squeeze(-1) - lse_x  # (P,)
    ref_tok = r.gather(-1, index).squeeze(-1) - lse_r  # (P,)
    if measure is None:
        return policy_tok, ref_tok, policy_tok.new_zeros(policy_tok.shape), None
    spec = RISK_MEASURES[measure]
    d = drift_from_logits(x, r, lse_x, lse_r)
    if threshold is None and spec.threshold is not None:
        threshold = spec.threshold(d, mu)
    return policy_tok, ref_tok, spec.fn(d, mu, threshold), threshold


def _block_forward(
    policy_logits: Tensor, ref_logits: Tensor, labels: Tensor, measure: str | None, mu: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, bool | None]:
    """_chunk_terms' values without autograd, plus what the closed-form backward reuses: both
    models' log-normalisers (2, P) and whether the reference has full support (None: no measure).
    Without a measure no (P, V) log-probabilities are materialised: the
    sampled-token log-prob is the gathered logit minus the log-sum-exp, as in TRL's DPO."""
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    x, r = policy_logits.to(dtype), ref_logits.to(dtype)
    lse = torch.stack([torch.logsumexp(x, dim=-1), torch.logsumexp(r, dim=-1)])  # (2, P)
    index = labels.unsqueeze(-1)
    policy_tok = x.gather(-1, index).squeeze(-1) - lse[0]
    ref_tok = r.gather(-1, index).squeeze(-1) - lse[1]
    if measure is None:
        return policy_tok, ref_tok, policy_tok.new_zeros(policy_tok.shape), None, lse, None
    spec = RISK_MEASURES[measure]
    full_support = has_full_support(r)
    d = drift_from_logits(x, r, lse[0], lse[1], full_support)
    threshold = spec.threshold(d, mu) if spec.threshold is not None else None
    return policy_tok, ref_tok, spec.fn(d, mu, threshold), threshold, lse, full_support


def _block_policy_grad(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    measure: str | None,
    mu: float,
    threshold: Tensor | None,
    grad_tok: Tensor,
    grad_risk: Tensor | None,
    full_support: bool | None = None,
) -> Tensor:
    """The gradient with respect to the policy's logits of a block, in closed form:

        grad_tok * (onehot(y) - pi_theta) + grad_risk * (pi_theta - w),   w = dPhi/dZ

    (d log pi_theta(y)/dx = onehot(y) - pi_theta; dZ_v/dx_u = pi_theta_u - [u = v], and each
    measure's w sums to 1). One pass for pi_theta, one for w: no autograd graph is rebuilt.
    Shapes: (P, V), (P, V), (P,), (2, P), ..., (P,), (P,) or None -> (P, V)."""
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    x = policy_logits.to(dtype)
    probs = (x - lse[0].unsqueeze(-1)).exp_()  # (P, V) pi_theta
    if measure is None or grad_risk is None:
        grad = probs.mul_(-grad_tok.unsqueeze(-1))
    else:
        spec = RISK_MEASURES[measure]
        assert spec.weights is not None
        d = drift_from_logits(x, ref_logits.to(dtype), lse[0], lse[1], full_support)
        weights = spec.weights(d, mu, threshold)  # (P, V)
        grad = probs.mul_((grad_risk - grad_tok).unsqueeze(-1)).sub_(weights.mul_(grad_risk.unsqueeze(-1)))
    return grad.scatter_add_(-1, labels.unsqueeze(-1), grad_tok.unsqueeze(-1).to(grad.dtype))


class _ChunkedTerms(torch.autograd.Function):
    """Per-sequence sums of the token terms, computed block by block over response positions.

    Forward keeps no intermediate (B, T, V) tensor, only each position's two log-normalisers
    and risk threshold (the CVaR boundary atom, say). Backward writes each block's gradient
    into one preallocated buffer, so peak memory is the logits, their gradient and one block,
    whatever T. The gradient with respect to the policy's logits is computed in closed form
    (_block_policy_grad) when the reference needs none and the measure has one (kl, cvar,
    erm: every training setting); otherwise the block is recomputed under autograd, reusing
    the threshold instead of searching again.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        policy_logits: Tensor,  # (N, T, V)
        ref_logits: Tensor,  # (N, T, V)
        labels: Tensor,  # (N, T)
        positions: Tensor,  # (P,) flat indices of response positions
        measure: str | None,
        mu: float,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, t, v = policy_logits.shape
        policy_flat, ref_flat = policy_logits.reshape(n * t, v), ref_logits.reshape(n * t, v)
        labels_flat = labels.reshape(n * t)
        dtype = torch.promote_types(policy_logits.dtype, torch.float32)
        per_position = torch.zeros(3, positions.numel(), dtype=dtype, device=policy_logits.device)
        normalisers = torch.zeros(2, positions.numel(), dtype=dtype, device=policy_logits.device)
        thresholds, ctx.full_support = [], []
        for start in range(0, positions.numel(), chunk_size):
            block = positions[start : start + chunk_size]
            *terms, threshold, lse, full_support = _block_forward(
                policy_flat.index_select(0, block),
                ref_flat.index_select(0, block),
                labels_flat.index_select(0, block),
                measure,
                mu,
            )
            per_position[:, start : start + block.numel()] = torch.stack(terms)
            normalisers[:, start : start + block.numel()] = lse
            thresholds.append(threshold)
            ctx.full_support.append(full_support)  # the backward need not check again
        sequence = positions // t  # (P,)
        sums = per_position.new_zeros(3, n).index_add_(1, sequence, per_position)  # (3, N)
        ctx.has_thresholds = any(threshold is not None for threshold in thresholds)
        saved_thresholds = torch.cat(thresholds) if ctx.has_thresholds else positions.new_empty(0)  # (P, 1)
        # A reference computed under torch.inference_mode() cannot be saved for backward; it
        # needs no version check either, having no gradient.
        ctx.ref_logits = ref_logits if ref_logits.is_inference() else None
        saved_ref = positions.new_empty(0) if ref_logits.is_inference() else ref_logits
        ctx.save_for_backward(policy_logits, saved_ref, labels, positions, saved_thresholds, normalisers)
        ctx.measure, ctx.mu, ctx.chunk_size = measure, mu, chunk_size
        policy_sum, ref_sum, risk_sum = (row.clone() for row in sums)
        return policy_sum, ref_sum, risk_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        policy_logits, ref_logits, labels, positions, thresholds, normalisers = ctx.saved_tensors
        ref_logits = ctx.ref_logits if ctx.ref_logits is not None else ref_logits
        need_policy, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # A risk that only is logged (alpha = 0) gets zero gradient: skip recomputing it.
        measure = ctx.measure if bool(grads[2].any()) else None
        n, t, v = policy_logits.shape
        policy_flat, ref_flat = policy_logits.reshape(n * t, v), ref_logits.reshape(n * t, v)
        labels_flat = labels.reshape(n * t)
        sequence = positions // t
        upstream = [g[sequence] if g is not None else None for g in grads]  # each (P,)
        # Every response row is written below; only the other rows need zeros (filling the whole
        # buffer first would be one more pass over (N T, V)).
        others = torch.ones(n * t, dtype=torch.bool, device=positions.device).index_fill_(0, positions, False)
        grad_policy = torch.empty_like(policy_flat).masked_fill_(others.unsqueeze(-1), 0) if need_policy else None
        grad_ref = torch.empty_like(ref_flat).masked_fill_(others.unsqueeze(-1), 0) if need_ref else None
        closed_form = not need_ref and (measure is None or RISK_MEASURES[measure].weights is not None)
        for start in range(0, positions.numel(), ctx.chunk_size):
            block = positions[start : start + ctx.chunk_size]
            stop = start + block.numel()
            if closed_form:
                if need_policy:
                    grad_tok = upstream[0][start:stop] if upstream[0] is not None else None
                    grad_risk = upstream[2][start:stop] if upstream[2] is not None and measure else None
                    if grad_tok is None:
                        grad_tok = normalisers.new_zeros(block.numel())
                    block_grad = _block_policy_grad(
                        policy_flat.index_select(0, block),
                        ref_flat.index_select(0, block),
                        labels_flat.index_select(0, block),
                        normalisers[:, start:stop],
                        measure,
                        ctx.mu,
                        thresholds[start:stop] if ctx.has_thresholds and measure else None,
                        grad_tok,
                        grad_risk,
                        ctx.full_support[start // ctx.chunk_size],
                    )
                    grad_policy.index_copy_(0, block, block_grad.to(grad_policy.dtype))
                continue
            with torch.enable_grad():
                policy_block = policy_flat.index_select(0, block).detach().requires_grad_(need_policy)
                ref_block = ref_flat.index_select(0, block).detach().requires_grad_(need_ref)
                *terms, _ = _chunk_terms(
                    policy_block,
                    ref_block,
                    labels_flat.index_select(0, block),
                    measure,
                    ctx.mu,
                    thresholds[start:stop] if ctx.has_thresholds and measure else None,
                )
                total = sum(
                    (term * g[start:stop]).sum() for term, g in zip(terms, upstream, strict=True) if g is not None
                )
                wrt = [x for x in (policy_block, ref_block) if x.requires_grad]
                if not torch.is_tensor(total) or not total.requires_grad:  # nothing flows: zeros
                    for buffer in (grad_policy, grad_ref):
                        if buffer is not None:
                            buffer.index_fill_(0, block, 0)
                    continue
                block_grads = iter(torch.autograd.grad(total, wrt))
            if need_policy:
                grad_policy.index_copy_(0, block, next(block_grads).to(grad_policy.dtype))
            if need_ref:
                grad_ref.index_copy_(0, block, next(block_grads).to(grad_ref.dtype))
        return (
            grad_policy.view(n, t, v) if need_policy else None,
            grad_ref.view(n, t, v) if need_ref else None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_measure(measure: str | None, mu: float) -> None:
    if measure is None:
        return
    problem = check_mu(measure, mu)
    if problem is not None:
        raise ValueError(f"{'mu' if measure in RISK_MEASURES else 'measure'}: {problem}")


def sequence_terms(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    measure: str | None,
    mu: float,
    chunk_size: int | None = None,
) -> SequenceTerms:
    """Sampled-token margin terms and the sequential risk D(y) of every sequence.

    Positions are already aligned: logits[:, t] is the distribution of labels[:, t]. Only
    positions where loss_mask is True (response tokens) count; logits elsewhere change
    neither the values nor the gradients. Computes in float32 (float64 inputs stay float64)
    whatever the logits' dtype, in blocks of chunk_size positions (default: as many as fit
    2**21 logits), so no full (N, T, V) float32 copy is held.

    Args:
        policy_logits: (N, T, V) logits of pi_theta.
        ref_logits: (N, T, V) logits of pi_ref (normally without gradient).
        labels: (N, T) integer token ids y_t.
        loss_mask: (N, T) bool, True at response positions.
        measure: risk measure name for D, or None to skip the risk term.
        mu: the measure's parameter (see rsa_pl.risk).
        chunk_size: positions per block.

    Returns:
        SequenceTerms with policy_logps (N,), ref_logps (N,) and risk (N,) or None.
    """
    if policy_logits.dim() != 3:
        raise ValueError(f"policy_logits: must have shape (N, T, V), got {tuple(policy_logits.shape)}")
    if ref_logits.shape != policy_logits.shape:
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
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(v, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    response_labels = labels[loss_mask]
    if response_labels.numel() and (response_labels.min() < 0 or response_labels.max() >= v):
        raise ValueError(f"labels: response positions hold ids outside [0, {v}) (vocabulary size V = {v})")
    positions = loss_mask.reshape(-1).nonzero().squeeze(1)  # (P,)
    policy_logps, ref_logps, risk = _ChunkedTerms.apply(
        policy_logits.contiguous(), ref_logits.contiguous(), labels, positions, measure, float(mu), chunk_size
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
    """The PAPER.md preference loss from sequence-level terms.

        L = -log sigmoid( beta (M_w - M_l) - alpha (beta D_l - sg(beta D_w)) )

    Variant 2 stops the gradient through D(y_w) (TDPO2, Ra-DPO_2, RSA Eq. 15); variant 1 lets
    it flow (TDPO1 at alpha = 1). With alpha = 0 this is DPO and the risks may be None.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) sum_t log pi_theta(y_t|s_t).
        ref_chosen_logps, ref_rejected_logps: (B,) the same under pi_ref.
        chosen_risk, rejected_risk: (B,) D(y_w), D(y_l), or None when alpha = 0.
        beta: temperature, > 0. alpha: weight of the risk term, >= 0. variant: 1 or 2.

    Returns:
        Per-example losses (B,) and detached per-example metrics (B,) named as PAPER.md logs
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """The preference loss of a concatenated [chosen; rejected] batch, from logits.

    The first half of the batch holds the chosen responses, the second half the rejected
    ones to the same prompts, in the same order (one forward per model for both).

    Args:
        policy_logits, ref_logits: (2B, T, V), aligned with labels.
        labels: (2B, T) token ids. loss_mask: (2B, T) bool, True at response positions.
        beta, alpha, variant: as preference_loss.
        measure, mu: the risk measure of D; measure may be None only when alpha = 0.
        chunk_size: positions per block (see sequence_terms).

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
    terms = sequence_terms(policy_logits, ref_logits, labels, loss_mask, measure=measure, mu=mu, chunk_size=chunk_size)
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
