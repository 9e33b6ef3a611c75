"""The reference's logits recomputed block by block from its hidden states (rsa_pl.fast.chunked
ReferenceHead, chosen by rsa_pl.modules.plain_head) and the policy's logits overwritten by their
gradient (consume): the same losses, metrics and adapter gradients as the plain route (the
reference's whole logits, a fresh gradient buffer), for every kind of reference and measure;
the head is refused where the logits are not exactly head(hidden state)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rsa_pl import modules
from rsa_pl.data.tokenize import IGNORE_INDEX
from rsa_pl.fast.chunked import ReferenceHead, chunked_sequence_terms
from rsa_pl.models import attach_lora
from rsa_pl.modules import PreferenceModule, plain_head
from rsa_pl.params_file import load_params
from tests.helpers import ROOT

VOCAB = 97


def _llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)  # fmt: skip
    return LlamaForCausalLM(config)


def _batch(pairs: int = 3, prompt: int = 5, response: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2 * pairs, prompt + response), generator=generator)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    labels[1, -3:] = IGNORE_INDEX  # a shorter answer: right padding
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _module(kind: str, measure: str, tie: bool) -> PreferenceModule:
    raw = load_params(ROOT / "params.yaml").train_reward
    mu = {"cvar": 0.9, "erm": 2.0, "kl": 1.0, "cvar_radpo": 0.9}[measure]
    risk = raw.risk.model_copy(update={"measure": measure, "mu": mu})
    section = raw.model_copy(update={"loss": "rsa", "alpha": 0.5, "risk": risk})
    base = _llama(tie)
    if kind == "adapter-off":
        policy = attach_lora(base, section.lora)
        with torch.no_grad():  # adapters away from zero: the policy differs from its reference
            for name, weight in policy.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.3)
        return PreferenceModule(policy, section.train, section.objective(), None, reference_head=True)
    policy = copy.deepcopy(base)
    with torch.no_grad():
        for weight in policy.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    return PreferenceModule(policy, section.train, section.objective(), base, reference_head=True)


def _run(module: PreferenceModule, batch: dict[str, torch.Tensor]):
    module.train()
    losses, metrics = module.losses(batch)
    losses.sum().backward()
    grads = {n: w.grad.clone() for n, w in module.model.named_parameters() if w.grad is not None}
    module.model.zero_grad(set_to_none=True)
    return losses.detach(), metrics, grads


@pytest.mark.parametrize("kind", ["adapter-off", "frozen-copy"])
@pytest.mark.parametrize("measure", ["cvar", "erm", "kl", "cvar_radpo"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_head_route_equals_the_logits_route(
    kind: str, measure: str, tie: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _module(kind, measure, tie)
    batch = _batch()
    assert module._reference_head() is not None
    head = _run(module, batch)
    monkeypatch.setattr(modules, "plain_head", lambda model: None)  # the reference's whole logits
    assert module._reference_head() is None
    plain = _run(module, batch)
    torch.testing.assert_close(head[0], plain[0], rtol=1e-5, atol=1e-6)
    for name, value in plain[1].items():
        torch.testing.assert_close(head[1][name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert head[2].keys() == plain[2].keys()
    assert head[2]
    for name, value in plain[2].items():
        torch.testing.assert_close(head[2][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_the_head_is_taken_only_where_logits_are_exactly_head_of_hidden() -> None:
    """A Llama's or GPT-2's Linear head qualifies; a trainable head, a head wrapped by LoRA, and an
    architecture that post-processes its logits (Gemma 2's soft-capping) do not."""
    llama = _llama(tie=False)
    assert plain_head(llama) is None  # trainable (a full-weights policy's own head)
    llama.requires_grad_(False)
    assert plain_head(llama) is llama.lm_head
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    gpt2.requires_grad_(False)
    assert plain_head(gpt2) is gpt2.lm_head
    section = load_params(ROOT / "params.yaml").train_reward
    policy = attach_lora(_llama(tie=True), section.lora)
    assert plain_head(policy) is policy.get_base_model().lm_head
    wrapped = attach_lora(_llama(tie=False), section.lora.model_copy(update={"target_modules": ["q_proj", "lm_head"]}))
    assert plain_head(wrapped) is None
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))  # fmt: skip
    assert plain_head(gemma.requires_grad_(False)) is None


def test_the_head_is_put_back_after_the_reference_forward() -> None:
    module = _module("adapter-off", "cvar", tie=True)
    head = module.model.get_base_model().lm_head
    module.losses(_batch())
    assert module.model.get_base_model().lm_head is head
    assert module.model.get_base_model().get_output_embeddings() is head


def test_consumed_logits_refuse_a_second_backward() -> None:
    """consume: the backward writes the gradient over the policy's logits, so a second backward
    through the same graph would read a gradient as logits: autograd's version check refuses it
    (the logits are saved for the backward, and the overwrite bumps their version)."""
    torch.manual_seed(0)
    policy = torch.randn(2, 6, 11, requires_grad=True)
    logits = policy * 1.0  # a non-leaf, as a model's output
    ref = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    positions = torch.arange(2, 12)
    terms = chunked_sequence_terms(logits, ref, labels, positions, "cvar", 0.9, 3, None, True)
    total = terms[0].sum() + terms[2].sum()
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


def test_the_reference_head_recomputes_under_the_forwards_autocast() -> None:
    """Under CPU bf16 autocast the block logits are the autocast matmul's, in the forward and in
    the backward's recomputation alike (the CVaR boundary found in one is found in the other)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 16), torch.randn(30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.linear(hidden, weight)
    head = ReferenceHead(weight, None, True, torch.bfloat16)
    assert head.logits(hidden).dtype == torch.bfloat16
    torch.testing.assert_close(head.logits(hidden), expected, rtol=0, atol=0)
    off = ReferenceHead(weight, None, False, torch.bfloat16)
    torch.testing.assert_close(off.logits(hidden), hidden @ weight.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("measure", [None, "cvar", "erm"])
def test_consuming_the_logits_gives_the_same_gradient(measure: str | None) -> None:
    """The gradient written over the logits equals the one in a fresh buffer, prompt and padding
    rows (outside every block) zero."""
    torch.manual_seed(0)
    base = torch.randn(3, 8, 13, dtype=torch.float64)
    ref = base + 0.3 * torch.randn_like(base)
    labels = torch.randint(0, 13, (3, 8))
    positions = torch.tensor([2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 19, 20])  # gaps: prompt and padding rows
    grads = []
    for consume in (False, True):
        policy = base.clone().requires_grad_(True)
        logits = policy * 1.0
        terms = chunked_sequence_terms(logits, ref, labels, positions, measure, 0.8, 3, None, consume)
        (terms[0] * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().add(terms[2].sum()).backward()
        grads.append(policy.grad)
        assert not consume or not torch.equal(logits.detach(), base)  # overwritten
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    rows = torch.ones(24, dtype=torch.bool)
    rows[positions] = False
    assert grads[1].reshape(24, 13)[rows].abs().sum() == 0


@pytest.mark.parametrize("measure", [None, "cvar", "cvar_radpo"])
def test_head_groups_cut_into_blocks_give_the_logits_routes_terms(
    measure: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reference logits computed per group of rows (here 5) and consumed in blocks of 2 give the
    terms and policy gradient of the same logits passed whole, also where the backward
    recomputes a block under autograd (cvar_radpo has no closed form)."""
    from rsa_pl.fast import chunked

    monkeypatch.setattr(chunked, "HEAD_GROUP_ELEMENTS", 5 * 13)
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 8, 6, dtype=torch.float64), torch.randn(13, 6, dtype=torch.float64)
    base = hidden @ weight.T + 0.5 * torch.randn(3, 8, 13, dtype=torch.float64)
    labels = torch.randint(0, 13, (3, 8))
    positions = torch.tensor([1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 20, 21, 22])
    head = ReferenceHead(weight, None, False, torch.bfloat16)
    results = []
    for ref, ref_head in ((hidden @ weight.T, None), (hidden, head)):
        policy = base.clone().requires_grad_(True)
        terms = chunked_sequence_terms(policy, ref, labels, positions, measure, 0.7, 2, ref_head, False)
        (terms[0] * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum().add(terms[2].sum()).backward()
        results.append((terms, policy.grad))
    for got, want in zip(results[1][0], results[0][0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)
