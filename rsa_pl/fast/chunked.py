"""Optimisation: the per-sequence terms block by block, with a closed-form backward.

rsa_pl.losses.sequence_terms states M(y) and D(y) plainly: both models' full (N, T, V)
log-probabilities in float32, then the risk of every response position. At a real vocabulary
that is several float32 copies of the logits and their autograd graph. This module computes the
same sums over blocks of response positions: forward keeps only each position's two
log-normalisers and threshold (the CVaR boundary, found by rsa_pl.fast.cvar instead of a
sort); backward writes each block's gradient with respect to the policy's logits in closed form,

    grad_tok * (onehot(y) - pi_theta) + grad_risk * (pi_theta - w),   w = dPhi/dZ

(rsa_pl.risk's weights), or recomputes the block under autograd where no closed form applies.
tests/test_fast.py checks values and gradients equal to the plain path, ties included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rsa_pl.fast.cvar import FAST_THRESHOLDS, FAST_VALUES, FAST_WEIGHTS
from rsa_pl.risk import RISK_MEASURES, Drift, drift_from_logits, has_full_support

__all__ = ["chunked_sequence_terms"]

# Elements of one (positions x V) float32 block the chunked terms work on at a time (8 MiB):
# small enough to stay cache-friendly and memory-bounded, large enough to amortise overhead.
CHUNK_ELEMENTS = 1 << 21


def _threshold(measure: str, d: Drift, mu: float) -> Tensor | None:
    """The measure's threshold by its fast search where it has one, else its plain one."""
    search = FAST_THRESHOLDS.get(measure, RISK_MEASURES[measure].threshold)
    return search(d, mu) if search is not None else None


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
    if threshold is None:
        threshold = _threshold(measure, d, mu)
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
    threshold = _threshold(measure, d, mu)
    value = FAST_VALUES.get(measure, spec.fn)  # no autograd here: the value alone
    return policy_tok, ref_tok, value(d, mu, threshold), threshold, lse, full_support


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
        weights = FAST_WEIGHTS.get(measure, spec.weights)(d, mu, threshold)  # (P, V)
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


def chunked_sequence_terms(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    positions: Tensor,
    measure: str | None,
    mu: float,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over each sequence's response positions of log pi_theta(y_t), log pi_ref(y_t) and
    Phi_mu(Z_t) (zeros when measure is None), computed in blocks of chunk_size positions
    (default: as many as fit CHUNK_ELEMENTS logits). Inputs are trusted (rsa_pl.losses checks
    them). Shapes: (N, T, V), (N, T, V), (N, T), positions (P,) flat indices into N * T ->
    three (N,) tensors, in at least float32."""
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(policy_logits.shape[-1], 1))
    return _ChunkedTerms.apply(
        policy_logits.contiguous(), ref_logits.contiguous(), labels, positions, measure, float(mu), chunk_size
    )
