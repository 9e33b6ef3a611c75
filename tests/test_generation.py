"""Generation and answer log-probabilities against an exact enumeration: a tiny model (a vocabulary
of 5 tokens, answers of at most 2) has few enough answers to list them all in float64, so the
sampling distribution at temperature T and kl_to_sft's KL(pi_T || pi_sft,T) are known exactly."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from rsa_pl.evaluation.generation import generate_ids, response_logps

VOCAB, EOS, PAD = 5, 4, 3
PROMPTS = [[0, 1, 2], [2]]  # two lengths: the batch is left-padded for sampling, right-padded for scoring
TOKENIZER = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         initializer_range=0.5, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    # what a shipped generation_config.json may say: none of it may change the sampling distribution
    model.generation_config = GenerationConfig(top_k=2, top_p=0.3, repetition_penalty=3.0, temperature=0.2)
    return model


def _answers() -> list[tuple[int, ...]]:
    """Every answer of at most 2 tokens that generation can produce: EOS at once, or a token then any."""
    return [(EOS,)] + [(a, b) for a, b in itertools.product(range(VOCAB), repeat=2) if a != EOS]


def _exact_logps(model: LlamaForCausalLM, prompt: list[int], temperature: float) -> dict[tuple[int, ...], float]:
    """log pi_T(answer | prompt) of every answer, token by token in float64 without a cache or padding."""
    double = LlamaForCausalLM(model.config).double().eval()
    double.load_state_dict(model.state_dict())
    out = {}
    with torch.no_grad():
        for answer in _answers():
            total = 0.0
            for t, token in enumerate(answer):
                logits = double(input_ids=torch.tensor([prompt + list(answer[:t])])).logits[0, -1]
                total += float(torch.log_softmax(logits / temperature, dim=-1)[token])
            out[answer] = total
    return out


def test_the_enumeration_is_a_distribution() -> None:
    exact = _exact_logps(_model(1), PROMPTS[0], 0.7)
    assert math.fsum(math.exp(v) for v in exact.values()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_answer_logps_are_exact_at_any_temperature(temperature: float) -> None:
    model = _model(1)
    rows = [(p, a) for p in PROMPTS for a in _answers()]
    got = response_logps(model, [p for p, _ in rows], [list(a) for _, a in rows], batch_size=7, temperature=temperature)
    exact = {i: _exact_logps(model, p, temperature) for i, p in enumerate(PROMPTS)}
    want = [exact[PROMPTS.index(p)][a] for p, a in rows]
    assert got == pytest.approx(want, abs=2e-5)


def _sample(model: LlamaForCausalLM, n: int, temperature: float) -> list[list[int]]:
    return generate_ids(model, TOKENIZER, PROMPTS, temperature=temperature, max_new_tokens=2, seed=3,
                        batch_size=2 * n, samples_per_prompt=n)  # fmt: skip


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_samples_follow_softmax_of_logits_over_t_and_nothing_else(temperature: float) -> None:
    """A chi-square goodness-of-fit of 4000 samples a prompt against the exact pi_T (answers expected
    fewer than 5 times pooled); the model's own
    generation_config (top_k 2, top_p 0.3, repetition_penalty 3) would move most of the mass."""
    model, n = _model(1), 4000
    samples = _sample(model, n, temperature)
    for i, prompt in enumerate(PROMPTS):
        exact = _exact_logps(model, prompt, temperature)
        counts = {a: 0 for a in exact}
        for answer in samples[i * n : (i + 1) * n]:
            counts[tuple(answer)] += 1  # a KeyError: an answer the enumeration says cannot happen
        bins = [(counts[a], n * math.exp(lp)) for a, lp in exact.items() if n * math.exp(lp) >= 5]
        rare = [(counts[a], n * math.exp(lp)) for a, lp in exact.items() if n * math.exp(lp) < 5]
        bins.append((sum(c for c, _ in rare), sum(e for _, e in rare)))  # rare answers pooled in one bin
        chi2 = sum((c - e) ** 2 / e for c, e in bins)
        df = len(bins) - 1
        assert chi2 < df + 6 * math.sqrt(2 * df), (prompt, chi2)


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_sampled_kl_estimates_the_exact_kl_between_the_sampling_distributions(temperature: float) -> None:
    """The mean of log pi_T - log pi_sft,T over the policy's samples (kl_to_sft) lies within 4 standard
    errors of the exact KL(pi_T || pi_sft,T); scoring at T = 1 instead (the old defect) does not."""
    policy, sft, n = _model(1), _model(2), 3000
    samples = _sample(policy, n, temperature)
    prompts = [PROMPTS[i // n] for i in range(len(samples))]
    for scored_at, should_match in ((temperature, True), (1.0, False)):
        diffs = [p - r for p, r in zip(response_logps(policy, prompts, samples, 256, scored_at),
                                       response_logps(sft, prompts, samples, 256, scored_at), strict=True)]  # fmt: skip
        for i, prompt in enumerate(PROMPTS):
            mine, ref = _exact_logps(policy, prompt, temperature), _exact_logps(sft, prompt, temperature)
            exact = math.fsum(math.exp(lp) * (lp - ref[a]) for a, lp in mine.items())
            assert exact > 0.05  # the two models differ enough for the check to mean something
            part = diffs[i * n : (i + 1) * n]
            mean = math.fsum(part) / n
            stderr = math.sqrt(math.fsum((d - mean) ** 2 for d in part) / (n - 1) / n)
            assert (abs(mean - exact) < 4 * stderr) is should_match, (scored_at, mean, exact, stderr)


def test_the_models_generation_config_is_restored() -> None:
    model = _model(1)
    kept = model.generation_config
    _sample(model, 2, 0.7)
    assert model.generation_config is kept
