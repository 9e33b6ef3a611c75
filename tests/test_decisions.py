"""The embedded world's decision points (rsa_pl/evaluation/decisions.py): where they are, the exact
probability of a catastrophe there against an independent float64 reference (one unbatched forward
per token), and its metrics against a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rsa_pl.data.tokenize import PromptFormat
from rsa_pl.evaluation import bootstrap, decisions
from rsa_pl.params_file import load_params
from rsa_pl.world import lexicon
from rsa_pl.world.oracle import parse_prompt
from tests.helpers import stage_params


@pytest.fixture(scope="module")
def points(pipeline_root: Path, tmp_path_factory: pytest.TempPathFactory):
    params = load_params(stage_params(tmp_path_factory.mktemp("decisions")))
    p = params.prepare
    tokenizer = AutoTokenizer.from_pretrained(str(pipeline_root / "data" / "tokenizer"))
    fmt = PromptFormat(tokenizer, p.prompt_format, p.prompt_template, p.system_prompt, "tokenizer")
    red = load_from_disk(str(pipeline_root / "data" / "eval_redteam"))
    found = decisions.decision_points(red["prompt"], red["prompt_text"], red["prompt_input_ids"], fmt)
    return tokenizer, red, found


def test_every_red_team_prompt_has_a_point_per_harmful_step(points) -> None:
    tokenizer, red, found = points
    per_prompt = {i: [p for p in found if p.prompt_index == i] for i in range(len(red))}
    for i, prompt in enumerate(red["prompt"]):
        intent = parse_prompt(prompt)
        spec = lexicon.CATEGORIES[intent.name]
        steps = [s.format(obj=intent.obj) for s in spec["mild"] + spec["moderate"]]
        assert [p.step for p in per_prompt[i]] == steps
        for point in per_prompt[i]:
            assert point.context[: len(red["prompt_input_ids"][i])] == red["prompt_input_ids"][i]
            after = tokenizer.decode(point.context[len(red["prompt_input_ids"][i]) :]).strip()
            assert after == point.step
            (continuation,) = point.continuations
            assert tokenizer.decode(continuation).strip() == spec["catastrophic"][0].format(obj=intent.obj)
    assert not decisions.decision_points(["How do I cook rice for dinner?"], ["x"], [[1]], None)  # benign: none


def _reference(model: LlamaForCausalLM, point: decisions.DecisionPoint) -> float:
    """sum over continuations of prod_t pi(c_t | context, c_<t), one float64 forward per token."""
    total = 0.0
    for continuation in point.continuations:
        logp = 0.0
        for t, token in enumerate(continuation):
            ids = torch.tensor([point.context + continuation[:t]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1].double()
            logp += float(torch.log_softmax(logits, -1)[token])
        total += math.exp(logp)
    return total


def test_probabilities_match_a_float64_reference(points) -> None:
    tokenizer, _, found = points
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a peaked distribution, so that probabilities span decades
        model.lm_head.weight.mul_(40.0)
    chosen = found[:6]
    got = decisions.probabilities(model, chosen, batch_size=4)  # batches of unequal lengths: padding
    reference = [_reference(model.double(), p) for p in chosen]
    model.float()
    assert len({round(math.log10(r)) for r in reference}) > 1  # not all alike
    for g, r in zip(got, reference, strict=True):
        assert g == pytest.approx(r, rel=2e-4)
    assert all(0.0 < g <= 1.0 for g in got)


def test_metrics_are_the_mean_and_geometric_mean_with_a_prompt_bootstrap(points) -> None:
    _, _, found = points
    rng = np.random.default_rng(1)
    probs = list(10.0 ** rng.uniform(-6, -1, size=len(found)))
    out = decisions.metrics(found, probs, seed=3, draws=200)
    assert out["catastrophe_prob"] == pytest.approx(float(np.mean(probs)), rel=1e-12)
    assert out["catastrophe_prob_geomean"] == pytest.approx(math.exp(np.mean(np.log(probs))), rel=1e-12)
    assert out["catastrophe_prob.n"] == out["catastrophe_prob_geomean.n"] == len(found)
    # the interval: the same prompt-level bootstrap, by hand
    prompts = sorted({p.prompt_index for p in found})
    weights = bootstrap.resample_weights(len(prompts), 200, 3)
    per_prompt = np.array([[probs[k] for k, p in enumerate(found) if p.prompt_index == i] for i in prompts])
    draws = (weights * per_prompt.sum(1)).sum(1) / (weights * per_prompt.shape[1]).sum(1)
    assert out["catastrophe_prob.ci95_low"] == pytest.approx(float(np.quantile(draws, 0.025)), rel=1e-9)
    assert out["catastrophe_prob.ci95_high"] == pytest.approx(float(np.quantile(draws, 0.975)), rel=1e-9)
    assert out["catastrophe_prob_geomean.ci95_low"] <= out["catastrophe_prob_geomean"]
    assert out["catastrophe_prob_geomean"] <= out["catastrophe_prob_geomean.ci95_high"]
    assert decisions.metrics([], [], seed=0) == {}
