"""rsa_pl.losses: equivalences with DPO and TDPO written here, gradients, masking, chunking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rsa_pl.losses import preference_loss, preference_loss_from_logits, sequence_terms, sequence_terms_chunked
from rsa_pl.risk import RISK_MEASURES
from tests import loss_reference
from tests.helpers import MU, PAIRS, V, make_batch

MEASURES = list(RISK_MEASURES)
CLOSED_FORM = [name for name, spec in RISK_MEASURES.items() if spec.weights is not None]


def by_hand_terms(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Sequence log-probs and sequential KL(pi_ref || pi_theta), the plain unchunked way."""
    policy_lp, ref_lp = F.log_softmax(policy.double(), -1), F.log_softmax(ref.double(), -1)
    safe = labels.clamp(min=0).unsqueeze(-1)
    policy_tok = policy_lp.gather(-1, safe).squeeze(-1)
    ref_tok = ref_lp.gather(-1, safe).squeeze(-1)
    kl = (ref_lp.exp() * (ref_lp - policy_lp)).sum(-1)
    return (policy_tok * mask).sum(-1), (ref_tok * mask).sum(-1), (kl * mask).sum(-1)


def loss_of(policy, ref, labels, mask, **objective):
    objective = {"beta": 0.1, "alpha": 0.5, "variant": 2, "measure": "cvar", "mu": 0.9} | objective
    return preference_loss_from_logits(policy, ref, labels, mask, **objective)


def test_alpha_zero_is_dpo() -> None:
    policy, ref, labels, mask = make_batch()
    beta = 0.3
    losses, metrics = loss_of(policy, ref, labels, mask, beta=beta, alpha=0.0, measure=None)
    policy_lp, ref_lp, _ = by_hand_terms(policy, ref, labels, mask)
    pc, pr = policy_lp.chunk(2)
    rc, rr = ref_lp.chunk(2)
    want = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(losses, want)
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    (want_grad,) = torch.autograd.grad(want.sum(), policy)
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(metrics["rewards/chosen"], beta * (pc - rc).detach())
    torch.testing.assert_close(metrics["logps/rejected"], pr.detach())
    assert "risk/chosen" not in metrics


def test_alpha_zero_with_a_measure_logs_the_risk_without_optimising_it() -> None:
    policy, ref, labels, mask = make_batch()
    with_risk, metrics = loss_of(policy, ref, labels, mask, alpha=0.0, measure="cvar")
    without, _ = loss_of(policy, ref, labels, mask, alpha=0.0, measure=None)
    torch.testing.assert_close(with_risk, without)
    assert metrics["risk/chosen"].shape == (PAIRS,)
    assert (metrics["risk/chosen"] > 0).all()


@pytest.mark.parametrize("measure", MEASURES)
def test_reference_from_inference_mode_works(measure: str) -> None:
    """The reference forward may run under torch.inference_mode() (no autograd bookkeeping)."""
    policy, ref, labels, mask = make_batch()
    with torch.inference_mode():
        ref_inference = ref.clone()
    losses, _ = loss_of(policy, ref_inference, labels, mask, measure=measure, mu=MU[measure])
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    want_losses, _ = loss_of(policy, ref, labels, mask, measure=measure, mu=MU[measure])
    (want_grad,) = torch.autograd.grad(want_losses.sum(), policy)
    torch.testing.assert_close(losses, want_losses)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_kl_variant_2_is_tdpo2(alpha: float) -> None:
    policy, ref, labels, mask = make_batch()
    beta = 0.2
    losses, metrics = loss_of(policy, ref, labels, mask, beta=beta, alpha=alpha, variant=2, measure="kl")
    policy_lp, ref_lp, kl = by_hand_terms(policy, ref, labels, mask)
    pc, pr = policy_lp.chunk(2)
    rc, rr = ref_lp.chunk(2)
    kl_w, kl_l = kl.chunk(2)
    want = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)) - alpha * (beta * kl_l - beta * kl_w.detach()))
    torch.testing.assert_close(losses, want)
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    (want_grad,) = torch.autograd.grad(want.sum(), policy)
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(metrics["risk/chosen"], kl_w.detach())
    torch.testing.assert_close(metrics["risk/rejected"], kl_l.detach())


def test_kl_variant_1_at_alpha_one_is_tdpo1() -> None:
    policy, ref, labels, mask = make_batch()
    beta = 0.2
    losses, _ = loss_of(policy, ref, labels, mask, beta=beta, alpha=1.0, variant=1, measure="kl")
    policy_lp, ref_lp, kl = by_hand_terms(policy, ref, labels, mask)
    pc, pr = policy_lp.chunk(2)
    rc, rr = ref_lp.chunk(2)
    kl_w, kl_l = kl.chunk(2)
    want = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)) - (beta * kl_l - beta * kl_w))
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    (want_grad,) = torch.autograd.grad(want.sum(), policy)
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("measure", MEASURES)
def test_variant_1_differs_from_variant_2_exactly_by_the_stop_gradient(measure: str) -> None:
    policy, ref, labels, mask = make_batch()
    beta, alpha = 0.2, 0.7
    common = {"beta": beta, "alpha": alpha, "measure": measure, "mu": MU[measure]}
    loss_1, _ = loss_of(policy, ref, labels, mask, variant=1, **common)
    loss_2, _ = loss_of(policy, ref, labels, mask, variant=2, **common)
    torch.testing.assert_close(loss_1, loss_2)  # same value
    (grad_1,) = torch.autograd.grad(loss_1.sum(), policy)
    (grad_2,) = torch.autograd.grad(loss_2.sum(), policy)
    # L = -log sigmoid(u), u = ... + alpha * beta * D(y_w): variant 1 adds (sigmoid(u) - 1) alpha beta dD_w,
    # u and D(y_w) from the independent reference (tests/loss_reference.py), not the code under test.
    want = loss_reference.pair_losses(policy, ref, labels, mask, variant=2, **common)
    chosen_risk = want.risk.chunk(2)[0]
    coeff = (torch.sigmoid(want.logits.detach()) - 1) * alpha * beta
    (extra,) = torch.autograd.grad((coeff * chosen_risk).sum(), policy)
    torch.testing.assert_close(grad_1 - grad_2, extra)
    assert extra.abs().max() > 1e-6


@pytest.mark.parametrize("variant", [1, 2])
def test_stop_gradient_placement(variant: int) -> None:
    b = 4
    logps = [torch.randn(b, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    chosen_risk = torch.rand(b, dtype=torch.float64, requires_grad=True)
    rejected_risk = torch.rand(b, dtype=torch.float64, requires_grad=True)
    losses, _ = preference_loss(*logps, chosen_risk, rejected_risk, beta=0.1, alpha=0.5, variant=variant)
    grad_chosen, grad_rejected = torch.autograd.grad(losses.sum(), (chosen_risk, rejected_risk), allow_unused=True)
    if variant == 2:
        assert grad_chosen is None or (grad_chosen == 0).all()
    else:
        assert (grad_chosen.abs() > 0).all()
    assert (grad_rejected.abs() > 0).all()


@pytest.mark.parametrize("measure", MEASURES)
def test_prompt_and_padding_logits_change_nothing(measure: str) -> None:
    policy, ref, labels, mask = make_batch()
    losses, metrics = loss_of(policy, ref, labels, mask, measure=measure, mu=MU[measure])
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    assert (grad[~mask] == 0).all()
    noise = torch.randn_like(policy) * 5
    noisy_policy = torch.where(mask.unsqueeze(-1), policy.detach(), policy.detach() + noise).requires_grad_(True)
    noisy_ref = torch.where(mask.unsqueeze(-1), ref, ref - noise)
    noisy_losses, noisy_metrics = loss_of(noisy_policy, noisy_ref, labels, mask, measure=measure, mu=MU[measure])
    (noisy_grad,) = torch.autograd.grad(noisy_losses.sum(), noisy_policy)
    torch.testing.assert_close(noisy_losses, losses, rtol=0, atol=0)
    torch.testing.assert_close(noisy_grad, grad, rtol=0, atol=0)
    for key, value in metrics.items():
        torch.testing.assert_close(noisy_metrics[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("measure", MEASURES)
def test_chunked_equals_unchunked(measure: str) -> None:
    policy, ref, labels, mask = make_batch()
    results = []
    for chunk_size in (1, 3, 10_000):
        losses, metrics = loss_of(policy, ref, labels, mask, measure=measure, mu=MU[measure], chunk_size=chunk_size)
        (grad,) = torch.autograd.grad(losses.sum(), policy)
        results.append((losses, grad, metrics["risk/chosen"]))
    for losses, grad, risk in results[:-1]:
        torch.testing.assert_close(losses, results[-1][0])
        torch.testing.assert_close(grad, results[-1][1])
        torch.testing.assert_close(risk, results[-1][2])


@pytest.mark.parametrize("measure", MEASURES)
def test_bf16_logits_give_the_float32_answer(measure: str) -> None:
    policy, ref, labels, mask = make_batch(torch.float32, v=257)
    policy_bf16 = policy.detach().bfloat16().requires_grad_(True)
    ref_bf16 = ref.bfloat16()
    # The same bf16 values, upcast: the computation itself is float32, so this is tight.
    upcast = policy_bf16.detach().float().requires_grad_(True)
    losses_bf16, metrics = loss_of(policy_bf16, ref_bf16, labels, mask, measure=measure, mu=MU[measure])
    losses_up, _ = loss_of(upcast, ref_bf16.float(), labels, mask, measure=measure, mu=MU[measure])
    assert losses_bf16.dtype == torch.float32
    assert metrics["risk/chosen"].dtype == torch.float32
    torch.testing.assert_close(losses_bf16, losses_up, rtol=1e-6, atol=1e-6)
    (grad_bf16,) = torch.autograd.grad(losses_bf16.sum(), policy_bf16)
    (grad_up,) = torch.autograd.grad(losses_up.sum(), upcast)
    assert grad_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(grad_bf16.float(), grad_up, rtol=1e-2, atol=1e-5)
    # Against the original float32 logits only bf16's rounding of the logits differs.
    losses_32, _ = loss_of(policy, ref, labels, mask, measure=measure, mu=MU[measure])
    torch.testing.assert_close(losses_bf16, losses_32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("measure", MEASURES)
def test_gradcheck_float64(measure: str) -> None:
    """The chunked terms and the loss against finite differences, through both models' logits.

    Variant 1 has no stop-gradient, so its analytic gradient is the numerical one.
    """
    policy, ref, labels, mask = make_batch(pairs=2, t=5, v=6, seed=3)
    ref = ref.requires_grad_(True)

    def terms(policy_logits, ref_logits):
        out = sequence_terms_chunked(
            policy_logits, ref_logits, labels, mask, measure=measure, mu=MU[measure], chunk_size=4
        )
        return out.policy_logps, out.ref_logps, out.risk

    def plain_terms(policy_logits, ref_logits):
        out = sequence_terms(policy_logits, ref_logits, labels, mask, measure=measure, mu=MU[measure])
        return out.policy_logps, out.ref_logps, out.risk

    def loss(policy_logits, ref_logits):
        return loss_of(policy_logits, ref_logits, labels, mask, variant=1, measure=measure, mu=MU[measure])[0]

    assert torch.autograd.gradcheck(terms, (policy, ref), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(plain_terms, (policy, ref), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(loss, (policy, ref), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("measure", MEASURES)
def test_identical_policy_and_reference_give_ln2_and_zero_risk(measure: str) -> None:
    policy, _, labels, mask = make_batch()
    losses, metrics = loss_of(policy, policy.detach().clone(), labels, mask, measure=measure, mu=MU[measure])
    torch.testing.assert_close(losses, torch.full((PAIRS,), math.log(2.0), dtype=torch.float64))
    torch.testing.assert_close(metrics["risk/chosen"], torch.zeros(PAIRS, dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards/margins"], torch.zeros(PAIRS, dtype=torch.float64))


def test_metrics_are_detached_and_accuracy_counts_wins() -> None:
    policy, ref, labels, mask = make_batch()
    _, metrics = loss_of(policy, ref, labels, mask)
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "risk/chosen",
        "risk/rejected",
    }
    assert all(not value.requires_grad and value.shape == (PAIRS,) for value in metrics.values())
    wins = (metrics["rewards/chosen"] > metrics["rewards/rejected"]).double()
    torch.testing.assert_close(metrics["rewards/accuracies"], wins)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"measure": "cvr"},
            r"measure: unknown measure 'cvr'; allowed: kl, cvar, erm, cvar_radpo, cvar_lower, erm_lower",
        ),
        ({"measure": "cvar", "mu": 2.0}, r"mu: must be in \(0, 1\] for cvar, got 2.0"),
        ({"measure": "erm", "mu": -1.0}, r"mu: must be in \(0, inf\) for erm"),
        ({"alpha": -0.1}, r"alpha: must be a finite number >= 0, got -0.1"),
        ({"alpha": math.nan}, r"alpha: must be a finite number >= 0"),
        ({"beta": 0.0}, r"beta: must be a finite number > 0, got 0.0"),
        ({"beta": math.inf}, r"beta: must be a finite number > 0, got inf"),
        ({"beta": True}, r"beta: must be a finite number > 0, got True"),
        ({"alpha": math.inf}, r"alpha: must be a finite number >= 0, got inf"),
        ({"alpha": "0.5"}, r"alpha: must be a finite number >= 0, got '0.5'"),
        ({"variant": True}, r"variant: must be one of \(1, 2\), got True"),
        ({"variant": 3}, r"variant: must be one of \(1, 2\), got 3"),
        ({"measure": None}, r"measure: required when alpha > 0"),
        ({"chunk_size": 0}, r"chunk_size: must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_named(change: dict, match: str) -> None:
    policy, ref, labels, mask = make_batch()
    with pytest.raises(ValueError, match=match):
        loss_of(policy, ref, labels, mask, **change)


def test_bad_shapes_are_named() -> None:
    policy, ref, labels, mask = make_batch()
    with pytest.raises(ValueError, match=r"ref_logits: must have the shape of policy_logits"):
        loss_of(policy, ref[:, :-1], labels, mask)
    with pytest.raises(ValueError, match=r"loss_mask: must be bool of shape \(6, 7\)"):
        loss_of(policy, ref, labels, mask[:, :-1])
    with pytest.raises(ValueError, match=r"loss_mask: must be bool"):
        loss_of(policy, ref, labels, mask.long())
    with pytest.raises(ValueError, match=r"labels: must be integer ids of shape \(6, 7\)"):
        loss_of(policy, ref, labels.double(), mask)
    with pytest.raises(ValueError, match=r"policy_logits: must have shape \(N, T, V\), got \(7, 11\)"):
        sequence_terms(policy[0], ref[0], labels, mask, measure="kl", mu=1.0)
    with pytest.raises(ValueError, match=r"policy_logits: must have shape \(N, T, V\), got \(7, 11\)"):
        sequence_terms_chunked(policy[0], ref[0], labels, mask, measure="kl", mu=1.0)
    with pytest.raises(ValueError, match=r"policy_logits: must be a \[chosen; rejected\] batch .* got \(7, 11\)"):
        loss_of(policy[0], ref[0], labels, mask)
    with pytest.raises(ValueError, match=r"policy_logits: must be a \[chosen; rejected\] batch"):
        loss_of(policy[:5], ref[:5], labels[:5], mask[:5])
    bad_labels = torch.where(mask, labels, 0)
    bad_labels[mask.nonzero()[0].tolist()] = V
    with pytest.raises(ValueError, match=r"labels: response positions hold ids outside \[0, 11\)"):
        loss_of(policy, ref, bad_labels, mask)
    bad_labels[mask.nonzero()[0].tolist()] = -100  # an ignore index inside the mask: as wrong as V
    with pytest.raises(ValueError, match=r"labels: response positions hold ids outside \[0, 11\)"):
        loss_of(policy, ref, bad_labels, mask)
    for terms in (sequence_terms, sequence_terms_chunked):  # the argument that is wrong is the one named
        with pytest.raises(ValueError, match=r"^policy_logits: must have shape \(N, T, V\), got \(7, 11\)$"):
            terms(policy[0], ref, labels, mask, measure="kl", mu=1.0)
    with pytest.raises(ValueError, match=r"ref_rejected_logps: must have the shape of policy_chosen_logps"):
        preference_loss(*[torch.zeros(3)] * 3, torch.zeros(2), None, None, beta=0.1, alpha=0.0, variant=2)


@pytest.mark.parametrize("measure", CLOSED_FORM)
@pytest.mark.parametrize("case", ["plain", "off_support", "ties", "equal", "bf16", "alpha_zero"])
def test_closed_form_gradient_equals_autograd(measure: str, case: str) -> None:
    """The policy gradient the backward writes in closed form (the reference needs none) is the
    one autograd gives by recomputing the block (forced here by a reference that needs one)."""
    dtype = torch.bfloat16 if case == "bf16" else torch.float64
    policy, ref, labels, mask = make_batch(dtype, v=33, seed=5)
    if case == "off_support":  # a third of the vocabulary impossible under the reference
        ref = ref.detach().clone()
        ref[..., ::3] = -math.inf
        labels = torch.where(mask & (labels % 3 == 0), labels + 1, labels)
    if case == "ties":  # integer-valued logits: many atoms share a drift value (CVaR boundary ties)
        policy = policy.detach().round().requires_grad_(True)
        ref = (ref.detach() * 2).round() / 2
    if case == "equal":  # policy == reference: every atom ties (the first step of a LoRA stage)
        ref = policy.detach().clone()
    objective = {"measure": measure, "mu": MU[measure], "chunk_size": 4, "alpha": 0.0 if case == "alpha_zero" else 0.7}
    closed, _ = loss_of(policy, ref, labels, mask, **objective)
    (closed_grad,) = torch.autograd.grad(closed.sum(), policy)
    policy_again = policy.detach().clone().requires_grad_(True)
    recomputed, _ = loss_of(policy_again, ref.detach().clone().requires_grad_(True), labels, mask, **objective)
    (autograd_grad,) = torch.autograd.grad(recomputed.sum(), policy_again)
    torch.testing.assert_close(closed, recomputed)
    tolerance = {"rtol": 1e-2, "atol": 1e-4} if case == "bf16" else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(closed_grad, autograd_grad, **tolerance)
    assert torch.isfinite(closed_grad).all()


TERMS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_risk",
         "rejected_risk")  # fmt: skip


@pytest.mark.parametrize("bad", TERMS[1:])
def test_preference_loss_names_the_term_of_the_wrong_shape(bad: str) -> None:
    terms = {name: torch.zeros(3) for name in TERMS} | {bad: torch.zeros(2)}
    with pytest.raises(ValueError, match=rf"^{bad}: must have the shape of policy_chosen_logps \(3,\), got \(2,\)$"):
        preference_loss(**terms, beta=0.1, alpha=0.5, variant=2)


def test_preference_loss_checks_its_own_arguments() -> None:
    """Called directly (not through preference_loss_from_logits): a bad objective is named, and a
    positive alpha needs both risks; alpha = 0 is DPO without them."""
    terms = {name: torch.zeros(3) for name in TERMS}
    for change, match in [({"beta": 0.0}, r"^beta: must be a finite number > 0, got 0.0$"),
                          ({"alpha": -1.0}, r"^alpha: must be a finite number >= 0, got -1.0$"),
                          ({"variant": 0}, r"^variant: must be one of \(1, 2\), got 0$")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            preference_loss(**terms, **({"beta": 0.1, "alpha": 0.5, "variant": 2} | change))
    for missing in ("chosen_risk", "rejected_risk"):
        with pytest.raises(ValueError, match=r"^chosen_risk, rejected_risk: required when alpha > 0 \(alpha = 0.5\)$"):
            preference_loss(**(terms | {missing: None}), beta=0.1, alpha=0.5, variant=2)
    losses, metrics = preference_loss(**(terms | {"chosen_risk": None, "rejected_risk": None}), beta=0.1, alpha=0.0,
                                      variant=2)  # fmt: skip
    torch.testing.assert_close(losses, torch.full((3,), math.log(2.0)))
    assert "risk/chosen" not in metrics
    _, metrics = preference_loss(**(terms | {"rejected_risk": None}), beta=0.1, alpha=0.0, variant=2)
    assert "risk/chosen" not in metrics  # one risk alone is not logged


def test_each_position_predicts_the_next_label_and_token_id_0_is_a_token() -> None:
    """next_token_targets by hand: position t predicts labels[t + 1]; the last position and
    ignored labels predict nothing; id 0 (GPT-2's "!") is a real target, not padding."""
    from rsa_pl.modules import next_token_targets

    ignore = -100
    labels = torch.tensor([[ignore, 0, 5, ignore], [ignore, ignore, 3, 0]])
    logits = torch.randn(2, 4, 7)
    same, targets, mask = next_token_targets(logits, labels)
    assert same is logits
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]
    assert targets[mask].tolist() == [0, 5, 3, 0]
    assert ((targets >= 0) & (targets < 7)).all()  # off the mask too: a valid id to gather


def test_the_logits_window_starts_at_the_position_before_the_first_labelled_token() -> None:
    from rsa_pl.modules import logits_window

    ignore = -100
    labels = torch.tensor([[ignore, ignore, ignore, 5, 6, ignore], [ignore, ignore, 7, 8, ignore, ignore]])
    assert logits_window(labels) == 5  # first label at t = 2, predicted by position 1: positions 1..5
    assert logits_window(torch.tensor([[ignore, 3, 4]])) == 3
    assert logits_window(torch.full((2, 6), ignore)) == 6  # nothing labelled: every position
