"""The whole RSA loss against tests/loss_reference.py, an independent float64 reference.

Values (the per-pair losses and every logged metric) and gradients with respect to the policy's
logits, for the path training takes (PreferenceModule.losses: the next-token shift, then
preference_loss_from_logits with its chunked closed-form backward) and the plain one
(sequence_terms, then preference_loss), over the measures, their mu, both variants, several
alpha and beta, tied drifts, tokens the reference gives no mass, and masked positions.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rsa_pl.losses import preference_loss, preference_loss_from_logits, sequence_terms
from tests import loss_reference as reference

PAIRS, T, V = 2, 6, 8
TIGHT = {"rtol": 1e-9, "atol": 1e-12}

# (measure, mu): mu spans each measure's domain, from deep in the tail to the KL end.
SETTINGS = [
    ("kl", 1.0),
    ("kl", 0.3),  # ignored
    ("cvar", 0.05),
    ("cvar", 0.3),
    ("cvar", 0.7),
    ("cvar", 1.0),
    ("erm", 0.01),
    ("erm", 0.5),
    ("erm", 2.0),
    ("erm", 7.0),
    ("cvar_lower", 0.05),
    ("cvar_lower", 0.3),
    ("cvar_lower", 0.7),
    ("cvar_lower", 1.0),
    ("erm_lower", 0.01),
    ("erm_lower", 0.5),
    ("erm_lower", 1.0),
    ("cvar_radpo", 0.5),
    ("cvar_radpo", 0.95),
]
CASES = ["random", "ties", "equal", "off_support"]
# (beta, alpha): a weak and a strong risk term, and a large beta where the sigmoid saturates.
OBJECTIVES = [(0.1, 0.5), (0.5, 2.0), (4.0, 0.9)]


def make_batch(case: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 [chosen; rejected] batch, aligned: logits (2B, T, V), labels (2B, T) and the
    response mask (2B, T). Each row has a masked prompt, a response and masked right padding;
    masked labels are IGNORE.

    case: "random" (the policy a perturbed reference), "ties" (half-integer logits: the drift
    takes a few values at each position, so the CVaR boundary falls on tied atoms), "equal"
    (policy == reference: every atom ties, the first step of a LoRA stage), "off_support" (about
    a third of each position's vocabulary has reference logit -inf, some with a -inf policy
    logit too; the labels avoid them).
    """
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(2 * PAIRS, T, V, generator=g, dtype=torch.float64) * 1.5
    policy = ref + 0.7 * torch.randn(2 * PAIRS, T, V, generator=g, dtype=torch.float64)
    if case == "ties":
        ref = torch.randint(-3, 4, (2 * PAIRS, T, V), generator=g).double() / 2
        policy = ref + torch.randint(-1, 2, (2 * PAIRS, T, V), generator=g).double() / 2
    if case == "equal":
        policy = ref.clone()
    labels = torch.randint(0, V, (2 * PAIRS, T), generator=g)
    if case == "off_support":
        off = torch.rand(2 * PAIRS, T, V, generator=g) < 0.35
        off.scatter_(-1, labels.unsqueeze(-1), False)  # the sampled token has reference mass
        off[..., (labels[..., None] + 1) % V == torch.arange(V)] = False  # and so has one more
        ref = ref.masked_fill(off, -math.inf)
        policy = policy.masked_fill(off & (torch.rand(off.shape, generator=g) < 0.5), -math.inf)
    mask = torch.zeros(2 * PAIRS, T, dtype=torch.bool)
    for row in range(2 * PAIRS):
        start = int(torch.randint(1, 3, (1,), generator=g))
        stop = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[row, start:stop] = True
    labels = torch.where(mask, labels, reference.IGNORE)
    return policy, ref, labels, mask


def gradient(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return grad


def check_metrics(metrics: dict[str, torch.Tensor], want: reference.Reference, beta: float) -> None:
    """The logged metrics (docs/method.md, "The loss") against the reference's parts."""
    chosen_logps, rejected_logps = want.policy_logps.detach().chunk(2)
    margins = (want.policy_logps - want.ref_logps).detach().chunk(2)
    chosen_risk, rejected_risk = want.risk.detach().chunk(2)
    expected = {
        "rewards/chosen": beta * margins[0],
        "rewards/rejected": beta * margins[1],
        "rewards/margins": beta * (margins[0] - margins[1]),
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
        "risk/chosen": chosen_risk,
        "risk/rejected": rejected_risk,
    }
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], value, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")
    assert (metrics["rewards/accuracies"] == (margins[0] > margins[1]).double()).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize(("measure", "mu"), SETTINGS)
def test_loss_and_policy_gradient_equal_the_reference(measure: str, mu: float, variant: int, case: str) -> None:
    seed = SETTINGS.index((measure, mu)) * 8 + CASES.index(case) * 2 + variant
    policy, ref, labels, mask = make_batch(case, seed)
    beta, alpha = OBJECTIVES[seed % len(OBJECTIVES)]
    objective = {"beta": beta, "alpha": alpha, "variant": variant, "measure": measure, "mu": mu}
    policy = policy.requires_grad_(True)
    want = reference.pair_losses(policy, ref, labels, mask, **objective)
    want_grad = gradient(want.losses, policy)
    assert want_grad[~mask].abs().max() == 0  # masked positions: no gradient (the reference's own check)

    # The training path: chunked terms with the closed-form backward (3 positions a block).
    losses, metrics = preference_loss_from_logits(policy, ref, labels, mask, chunk_size=3, **objective)
    torch.testing.assert_close(losses, want.losses.detach(), **TIGHT)
    torch.testing.assert_close(gradient(losses, policy), want_grad, **TIGHT)
    check_metrics(metrics, want, beta)

    # The plain path: full log-probabilities, autograd through rsa_pl.risk.
    terms = sequence_terms(policy, ref, labels, mask, measure=measure, mu=mu)
    plain, _ = preference_loss(
        *terms.policy_logps.chunk(2),
        *terms.ref_logps.chunk(2),
        *terms.risk.chunk(2),
        beta=beta,
        alpha=alpha,
        variant=variant,
    )
    torch.testing.assert_close(plain, want.losses.detach(), **TIGHT)
    torch.testing.assert_close(gradient(plain, policy), want_grad, **TIGHT)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("measure", [None, "cvar", "erm_lower"])
def test_alpha_zero_is_dpo_and_still_logs_the_risk(measure: str | None, case: str) -> None:
    policy, ref, labels, mask = make_batch(case, seed=100 + CASES.index(case))
    policy = policy.requires_grad_(True)
    objective = {"beta": 0.3, "alpha": 0.0, "variant": 1, "measure": measure, "mu": 0.4}
    want = reference.pair_losses(policy, ref, labels, mask, **objective)
    losses, metrics = preference_loss_from_logits(policy, ref, labels, mask, **objective)
    torch.testing.assert_close(losses, want.losses.detach(), **TIGHT)
    torch.testing.assert_close(gradient(losses, policy), gradient(want.losses, policy), **TIGHT)
    if measure is not None:
        check_metrics(metrics, want, beta=0.3)


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM: whatever the input, these (N, T, V) logits (the last `keep` positions)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0):
        return SimpleNamespace(logits=self.logits[:, -logits_to_keep:])


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize(("measure", "mu"), [("cvar", 0.3), ("erm", 2.0), ("cvar_lower", 0.3), ("erm_lower", 0.5)])
def test_training_step_loss_equals_the_reference(measure: str, mu: float, variant: int) -> None:
    """PreferenceModule.losses, as the training step calls it: the data's labels (IGNORE on the
    prompt and padding), both models' logits at every input position, the position before each
    token predicting it; the module keeps only the logits from the earliest response on."""
    from rsa_pl.modules import PreferenceModule  # imports Lightning and transformers: only here

    g = torch.Generator().manual_seed(7 + variant)
    ref = torch.randn(2 * PAIRS, T, V, generator=g, dtype=torch.float64)
    policy = ref + 0.7 * torch.randn(2 * PAIRS, T, V, generator=g, dtype=torch.float64)
    ref[2, 3] = ref[2, 3].round()  # one response position of tied drifts
    policy[2, 3] = ref[2, 3] + torch.tensor([0.0, 0.5, 0.5, 0.0, -0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    labels = torch.randint(0, V, (2 * PAIRS, T), generator=g)
    prompt = [3, 2, 2, 4]  # prompt lengths: the earliest response starts at position 2
    response = [3, 2, 4, 1]  # then padding
    for row in range(2 * PAIRS):
        labels[row, : prompt[row]] = reference.IGNORE
        labels[row, prompt[row] + response[row] :] = reference.IGNORE
    objective = {"beta": 0.2, "alpha": 0.8, "variant": variant, "measure": measure, "mu": mu}
    model = FixedLogits(policy.clone())
    module = PreferenceModule(model, None, objective, FixedLogits(ref.clone()))
    batch = {"input_ids": torch.zeros_like(labels), "attention_mask": torch.ones_like(labels), "labels": labels}
    losses, metrics = module.losses(batch)

    targets, mask = reference.next_token_labels(labels)
    assert mask.sum() == sum(response)
    logits = policy.clone().requires_grad_(True)
    want = reference.pair_losses(logits, ref, targets, mask, **objective)
    torch.testing.assert_close(losses, want.losses.detach(), **TIGHT)
    torch.testing.assert_close(gradient(losses, model.logits), gradient(want.losses, logits), **TIGHT)
    check_metrics(metrics, want, beta=0.2)


# --- The reference itself, on cases worked by hand -----------------------------------------


def hand_atoms(z: list[float], p: list[float]) -> reference.Atoms:
    p_t = torch.tensor(p, dtype=torch.float64)
    return reference.Atoms(torch.tensor(z, dtype=torch.float64, requires_grad=True), p_t, p_t.log())


def test_reference_cvar_splits_the_boundary_atom() -> None:
    d = hand_atoms([0.0, 2.0, 1.0], [0.3, 0.2, 0.5])
    # Upper 0.5: all of Z = 2 (0.2) and 0.3 of Z = 1. Lower 0.5: all of Z = 0 (0.3) and 0.2 of Z = 1.
    assert reference.cvar(d, 0.5).item() == pytest.approx((0.2 * 2 + 0.3 * 1) / 0.5, rel=1e-15)
    assert reference.cvar_lower(d, 0.5).item() == pytest.approx((0.3 * 0 + 0.2 * 1) / 0.5, rel=1e-15)
    assert reference.cvar(d, 1.0).item() == pytest.approx(reference.kl(d, 1.0).item(), rel=1e-15)
    assert reference.cvar_lower(d, 1.0).item() == pytest.approx(0.2 * 2 + 0.5 * 1, rel=1e-15)
    # dPhi/dZ: p / mu inside the tail, the boundary atom the rest of the unit mass, 0 below.
    (w,) = torch.autograd.grad(reference.cvar(d, 0.5), d.z)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.4, 0.6], dtype=torch.float64), rtol=0, atol=1e-15)


def test_reference_cvar_shares_a_tied_boundary_in_proportion_to_the_reference() -> None:
    d = hand_atoms([1.0, 3.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4])
    # Upper 0.5: Z = 3 (0.2) whole, then 0.3 of the 0.8 tied at Z = 1, shared 1 : 3 : 4.
    assert reference.cvar(d, 0.5).item() == pytest.approx((0.2 * 3 + 0.3 * 1) / 0.5, rel=1e-15)
    (w,) = torch.autograd.grad(reference.cvar(d, 0.5), d.z)
    rest = 1 - 0.2 / 0.5
    want = torch.tensor([rest * 0.1 / 0.8, 0.4, rest * 0.3 / 0.8, rest * 0.4 / 0.8], dtype=torch.float64)
    torch.testing.assert_close(w, want, rtol=0, atol=1e-15)
    # Every atom tied: the weights are pi_ref, whatever mu.
    same = hand_atoms([0.5] * 4, [0.1, 0.2, 0.3, 0.4])
    for tail in (reference.cvar, reference.cvar_lower):
        (w,) = torch.autograd.grad(tail(same, 0.25), same.z)
        torch.testing.assert_close(w, same.p, rtol=0, atol=1e-15)


def test_reference_entropic_measures_by_hand() -> None:
    d = hand_atoms([-1.0, 2.0], [0.75, 0.25])
    mu = 0.5
    assert reference.erm(d, mu).item() == pytest.approx(
        math.log(0.75 * math.exp(-mu) + 0.25 * math.exp(2 * mu)) / mu, rel=1e-14
    )
    assert reference.erm_lower(d, mu).item() == pytest.approx(
        -math.log(0.75 * math.exp(mu) + 0.25 * math.exp(-2 * mu)) / mu, rel=1e-14
    )
    kl = reference.kl(d, mu).item()
    assert reference.erm_lower(d, mu).item() < kl < reference.erm(d, mu).item()
    assert reference.erm(d, 1e-6).item() == pytest.approx(kl, rel=1e-5)


def test_reference_loss_by_hand() -> None:
    """One pair of one-token responses over a two-token vocabulary, worked out on paper."""
    policy = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]], dtype=torch.float64)  # pi_theta
    ref = torch.tensor([[[math.log(3.0), 0.0]], [[0.0, 0.0]]], dtype=torch.float64)  # pi_ref
    labels, mask = torch.tensor([[0], [1]]), torch.ones(2, 1, dtype=torch.bool)
    # chosen: pi_theta = (1/2, 1/2), pi_ref = (3/4, 1/4), y = 0; rejected: (3/4, 1/4), (1/2, 1/2), y = 1
    m_w, m_l = math.log(0.5 / 0.75), math.log(0.25 / 0.5)
    d_w = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # kl
    d_l = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    beta, alpha = 0.5, 2.0
    u = beta * (m_w - m_l) - alpha * (beta * d_l - beta * d_w)
    out = reference.pair_losses(policy, ref, labels, mask, beta=beta, alpha=alpha, variant=2, measure="kl", mu=1.0)
    assert out.losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-u))), rel=1e-14)
    # The chosen response's upper 1/4-tail is its largest drift, log(3/4 / 1/2), alone.
    out = reference.pair_losses(policy, ref, labels, mask, beta=beta, alpha=alpha, variant=2, measure="cvar", mu=0.25)
    assert out.risk[0].item() == pytest.approx(math.log(1.5), rel=1e-14)
