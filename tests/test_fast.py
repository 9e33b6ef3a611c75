"""rsa_pl.fast against the plain formulas: the sort-free CVaR boundary gives the sort's boundary
value, and the chunked terms with their closed-form backward give the plain sequence_terms'
values and gradients (through both models' logits), ties and a fully tied policy included."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rsa_pl.fast.cvar import FAST_THRESHOLDS, FAST_VALUES, FAST_WEIGHTS
from rsa_pl.losses import sequence_terms, sequence_terms_chunked
from rsa_pl.risk import RISK_MEASURES, Drift, drift, drift_from_logits
from tests.helpers import MU, make_batch, make_logps

MEASURES = list(RISK_MEASURES)


@pytest.mark.parametrize("measure", list(FAST_THRESHOLDS))
@pytest.mark.parametrize("kind", ["near", "far", "tied", "equal", "dense"])
@pytest.mark.parametrize("vocab", [7, 60, 3000, 32000])
def test_fast_boundary_is_the_sorts(measure: str, kind: str, vocab: int) -> None:
    """The same boundary value to the bit: CVaR's value and its tie set follow from it alone."""
    policy, ref = make_logps(4, vocab, kind, seed=vocab + 1)
    d = drift(policy, ref)
    for mu in (0.01, 0.05, 0.3, 0.9, 0.95, 0.99, 1.0):
        plain = RISK_MEASURES[measure].threshold(d, mu)
        fast = FAST_THRESHOLDS[measure](d, mu)
        assert fast.shape == plain.shape == (4, 1)
        torch.testing.assert_close(fast, plain, rtol=0, atol=0, msg=f"mu={mu}")


@pytest.mark.parametrize("measure", list(FAST_THRESHOLDS))
def test_fast_boundary_in_float32_and_leading_dimensions(measure: str) -> None:
    policy, ref = make_logps(24, 500, "tied", seed=3)
    d = drift(policy.float().view(2, 3, 4, 500), ref.float().view(2, 3, 4, 500))
    plain = RISK_MEASURES[measure].threshold(d, 0.9)
    torch.testing.assert_close(FAST_THRESHOLDS[measure](d, 0.9), plain, rtol=0, atol=0)
    assert plain.shape == (2, 3, 4, 1)


@pytest.mark.parametrize("measure", list(FAST_THRESHOLDS))
def test_fast_boundary_when_every_support_atom_ties_above_zero(measure: str) -> None:
    """The policy is the reference on its support plus mass off it: Z is one value v > 0 on the
    support (and 0 off it). Every row is tied, and the boundary is v, never an off-support atom."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=g, dtype=torch.float64)
    ref = logits.clone()
    ref[:, ::3] = -math.inf
    d = drift_from_logits(logits, ref, logits.logsumexp(-1), ref.logsumexp(-1))  # as training builds Z
    v = d.z[:, 1:2]
    assert (v > 0).all()
    assert torch.equal(torch.where(d.support, d.z, v), v.expand(4, 30))  # tied to the bit
    sign = -1.0 if measure.endswith("_lower") else 1.0
    for mu in (0.1, 0.5, 1.0):
        fast = FAST_THRESHOLDS[measure](d, mu)
        torch.testing.assert_close(RISK_MEASURES[measure].threshold(d, mu), sign * v, msg=f"mu={mu}")
        torch.testing.assert_close(fast, sign * v, rtol=0, atol=0, msg=f"mu={mu}")


@pytest.mark.parametrize("measure", list(FAST_THRESHOLDS))
def test_fast_boundary_with_more_tied_candidates_than_the_sort_cap(measure: str) -> None:
    """600 atoms share the boundary value exactly (dyadic logits: no rounding), more than the
    512 candidates sorted at once: the refinement levels meet a row whose candidates all tie
    (a zero bin width) and must still return that value."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randint(-40, 40, (3, 2000), generator=g).double() / 8
    policy = ref + torch.randint(8, 40, (3, 2000), generator=g).double() / 8  # Z <= -1 ...
    policy[:, :600] = ref[:, :600] - 0.5  # ... but 600 atoms at exactly 0.5 (before the normalisers)
    d = drift_from_logits(policy, ref, policy.logsumexp(-1), ref.logsumexp(-1))
    assert (d.z[:, :600] == d.z[:, :1]).all()
    for mu in (0.05, 0.2, 0.5):
        plain = RISK_MEASURES[measure].threshold(d, mu)
        torch.testing.assert_close(FAST_THRESHOLDS[measure](d, mu), plain, rtol=0, atol=0, msg=f"mu={mu}")
    if measure == "cvar":  # the tied group, the largest Z, holds the boundary of a thin upper tail
        torch.testing.assert_close(FAST_THRESHOLDS[measure](d, 0.05), d.z[:, :1], rtol=0, atol=0)


@pytest.mark.parametrize("measure", list(FAST_THRESHOLDS))
def test_the_chunked_terms_never_sort_for_either_cvar(measure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training's path (sequence_terms_chunked, forward and closed-form backward) takes the
    sort-free search, value and weights for both CVaRs: with the plain ones made to fail, it
    still runs. (A wrong key in the fast tables would silently fall back on the sort.)"""

    def plain(*args: object) -> None:
        raise AssertionError("the plain (sorting) form was called")

    failing = replace(RISK_MEASURES[measure], fn=plain, threshold=plain, weights=plain)
    monkeypatch.setitem(RISK_MEASURES, measure, failing)
    policy, ref, labels, mask = _batch("random")
    terms = sequence_terms_chunked(policy, ref, labels, mask, measure=measure, mu=MU[measure], chunk_size=5)
    terms.risk.sum().backward()
    assert torch.isfinite(policy.grad).all()


def test_fast_boundary_in_the_top_bins_of_the_histogram() -> None:
    """Atoms placed in the histogram's last three bins (lo = 0, hi = 4096: bin = floor(Z)), two to
    a bin: the mass above the boundary bin must count the bins above it exactly, for boundaries in
    bins 4094 and 4093 (the random tests' boundaries rarely land there)."""
    z = torch.zeros(1, 20, dtype=torch.float64)
    z[0, :5] = torch.tensor([4096.0, 4094.7, 4094.3, 4093.7, 4093.3], dtype=torch.float64)
    p = torch.full((1, 20), 0.5 / 15, dtype=torch.float64)
    p[0, :5] = 0.1
    d = Drift(z, p, None, p.log())
    for mu, boundary in ((0.15, 4094.7), (0.25, 4094.3), (0.35, 4093.7)):
        assert RISK_MEASURES["cvar"].threshold(d, mu).item() == boundary
        assert FAST_THRESHOLDS["cvar"](d, mu).item() == boundary, f"mu={mu}"


@pytest.mark.parametrize("measure", list(FAST_VALUES))
def test_fast_value_and_weights_keep_leading_dimensions(measure: str) -> None:
    policy, ref = make_logps(6, 50, "tied", seed=2)
    flat = drift(policy, ref)
    shaped = drift(policy.view(2, 3, 50), ref.view(2, 3, 50))
    threshold = FAST_THRESHOLDS[measure](flat, 0.3)
    value = FAST_VALUES[measure](shaped, 0.3, threshold.view(2, 3, 1))
    torch.testing.assert_close(value, FAST_VALUES[measure](flat, 0.3, threshold).view(2, 3), rtol=0, atol=0)
    weights = FAST_WEIGHTS[measure](shaped, 0.3, threshold.view(2, 3, 1))
    torch.testing.assert_close(weights, FAST_WEIGHTS[measure](flat, 0.3, threshold).view(2, 3, 50), rtol=0, atol=0)


def test_fast_boundary_when_rounding_misses_the_target_or_the_range_is_symmetric() -> None:
    """Two corners of the histogram search, against the sort: mu a hair under 1 in float32,
    where the cumulative mass can end below the target (the lowest support atom is then the
    boundary, never an off-support atom of its bin: here every support atom has Z > 0, as when
    the policy puts mass off the reference's support, so off-support atoms at 0 fall in the
    lowest bin), and a drift whose range is symmetric about 0 (lo = -hi)."""
    exact = {"rtol": 0, "atol": 0}
    g = torch.Generator().manual_seed(0)
    mu, missed = 0.99999994, 0
    for _ in range(80):
        ref = torch.randn(4, 82, generator=g) * 3
        policy = ref + 0.01 * torch.randn(4, 82, generator=g)
        ref[:, :27] = -math.inf
        policy[:, :27] = ref[:, 27:].amax(-1, keepdim=True)  # mass off the support: Z > 0 on it
        d = drift_from_logits(policy, ref, policy.logsumexp(-1), ref.logsumexp(-1))
        assert (d.z[:, 27:] > 0).all()
        order = torch.where(d.support, d.z, -math.inf).sort(-1, descending=True).indices
        missed += int((d.p.gather(-1, order).cumsum(-1)[:, -1] < mu * d.p.sum(-1)).sum())
        torch.testing.assert_close(FAST_THRESHOLDS["cvar"](d, mu), RISK_MEASURES["cvar"].threshold(d, mu), **exact)
    assert missed
    z = torch.tensor([[2.0, 1.5, -0.5, -2.0, 0.25, 1.0]], dtype=torch.float64)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.2, 0.1]], dtype=torch.float64)
    d = Drift(z, p, None, p.log())
    for mu in (0.1, 0.25, 0.5, 0.9):
        torch.testing.assert_close(FAST_THRESHOLDS["cvar"](d, mu), RISK_MEASURES["cvar"].threshold(d, mu), **exact)


def _batch(case: str, seed: int = 0):
    policy, ref, labels, mask = make_batch(v=40, t=9, seed=seed)
    if case == "ties":  # integer-valued logits: many atoms share a drift value
        policy = policy.detach().round().requires_grad_(True)
        ref = (ref * 2).round() / 2
    if case == "equal":  # policy == reference: every atom of every position ties
        ref = policy.detach().clone()
    if case == "off_support":
        ref = ref.clone()
        ref[..., ::4] = -math.inf
        labels = torch.where(mask & (labels % 4 == 0), labels + 1, labels)
    return policy, ref, labels, mask


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("case", ["random", "ties", "equal", "off_support"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_chunked_terms_equal_the_plain_ones(measure: str, case: str, chunk_size: int | None) -> None:
    """Values, the closed-form policy gradient (reference without gradient), and the recomputed
    gradient through both models (reference with gradient) all equal the plain path's."""
    policy, ref, labels, mask = _batch(case)
    mu = MU[measure]
    weights = torch.randn(3, policy.shape[0], dtype=torch.float64)  # an arbitrary upstream gradient

    def run(fn, ref_logits, **kw):
        x = policy.detach().clone().requires_grad_(True)
        out = fn(x, ref_logits, labels, mask, measure=measure, mu=mu, **kw)
        total = sum((w * t).sum() for w, t in zip(weights, (out.policy_logps, out.ref_logps, out.risk), strict=True))
        wrt = [x] + ([ref_logits] if ref_logits.requires_grad else [])
        return out, torch.autograd.grad(total, wrt)

    plain, plain_grads = run(sequence_terms, ref)
    fast, fast_grads = run(sequence_terms_chunked, ref, chunk_size=chunk_size)
    for name in ("policy_logps", "ref_logps", "risk"):
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(fast_grads[0], plain_grads[0], rtol=1e-10, atol=1e-12)

    ref_grad = ref.detach().clone().requires_grad_(True)
    _, plain_both = run(sequence_terms, ref_grad)
    _, fast_both = run(sequence_terms_chunked, ref_grad, chunk_size=chunk_size)
    for got, want in zip(fast_both, plain_both, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("measure", list(FAST_VALUES))
@pytest.mark.parametrize("kind", ["near", "far", "tied", "equal", "dense"])
@pytest.mark.parametrize("vocab", [7, 300, 32000])
def test_fast_value_and_weights_are_the_plain_ones(measure: str, kind: str, vocab: int) -> None:
    """At the same boundary: the value without autograd, and the compacted tie share."""
    policy, ref = make_logps(4, vocab, kind, seed=vocab + 2)
    d = drift(policy, ref)
    spec = RISK_MEASURES[measure]
    for mu in (0.01, 0.5, 0.95, 1.0):
        threshold = FAST_THRESHOLDS[measure](d, mu)
        torch.testing.assert_close(FAST_VALUES[measure](d, mu, threshold), spec.fn(d, mu, threshold), rtol=0, atol=0)
        torch.testing.assert_close(
            FAST_WEIGHTS[measure](d, mu, threshold), spec.weights(d, mu, threshold), rtol=1e-12, atol=1e-15
        )


def test_the_exp2_log_normaliser_is_torchs_logsumexp() -> None:
    """The chunked terms' log-sum-exp (exp2 form) equals torch.logsumexp to float noise, on wide
    rows of both signs and scales, and gives torch's answer on the edge rows: all -inf (-inf),
    a +inf entry (+inf), a NaN (NaN), one finite entry among -inf (that entry)."""
    from rsa_pl.fast.chunked import _logsumexp

    generator = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        scales = torch.tensor([[0.1], [1], [5], [30], [80], [300]], dtype=torch.float64)
        x = (torch.randn(6, 5000, generator=generator, dtype=torch.float64) * scales - 40).to(dtype)
        torch.testing.assert_close(_logsumexp(x), torch.logsumexp(x, -1), rtol=tol, atol=0)
    edge = torch.tensor([[-math.inf] * 3, [0.0, math.inf, 1.0], [0.0, math.nan, 1.0], [-math.inf, 2.5, -math.inf]])
    torch.testing.assert_close(_logsumexp(edge), torch.logsumexp(edge, -1), equal_nan=True, rtol=0, atol=0)
    x = torch.randn(3, 50, dtype=torch.float64, requires_grad=True)  # the gradient is the softmax
    (grad,) = torch.autograd.grad((_logsumexp(x) * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum(), x)
    want = torch.softmax(x.detach(), -1) * torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)


def test_blocks_are_runs_of_rows_cut_at_the_chunk_size() -> None:
    """Blocks never span a gap between response rows (each is a view of consecutive rows) and
    hold at most chunk_size rows; together they cover every position once, in order."""
    from rsa_pl.fast.chunked import _blocks

    positions = torch.tensor([2, 3, 4, 5, 6, 9, 10, 12, 13, 14])
    assert _blocks(positions, 3) == [(0, 2, 3), (3, 5, 2), (5, 9, 2), (7, 12, 3)]
    assert _blocks(positions, 100) == [(0, 2, 5), (5, 9, 2), (7, 12, 3)]
    assert _blocks(positions, 1) == [(i, int(row), 1) for i, row in enumerate(positions)]
    assert _blocks(positions[:0], 4) == []
