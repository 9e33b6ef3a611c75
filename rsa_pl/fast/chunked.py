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

The reference may come as its last hidden states with its head (ReferenceHead): its logits are
then computed for groups of rows when needed, in the forward and again in a risk's backward,
and never held whole. The backward may write the gradient over the policy's logits (consume),
saving the (N T, V) gradient buffer. tests/test_reference_head.py checks both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rsa_pl.fast.cvar import FAST_THRESHOLDS, FAST_VALUES, FAST_WEIGHTS
from rsa_pl.risk import RISK_MEASURES, Drift, drift_from_logits, has_full_support

__all__ = ["ReferenceHead", "chunked_sequence_terms"]

# Elements of one (positions x V) float32 block the chunked terms work on at a time (1 MiB):
# the block's dozen temporaries then stay in a 32 MiB L3 cache and in glibc's heap (larger ones
# are mmapped and page-faulted in anew each time). Measured (benchmarks/bench_loss.py, V 49k and
# 152k, 1 thread): 2**18 is 1.6-1.8x faster for rsa-cvar than 2**21, and no slower for dpo; a
# block never has fewer than one position, so at V > 2**18 it is one row. On a GPU every op of a
# block is a kernel launch of a few microseconds, and its memory bandwidth wants large blocks:
# 2**24 elements there (64 MiB in float32, ~100 rows of a 152k vocabulary).
CHUNK_ELEMENTS = 1 << 18
GPU_CHUNK_ELEMENTS = 1 << 24
# With a ReferenceHead, the reference's logits are computed for groups of rows of about this many
# elements (32 MiB in float32), then cut into blocks: the head's (V, H) weight is read once a
# group. One row at a time (a block at V = 152k) made it a matrix-vector product that read the
# 545 MB weight of Qwen2.5-0.5B for every position: the step took 3-6x as long.
HEAD_GROUP_ELEMENTS = 1 << 23


def _split(group: tuple[int, int, int], chunk_size: int) -> list[tuple[int, int, int]]:
    """A group of consecutive rows (as _blocks gives it) cut into blocks of at most chunk_size."""
    start, row, rows = group
    return [(start + k, row + k, min(chunk_size, rows - k)) for k in range(0, rows, chunk_size)]


_LOG2E = 1.4426950408889634


def _logsumexp(x: Tensor) -> Tensor:
    """torch.logsumexp over the last dim, with exp2: m + log(sum 2^((x - m) log2 e)), m the row's
    largest finite value (0 when none: a row of -inf gives -inf, one with +inf gives +inf, NaN
    stays NaN, as torch's). On a CPU torch's exp ran 4x slower than its exp2 (and than numpy's
    exp); the 2^(y log2 e) rounding adds |y| ulps to terms e^y, which matter only when small.
    Differentiable (gradient: the softmax). Both passes use it, so Z has the same bits in each.
    (P, V) -> (P,)."""
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return m.squeeze(-1) + torch.exp2((x - m).mul_(_LOG2E)).sum(-1).log()


class ReferenceHead(NamedTuple):
    """The reference's LM head, applied block by block to its last hidden states instead of
    holding its (N, T, V) logits: logits = F.linear(hidden, weight, bias), under the autocast
    state the reference's forward ran in (recorded here, so that the backward's recomputation
    gives the forward's bits). No gradient flows into it."""

    weight: Tensor  # (V, H)
    bias: Tensor | None  # (V,)
    autocast: bool
    autocast_dtype: torch.dtype

    def logits(self, hidden: Tensor) -> Tensor:
        """(P, H) -> (P, V)."""
        with torch.autocast(hidden.device.type, dtype=self.autocast_dtype, enabled=self.autocast):
            return F.linear(hidden, self.weight, self.bias)


def _blocks(positions: Tensor, chunk_size: int) -> list[tuple[int, int, int]]:
    """The blocks of positions, each a run of consecutive flat rows (so a block of the (N T, V)
    logits is a view, not a copy) of at most chunk_size: (index of its first position in
    positions, its first row, its rows). positions (P,) increasing."""
    rows = positions.tolist()
    blocks, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1 or i - start == chunk_size:
            blocks.append((start, rows[start], i - start))
            start = i
    return blocks


def _threshold(measure: str, d: Drift, mu: float, extremes: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
    """The measure's threshold by its fast search where it has one (given Z's row extremes when
    known), else its plain one."""
    if measure in FAST_THRESHOLDS:
        return FAST_THRESHOLDS[measure](d, mu, extremes)
    search = RISK_MEASURES[measure].threshold
    return search(d, mu) if search is not None else None


def _block_drift(
    x: Tensor, r: Tensor, lse: Tensor, measure: str, full_support: bool | None = None
) -> tuple[Drift, bool, tuple[Tensor, Tensor] | None]:
    """drift_from_logits of a block (x, r (P, V), their log-normalisers lse (2, P)), whether
    the reference has full support, and Z's row extremes (min, max) when the forward found
    them finite. Z is drift_from_logits' own, bit for bit, so the forward's CVaR boundary is
    found again among the backward's atoms.

    full_support None (the forward): Z's min and max tell it (a -inf reference logit makes its
    Z -inf or NaN), replacing a check of the reference for -inf and the CVaR search's own min
    and max passes; only a block where they are not finite checks the reference. With full
    support pi_ref is the reference's softmax (one pass; exp(r - lse) is two, and torch's exp
    alone took 1.6x a softmax on a CPU); the log-probabilities are formed only for a measure
    that reads them (erm)."""
    z = (r - x).add_((lse[0] - lse[1]).unsqueeze(-1))  # drift_from_logits' Z, bit for bit
    extremes = None
    if full_support is None:
        lo, hi = z.amin(-1), z.amax(-1)  # (torch.aminmax over the last dim ran 20x slower on a CPU)
        if bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all()):
            full_support, extremes = True, (lo, hi)
        else:
            full_support = has_full_support(r)
    if not full_support:
        return drift_from_logits(x, r, lse[0], lse[1], False), False, None
    # kl and the cvar family never read the log-probabilities (an empty stand-in); every measure
    # runs through here in tests/test_fast.py.
    ref_logps = r - lse[1].unsqueeze(-1) if measure not in FAST_VALUES and measure != "kl" else z[:0]
    return Drift(z, torch.softmax(r, dim=-1), None, ref_logps), True, extremes


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
    lse_x, lse_r = _logsumexp(x), _logsumexp(r)  # (P,)
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
    lse = torch.stack([_logsumexp(x), _logsumexp(r)])  # (2, P)
    index = labels.unsqueeze(-1)
    policy_tok = x.gather(-1, index).squeeze(-1) - lse[0]
    ref_tok = r.gather(-1, index).squeeze(-1) - lse[1]
    if measure is None:
        return policy_tok, ref_tok, policy_tok.new_zeros(policy_tok.shape), None, lse, None
    spec = RISK_MEASURES[measure]
    d, full_support, extremes = _block_drift(x, r, lse, measure)
    threshold = _threshold(measure, d, mu, extremes)
    value = FAST_VALUES.get(measure, spec.fn)  # no autograd here: the value alone
    return policy_tok, ref_tok, value(d, mu, threshold), threshold, lse, full_support


def _block_policy_grad(
    policy_logits: Tensor,
    ref_logits: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    measure: str | None,
    mu: float,
    threshold: Tensor | None,
    grad_tok: Tensor,
    grad_risk: Tensor | None,
    full_support: bool | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The gradient with respect to the policy's logits of a block, in closed form:

        grad_tok * (onehot(y) - pi_theta) + grad_risk * (pi_theta - w),   w = dPhi/dZ

    (d log pi_theta(y)/dx = onehot(y) - pi_theta; dZ_v/dx_u = pi_theta_u - [u = v], and each
    measure's w sums to 1). One pass for pi_theta, one for w: no autograd graph is rebuilt.
    Shapes: (P, V), (P, V), (P,), (2, P), ..., (P,), (P,) or None -> (P, V), written into out
    (P, V) when it has the computing dtype (the gradient buffer's rows: no copy). pi_theta is
    the policy's softmax (one pass, where exp(x - lse) is two)."""
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    x = policy_logits.to(dtype)
    probs = torch.softmax(x, dim=-1)  # (P, V) pi_theta
    target = out if out is not None and out.dtype == dtype else None
    if measure is None or grad_risk is None:
        grad = torch.mul(probs, -grad_tok.unsqueeze(-1), out=target)
    else:
        spec = RISK_MEASURES[measure]
        assert spec.weights is not None
        assert ref_logits is not None
        d, _, _ = _block_drift(x, ref_logits.to(dtype), lse, measure, full_support)
        weights = FAST_WEIGHTS.get(measure, spec.weights)(d, mu, threshold)  # (P, V)
        grad = torch.mul(probs, (grad_risk - grad_tok).unsqueeze(-1), out=target)
        grad.addcmul_(weights, grad_risk.unsqueeze(-1), value=-1.0)
    return grad.scatter_add_(-1, labels.unsqueeze(-1), grad_tok.unsqueeze(-1).to(grad.dtype))


def _zero_between(buffer: Tensor, blocks: list[tuple[int, int, int]]) -> Tensor:
    """buffer (N T, V) with zeros in every row outside the blocks (the rows no block writes)."""
    end = 0
    for _, row, rows in blocks:
        if row > end:
            buffer[end:row] = 0
        end = row + rows
    buffer[end:] = 0
    return buffer


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
        ref_head: ReferenceHead | None,
        consume: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, t, v = policy_logits.shape
        policy_flat, ref_flat = policy_logits.reshape(n * t, v), ref_logits.reshape(n * t, ref_logits.shape[-1])
        labels_flat = labels.reshape(n * t)
        dtype = torch.promote_types(policy_logits.dtype, torch.float32)
        per_position = torch.zeros(3, positions.numel(), dtype=dtype, device=policy_logits.device)
        normalisers = torch.zeros(2, positions.numel(), dtype=dtype, device=policy_logits.device)
        thresholds, ctx.full_support = [], []
        group_rows = chunk_size if ref_head is None else max(chunk_size, HEAD_GROUP_ELEMENTS // max(v, 1))
        ctx.groups, ctx.chunk_size = _blocks(positions, group_rows), chunk_size
        for group in ctx.groups:
            _, first, count = group
            ref_group = ref_flat[first : first + count]
            if ref_head is not None:
                ref_group = ref_head.logits(ref_group)
            for start, row, rows in _split(group, chunk_size):
                rows_at = slice(row, row + rows)
                *terms, threshold, lse, full_support = _block_forward(
                    policy_flat[rows_at], ref_group[row - first : row - first + rows], labels_flat[rows_at], measure, mu
                )
                per_position[:, start : start + rows] = torch.stack(terms)
                normalisers[:, start : start + rows] = lse
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
        ctx.measure, ctx.mu, ctx.ref_head, ctx.consume = measure, mu, ref_head, consume
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
        policy_flat, ref_flat = policy_logits.reshape(n * t, v), ref_logits.reshape(n * t, ref_logits.shape[-1])
        labels_flat = labels.reshape(n * t)
        sequence = positions // t
        upstream = [g[sequence] if g is not None else None for g in grads]  # each (P,)
        closed_form = not need_ref and (measure is None or RISK_MEASURES[measure].weights is not None)
        # Every response row is written below; only the rows between blocks need zeros (filling
        # the whole buffer first would be one more pass over (N T, V)). consume: the gradient
        # overwrites the policy's logits, block by block after reading them (one (N T, V) buffer
        # less at the step's peak); autograd's version counter then refuses a second backward.
        consume = ctx.consume and closed_form and need_policy
        buffer = policy_flat if consume else torch.empty_like(policy_flat)
        grad_policy = _zero_between(buffer, ctx.groups) if need_policy else None
        grad_ref = _zero_between(torch.empty_like(ref_flat), ctx.groups) if need_ref else None
        # The reference's logits are read by a risk's closed form and by the autograd recomputation.
        reads_ref = not closed_form or (measure is not None and upstream[2] is not None)
        index = 0  # the block's number, in the forward's order
        for group in ctx.groups:
            _, first, count = group
            ref_group = ref_flat[first : first + count]
            if ctx.ref_head is not None and reads_ref:
                ref_group = ctx.ref_head.logits(ref_group)
            for start, row, rows in _split(group, ctx.chunk_size):
                stop, rows_at = start + rows, slice(row, row + rows)
                ref_block = ref_group[row - first : row - first + rows]
                threshold = thresholds[start:stop] if ctx.has_thresholds and measure else None
                full_support, index = ctx.full_support[index], index + 1
                if closed_form:
                    if need_policy:
                        grad_tok = upstream[0][start:stop] if upstream[0] is not None else None
                        grad_risk = upstream[2][start:stop] if upstream[2] is not None and measure else None
                        if grad_tok is None:
                            grad_tok = normalisers.new_zeros(rows)
                        out = grad_policy[rows_at]
                        block_grad = _block_policy_grad(
                            policy_flat[rows_at],
                            ref_block,
                            labels_flat[rows_at],
                            normalisers[:, start:stop],
                            measure,
                            ctx.mu,
                            threshold,
                            grad_tok,
                            grad_risk,
                            full_support,
                            out=out,
                        )
                        if block_grad.data_ptr() != out.data_ptr():
                            out.copy_(block_grad)
                    continue
                with torch.enable_grad():
                    policy_block = policy_flat[rows_at].detach().requires_grad_(need_policy)
                    ref_block = ref_block.detach().requires_grad_(need_ref)
                    *terms, _ = _chunk_terms(policy_block, ref_block, labels_flat[rows_at], measure, ctx.mu, threshold)
                    total = sum(
                        (term * g[start:stop]).sum() for term, g in zip(terms, upstream, strict=True) if g is not None
                    )
                    wrt = [x for x in (policy_block, ref_block) if x.requires_grad]
                    if not torch.is_tensor(total) or not total.requires_grad:  # nothing flows: zeros
                        for zeros in (grad_policy, grad_ref):
                            if zeros is not None:
                                zeros[rows_at] = 0
                        continue
                    block_grads = iter(torch.autograd.grad(total, wrt))
                if need_policy:
                    grad_policy[rows_at] = next(block_grads)
                if need_ref:
                    grad_ref[rows_at] = next(block_grads)
        return (
            grad_policy.view(n, t, v) if need_policy else None,
            grad_ref.view(ref_logits.shape) if need_ref else None,
            *([None] * 7),
        )


def chunked_sequence_terms(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    positions: Tensor,
    measure: str | None,
    mu: float,
    chunk_size: int | None = None,
    ref_head: ReferenceHead | None = None,
    consume: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over each sequence's response positions of log pi_theta(y_t), log pi_ref(y_t) and
    Phi_mu(Z_t) (zeros when measure is None), computed in blocks of chunk_size positions
    (default: as many as fit CHUNK_ELEMENTS logits on a CPU, GPU_CHUNK_ELEMENTS elsewhere).
    Inputs are trusted (rsa_pl.losses checks them). Shapes: (N, T, V), (N, T, V), (N, T),
    positions (P,) flat indices into N * T -> three (N,) tensors, in at least float32.

    ref_head: ref_logits are then the reference's last hidden states (N, T, H), and each block's
    reference logits are computed from them (again in the backward, for a risk's gradient):
    no (N, T, V) reference logits are held. consume: the backward writes the gradient into
    policy_logits' own memory (the caller must not read them afterwards)."""
    if chunk_size is None:
        elements = CHUNK_ELEMENTS if policy_logits.device.type == "cpu" else GPU_CHUNK_ELEMENTS
        chunk_size = max(1, elements // max(policy_logits.shape[-1], 1))
    return _ChunkedTerms.apply(
        policy_logits.contiguous(),
        ref_logits.contiguous(),
        labels,
        positions,
        measure,
        float(mu),
        chunk_size,
        ref_head,
        consume,
    )
