"""rsa_pl.risk against independent float64 references, its limits and its bad input."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rsa_pl.risk import RISK_MEASURES, cvar_boundary, cvar_risk, drift, drift_from_logits, lowest_atom, token_risk
from tests import reference
from tests.helpers import make_logps

MEASURES = list(RISK_MEASURES)


BRUTE_FORCE = {
    "kl": lambda pol, ref, mu: reference.kl(pol, ref),
    "cvar": reference.cvar,
    "erm": reference.erm,
    "cvar_radpo": reference.cvar_radpo,
    "cvar_lower": reference.cvar_lower,
    "erm_lower": reference.erm_lower,
}
MUS = {
    "kl": [1.0],
    "cvar": [0.01, 0.3, 0.9, 0.95, 0.99, 1.0],
    "erm": [0.1, 1.0, 5.0, 9.0],
    "cvar_radpo": [0.5, 0.95],
    "cvar_lower": [0.01, 0.3, 0.9, 0.99, 1.0],
    "erm_lower": [1e-3, 0.1, 0.5, 1.0],
}
TAIL_GRAD = {"cvar": reference.cvar_grad_z, "cvar_lower": reference.cvar_lower_grad_z}


@pytest.mark.parametrize("kind", ["near", "far", "tied", "equal", "dense"])
@pytest.mark.parametrize("vocab", [7, 60, 3000])
@pytest.mark.parametrize("measure", MEASURES)
def test_matches_brute_force_float64(measure: str, vocab: int, kind: str) -> None:
    policy, ref = make_logps(6, vocab, kind, seed=vocab)
    for mu in MUS[measure]:
        got = token_risk(policy, ref, measure, mu)
        want = [BRUTE_FORCE[measure](policy[r].numpy(), ref[r].numpy(), mu) for r in range(policy.shape[0])]
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6, err_msg=f"{measure} mu={mu}")


@pytest.mark.parametrize("measure", ["cvar", "cvar_lower"])
@pytest.mark.parametrize("kind", ["dense", "tied"])
def test_cvar_matches_brute_force_at_a_32k_vocabulary(kind: str, measure: str) -> None:
    policy, ref = make_logps(3, 32000, kind, seed=5)
    for mu in (0.05, 0.5, 0.95, 0.99):
        got = token_risk(policy, ref, measure, mu)
        want = [BRUTE_FORCE[measure](policy[r].numpy(), ref[r].numpy(), mu) for r in range(3)]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6, err_msg=f"mu={mu}")


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("kind", ["near", "far", "tied"])
def test_values_and_gradients_are_finite(measure: str, kind: str) -> None:
    policy, ref = make_logps(8, 500, kind)
    policy.requires_grad_(True)
    ref.requires_grad_(True)
    for mu in MUS[measure]:
        risk = token_risk(policy, ref, measure, mu)
        grad_policy, grad_ref = torch.autograd.grad(risk.sum(), (policy, ref))
        assert torch.isfinite(risk).all()
        assert torch.isfinite(grad_policy).all()
        assert torch.isfinite(grad_ref).all()
        # Zero-probability entries carry no mass: no gradient reaches the policy there.
        assert (grad_policy[ref.detach() == -math.inf] == 0).all()


@pytest.mark.parametrize("measure", ["cvar", "cvar_lower"])
@pytest.mark.parametrize("vocab", [9, 3000])
@pytest.mark.parametrize("kind", ["near", "far", "dense", "tied", "equal"])
def test_cvar_gradient_equals_the_symmetric_subgradient(vocab: int, kind: str, measure: str) -> None:
    """Autograd through the plain formula and the closed-form weights both give the reference's
    symmetric subgradient, ties (also a fully tied row) included."""
    policy, ref = make_logps(5, vocab, kind, seed=1)
    policy.requires_grad_(True)
    spec = RISK_MEASURES[measure]
    for mu in [0.05, 0.5, 0.95, 1.0]:
        (grad,) = torch.autograd.grad(token_risk(policy, ref, measure, mu).sum(), policy)
        weights = spec.weights(drift(policy.detach(), ref), mu, None)
        for r in range(5):
            want = TAIL_GRAD[measure](policy[r].detach().numpy(), ref[r].numpy(), mu)
            # Z = ref - policy, so d/d policy = -d/dZ.
            np.testing.assert_allclose(grad[r].numpy(), -want, atol=1e-9, err_msg=f"mu={mu}")
            np.testing.assert_allclose(weights[r].numpy(), want, atol=1e-9, err_msg=f"mu={mu}")


@given(
    values=st.lists(st.integers(-3, 3), min_size=1, max_size=40),
    weights=st.lists(st.floats(0.0, 1.0), min_size=40, max_size=40),
    mu=st.floats(1e-3, 1.0),
)
@settings(max_examples=200, deadline=None)
def test_cvar_on_discrete_distributions_with_ties(values: list[int], weights: list[float], mu: float) -> None:
    """Drift with few distinct values and arbitrary (also zero) reference masses."""
    vocab = len(values)
    mass = torch.tensor(weights[:vocab], dtype=torch.float64)
    if float(mass.sum()) == 0.0:
        mass[0] = 1.0
    ref = torch.log(mass / mass.sum())  # exact zeros become -inf
    policy = ref - torch.tensor(values, dtype=torch.float64)  # Z = values on the support
    policy = torch.log_softmax(torch.where(ref > -math.inf, policy, 0.0), -1)
    ref = torch.log_softmax(ref, -1)
    for measure in ("cvar", "cvar_lower"):
        got = float(token_risk(policy, ref, measure, mu))
        assert got == pytest.approx(BRUTE_FORCE[measure](policy.numpy(), ref.numpy(), mu), rel=1e-9, abs=1e-9)


@given(
    values=st.lists(st.integers(-2, 2), min_size=1, max_size=30),
    weights=st.lists(st.floats(0.0, 1.0), min_size=30, max_size=30),
    mu=st.floats(1e-3, 1.0),
    measure=st.sampled_from(["cvar", "cvar_lower"]),
)
@settings(max_examples=300, deadline=None)
def test_cvar_gradient_is_a_valid_subgradient_at_ties(
    values: list[int], weights: list[float], mu: float, measure: str
) -> None:
    """With forced ties, the weights (closed form and autograd) satisfy 0 <= w <= p / mu and
    sum w = 1, and equal the symmetric subgradient of the reference."""
    vocab = len(values)
    mass = torch.tensor(weights[:vocab], dtype=torch.float64)
    if float(mass.sum()) == 0.0:
        mass[0] = 1.0
    ref = torch.log_softmax(torch.log(mass / mass.sum()), -1)
    z = torch.tensor(values, dtype=torch.float64) / 4
    policy = torch.log_softmax(torch.where(ref > -math.inf, ref - z, 0.0), -1).requires_grad_(True)
    d = drift(policy.detach(), ref)
    p = d.p
    closed = RISK_MEASURES[measure].weights(d, mu, None)
    (by_autograd,) = torch.autograd.grad(token_risk(policy, ref, measure, mu), policy)
    for w in (closed, -by_autograd):
        assert (w >= -1e-12).all()
        assert (w <= p / mu + 1e-12).all()
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-9)
        want = TAIL_GRAD[measure](policy.detach().numpy(), ref.numpy(), mu)
        np.testing.assert_allclose(w.numpy(), want, atol=1e-9)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("vocab", [5, 300])
def test_at_policy_equal_reference_every_gradient_is_kls(measure: str, vocab: int) -> None:
    """A fresh LoRA adapter leaves the policy equal to its reference: Z ties everywhere. There
    every measure's gradient with respect to the policy's logits equals KL's (zero), and with
    respect to the log-probabilities it is -pi_ref, KL's, for every measure whose weights are a
    distribution (cvar_radpo's tie is strict, so it has none there: gradient 0)."""
    ref_logits = torch.randn(6, vocab, dtype=torch.float64) * 3
    ref = torch.log_softmax(ref_logits, -1)
    policy_logits = ref_logits.clone().requires_grad_(True)  # the same logits: Z is exactly 0

    def by_logits(name: str, mu: float) -> torch.Tensor:
        risk = token_risk(torch.log_softmax(policy_logits, -1), ref, name, mu)
        return torch.autograd.grad(risk.sum(), policy_logits)[0]

    kl_by_logits = by_logits("kl", 1.0)
    for mu in MUS[measure]:
        logps = torch.log_softmax(ref_logits, -1).requires_grad_(True)
        (by_logps,) = torch.autograd.grad(token_risk(logps, ref, measure, mu).sum(), logps)
        want = torch.zeros_like(ref) if measure == "cvar_radpo" else -ref.exp()
        torch.testing.assert_close(by_logps, want, rtol=0, atol=1e-15)
        torch.testing.assert_close(by_logits(measure, mu), kl_by_logits, rtol=0, atol=1e-15)


def test_float32_inputs_match_float64() -> None:
    policy, ref = make_logps(16, 4000, "near")
    for measure in MEASURES:
        for mu in MUS[measure]:
            want = token_risk(policy, ref, measure, mu)
            got = token_risk(policy.float(), ref.float(), measure, mu)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_cvar_with_full_tail_is_kl() -> None:
    policy, ref = make_logps(10, 3000, "far")
    torch.testing.assert_close(
        token_risk(policy, ref, "cvar", 1.0), token_risk(policy, ref, "kl", 1.0), rtol=1e-9, atol=1e-9
    )


def test_lower_cvar_with_full_tail_is_kl() -> None:
    policy, ref = make_logps(10, 3000, "far")
    torch.testing.assert_close(
        token_risk(policy, ref, "cvar_lower", 1.0), token_risk(policy, ref, "kl", 1.0), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("measure", ["erm", "erm_lower"])
def test_erm_approaches_kl_as_mu_vanishes(measure: str) -> None:
    policy, ref = make_logps(10, 3000, "near")
    kl = token_risk(policy, ref, "kl", 1.0)
    gaps = [float((token_risk(policy, ref, measure, mu) - kl).abs().max()) for mu in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-6 * float(kl.abs().max() + 1)
    # float32 keeps this limit too (the expm1/log1p form): no 1/mu blow-up of rounding error.
    kl32 = token_risk(policy.float(), ref.float(), "kl", 1.0)
    erm32 = token_risk(policy.float(), ref.float(), measure, 1e-6)
    torch.testing.assert_close(erm32, kl32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["near", "far", "tied"])
def test_risk_is_at_least_kl_and_monotone_in_mu(kind: str) -> None:
    policy, ref = make_logps(12, 800, kind)
    kl = token_risk(policy, ref, "kl", 1.0)
    tol = 1e-9
    cvars = [token_risk(policy, ref, "cvar", mu) for mu in (1.0, 0.99, 0.9, 0.5, 0.1, 0.01)]
    erms = [token_risk(policy, ref, "erm", mu) for mu in (1e-3, 0.5, 1.0, 5.0, 9.0)]
    for risk in cvars + erms:
        assert (risk >= kl - tol).all()
    for smaller_risk, larger_risk in pairwise(cvars):
        assert (larger_risk >= smaller_risk - tol).all()  # smaller tail mass: more risk-averse
    for smaller_risk, larger_risk in pairwise(erms):
        assert (larger_risk >= smaller_risk - tol).all()  # larger mu: more risk-averse
    assert (cvars[-1] > kl + 1e-3).any() if kind != "equal" else True


@pytest.mark.parametrize("kind", ["near", "far", "tied"])
def test_lower_tail_risk_is_at_most_kl_and_monotone_in_mu(kind: str) -> None:
    """The paper's readings: cvar_lower <= KL (and below zero for a small tail), erm_lower in
    [0, KL] for mu in (0, 1]; both fall as they grow more averse."""
    policy, ref = make_logps(12, 800, kind)
    kl = token_risk(policy, ref, "kl", 1.0)
    tol = 1e-9
    cvars = [token_risk(policy, ref, "cvar_lower", mu) for mu in (1.0, 0.99, 0.9, 0.5, 0.1, 0.01)]
    erms = [token_risk(policy, ref, "erm_lower", mu) for mu in (1e-3, 0.25, 0.5, 0.75, 1.0)]
    for risk in cvars + erms:
        assert (risk <= kl + tol).all()
    for risk in erms:
        assert (risk >= -tol).all()
    for larger_risk, smaller_risk in pairwise(cvars):
        assert (smaller_risk <= larger_risk + tol).all()
    for larger_risk, smaller_risk in pairwise(erms):
        assert (smaller_risk <= larger_risk + tol).all()
    assert (cvars[-1] < 0).any()  # the lowest 1% of the drift is negative: it rewards drift


def test_lower_readings_are_the_upper_ones_of_the_negated_drift() -> None:
    """cvar_lower(Z) = -cvar(-Z) and erm_lower(Z) = -erm(-Z), checked on the atoms directly."""
    policy, ref = make_logps(4, 200, "far")
    for r in range(4):
        pol, rf = policy[r].numpy(), ref[r].numpy()
        swapped = np.where(rf > -np.inf, 2 * rf - np.where(rf > -np.inf, pol, 0), -np.inf)  # Z' = -Z
        assert reference.cvar_lower(pol, rf, 0.3) == pytest.approx(-reference.cvar(swapped, rf, 0.3), abs=1e-12)
        assert reference.erm_lower(pol, rf, 0.7) == pytest.approx(-reference.erm(swapped, rf, 0.7), abs=1e-12)


@pytest.mark.parametrize("measure", MEASURES)
def test_identical_policy_has_zero_risk(measure: str) -> None:
    policy, ref = make_logps(4, 300, "equal")
    mu = MUS[measure][-1]
    torch.testing.assert_close(token_risk(policy, ref, measure, mu), torch.zeros(4, dtype=torch.float64))


def test_leading_dimensions_are_kept() -> None:
    policy, ref = make_logps(24, 50, "near")
    for measure in MEASURES:
        flat = token_risk(policy, ref, measure, 0.9)
        shaped = token_risk(policy.view(2, 3, 4, 50), ref.view(2, 3, 4, 50), measure, 0.9)
        assert shaped.shape == (2, 3, 4)
        torch.testing.assert_close(shaped.reshape(-1), flat)


def test_logits_with_leading_dimensions_give_each_rows_risk_and_weights() -> None:
    """drift_from_logits and every measure's value and closed-form weights keep (..., V): logits
    of shape (N, T, V) give what their flattened rows give, and the drift of log_softmax."""
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(2, 3, 40, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    shaped = drift_from_logits(x, r, x.logsumexp(-1), r.logsumexp(-1))
    rows = drift_from_logits(x.view(6, 40), r.view(6, 40), x.view(6, 40).logsumexp(-1), r.view(6, 40).logsumexp(-1))
    plain = drift(torch.log_softmax(x, -1), torch.log_softmax(r, -1))
    torch.testing.assert_close(shaped.z, plain.z)
    torch.testing.assert_close(shaped.p, plain.p)
    for name, spec in RISK_MEASURES.items():
        mu = MUS[name][1 if len(MUS[name]) > 1 else 0]
        torch.testing.assert_close(spec.fn(shaped, mu, None), spec.fn(rows, mu, None).view(2, 3), msg=name)
        if spec.weights is not None:
            weights = spec.weights(shaped, mu, None)
            torch.testing.assert_close(weights, spec.weights(rows, mu, None).view(2, 3, 40), msg=name)
            torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, dtype=torch.float64), msg=name)


@pytest.mark.parametrize("from_logits", [False, True])
def test_off_the_reference_support_the_drift_is_zero_with_no_mass(from_logits: bool) -> None:
    """docs/method.md: outside the reference support z = 0 and p = 0 (so every p f(z) term
    vanishes with a finite gradient), and the support mask says where that is."""
    policy, ref = make_logps(4, 60, "near")
    off = torch.isneginf(ref)
    assert off.any()
    d = drift_from_logits(policy, ref, policy.logsumexp(-1), ref.logsumexp(-1)) if from_logits else drift(policy, ref)
    assert d.support is not None
    assert torch.equal(d.support, ~off)
    assert (d.z[off] == 0).all()
    assert (d.p[off] == 0).all()
    assert torch.isfinite(d.z).all()


def test_a_cvar_target_that_rounding_puts_out_of_reach_takes_the_lowest_support_atom() -> None:
    """With mu a hair under 1 in float32 the sorted cumulative pi_ref mass can end below
    mu * sum(pi_ref): the boundary is then the lowest atom of the support, never an atom off it
    (-inf) nor the top one, and the CVaR stays the float64 reference's."""
    g = torch.Generator().manual_seed(0)
    mu, hits = 0.99999994, 0
    for _ in range(60):
        ref = torch.randn(4, 82, generator=g) * 3
        ref[:, :27] = -math.inf
        policy, ref = torch.log_softmax(torch.randn(4, 82, generator=g), -1), torch.log_softmax(ref, -1)
        d = drift(policy, ref)
        z = torch.where(d.support, d.z, -math.inf)
        order = z.sort(-1, descending=True).indices
        missed = d.p.gather(-1, order).cumsum(-1)[:, -1] < mu * d.p.sum(-1)
        if not missed.any():
            continue
        hits += 1
        torch.testing.assert_close(cvar_boundary(d, mu)[missed], lowest_atom(d)[missed], rtol=0, atol=0)
        want = [reference.cvar(policy[i].double().numpy(), ref[i].double().numpy(), mu) for i in range(4)]
        np.testing.assert_allclose(cvar_risk(d, mu).double().numpy(), want, rtol=1e-4, atol=1e-5)
    assert hits, "no row where the cumulative mass misses the target: the case is not exercised"


@pytest.mark.parametrize(
    ("measure", "mu", "match"),
    [
        (
            "cvar_typo",
            0.9,
            r"measure: unknown measure 'cvar_typo'; allowed: kl, cvar, erm, cvar_radpo, cvar_lower, erm_lower",
        ),
        ("cvar", 0.0, r"mu: must be in \(0, 1\] for cvar, got 0.0"),
        ("cvar", 1.5, r"mu: must be in \(0, 1\] for cvar"),
        ("cvar_radpo", -0.1, r"mu: must be in \(0, 1\] for cvar_radpo"),
        ("erm", 0.0, r"mu: must be in \(0, inf\) for erm"),
        ("erm", math.inf, r"mu: must be in \(0, inf\) for erm"),
        ("erm", math.nan, r"mu: must be in \(0, inf\) for erm"),
        ("cvar_lower", 0.0, r"mu: must be in \(0, 1\] for cvar_lower"),
        ("erm_lower", 1.5, r"mu: must be in \(0, 1\] for erm_lower, got 1.5"),
    ],
)
def test_bad_measure_or_mu_is_named(measure: str, mu: float, match: str) -> None:
    policy, ref = make_logps(2, 5, "near")
    with pytest.raises(ValueError, match=match):
        token_risk(policy, ref, measure, mu)


def test_mismatched_shapes_are_named() -> None:
    policy, ref = make_logps(2, 5, "near")
    with pytest.raises(ValueError, match=r"policy_logps and ref_logps: must have the same shape"):
        token_risk(policy, ref[:, :4], "kl", 1.0)
