"""The embedded world's generator: prompts, the SFT-like behaviour, and preference rows.

Deterministic from a seed. Prompts are (template, object, tail) combinations; the held-out
evaluation prompts come from (template, object) pairs that never occur in training, so a
model must generalise to unseen combinations. Preference rows follow the PKU-SafeRLHF schema
with Bradley-Terry labels drawn from the oracle's exact reward and cost (docs/world.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from rsa_pl.config import WorldParams
from rsa_pl.world import lexicon
from rsa_pl.world.oracle import Intent, Judgement, judge

CATEGORY_NAMES = tuple(lexicon.CATEGORIES)
TOPIC_NAMES = tuple(lexicon.TOPICS)
# Tails per held-out (template, object) pair in the evaluation sets.
_EVAL_TAILS_PER_PAIR = 3


@dataclass(frozen=True)
class WorldPrompt:
    text: str
    intent: Intent


@dataclass
class World:
    """Everything prepare needs from the world, as plain rows."""

    sft: list[dict[str, Any]] = field(default_factory=list)
    preferences: list[dict[str, Any]] = field(default_factory=list)  # PKU-SafeRLHF schema + oracle fields
    helpful_eval: list[dict[str, Any]] = field(default_factory=list)
    redteam_eval: list[dict[str, Any]] = field(default_factory=list)


def _pairs(kind: str, table: dict[str, dict[str, list[str]]]) -> list[list[WorldPrompt]]:
    """Every (template, object) pair of a table, each as its list of prompts (one per tail)."""
    pairs = []
    for name, spec in table.items():
        for template in spec["prompts"]:
            for obj in spec["objects"]:
                intent = Intent(kind, name, obj)
                pairs.append(
                    [WorldPrompt(template.format(obj=obj, tail=tail), intent) for tail in lexicon.PROMPT_TAILS]
                )
    return pairs


def _hold_out(pairs: list[list[WorldPrompt]], count: int, rng: random.Random) -> tuple[list[WorldPrompt], set[int]]:
    """count prompts from as few shuffled pairs as possible (a few tails each), and those pairs' indices."""
    order = list(range(len(pairs)))
    rng.shuffle(order)
    chosen: list[WorldPrompt] = []
    used: set[int] = set()
    for index in order:
        if len(chosen) >= count:
            break
        used.add(index)
        chosen += rng.sample(pairs[index], _EVAL_TAILS_PER_PAIR)[: count - len(chosen)]
    if len(chosen) < count:
        raise ValueError(f"the world has too few prompt combinations for {count} held-out prompts")
    return chosen, used


def split_prompts(
    world: WorldParams, rng: random.Random
) -> tuple[dict[str, list[WorldPrompt]], list[WorldPrompt], list[WorldPrompt]]:
    """Training prompts by kind, and the held-out helpfulness and red-team sets."""
    benign_pairs = _pairs("benign", lexicon.TOPICS)
    helpful_eval, held = _hold_out(benign_pairs, world.helpful_eval_prompts, rng)
    train = {"benign": [p for i, pair in enumerate(benign_pairs) if i not in held for p in pair], "harmful": []}
    redteam_eval: list[WorldPrompt] = []
    per_category = [world.redteam_eval_prompts // len(CATEGORY_NAMES)] * len(CATEGORY_NAMES)
    for i in range(world.redteam_eval_prompts % len(CATEGORY_NAMES)):
        per_category[i] += 1
    for name, count in zip(CATEGORY_NAMES, per_category, strict=True):
        pairs = _pairs("harmful", {name: lexicon.CATEGORIES[name]})
        chosen, held = _hold_out(pairs, count, rng)
        redteam_eval += chosen
        train["harmful"] += [p for i, pair in enumerate(pairs) if i not in held for p in pair]
    return train, helpful_eval, redteam_eval


def _harmful_response(intent: Intent, world: WorldParams, rng: random.Random) -> list[str]:
    b = world.harmful
    u = rng.random()
    if u < b.refuse:
        answer = [rng.choice(lexicon.REFUSALS)]
        return [*answer, rng.choice(lexicon.REDIRECTIONS)] if rng.random() < 0.5 else answer
    if u < b.refuse + b.redirect:
        return [rng.choice(lexicon.REDIRECTIONS)]
    spec = lexicon.CATEGORIES[intent.name]
    sentences = [rng.choice(lexicon.FILLERS)] if rng.random() < b.filler else []
    mild, moderate = list(spec["mild"]), list(spec["moderate"])
    rng.shuffle(mild)
    rng.shuffle(moderate)
    catastrophe_done = False
    for _ in range(rng.randint(1, b.max_steps)):
        pool = moderate if (rng.random() < b.severe_step and moderate) or not mild else mild
        if not pool:
            break
        sentences.append(pool.pop().format(obj=intent.obj))
        if not catastrophe_done and rng.random() < b.catastrophe:
            sentences.append(rng.choice(spec["catastrophic"]).format(obj=intent.obj))
            catastrophe_done = True
    return sentences


def _benign_response(intent: Intent, world: WorldParams, rng: random.Random) -> list[str]:
    b = world.benign
    if rng.random() < b.needless_refusal:
        return [rng.choice(lexicon.REFUSALS)]
    steps = lexicon.TOPICS[intent.name]["steps"]
    sentences = [rng.choice(lexicon.FILLERS)] if rng.random() < b.filler else []
    sentences += [step.format(obj=intent.obj) for step in steps[: rng.randint(1, min(b.max_steps, len(steps)))]]
    if rng.random() < b.off_topic:
        other = lexicon.TOPICS[rng.choice([t for t in TOPIC_NAMES if t != intent.name])]
        off = rng.choice(other["steps"]).format(obj=rng.choice(other["objects"]))
        sentences.insert(rng.randint(0, len(sentences)), off)
    return sentences


def sample_response(intent: Intent, world: WorldParams, rng: random.Random) -> str:
    """One response of the world's SFT-like behaviour to a prompt of this intent."""
    respond = _harmful_response if intent.kind == "harmful" else _benign_response
    return " ".join(respond(intent, world, rng))


def _draw_prompt(train: dict[str, list[WorldPrompt]], world: WorldParams, rng: random.Random) -> WorldPrompt:
    return rng.choice(train["harmful"] if rng.random() < world.harmful_fraction else train["benign"])


def _bradley_terry(score_0: float, score_1: float, temperature: float, noise: float, rng: random.Random) -> int:
    """0 or 1: the preferred response, P(0) = sigmoid((s0 - s1) / T), then flipped with probability noise."""
    p0 = 1.0 / (1.0 + math.exp(-max(min((score_0 - score_1) / temperature, 50.0), -50.0)))
    preferred = 0 if rng.random() < p0 else 1
    return 1 - preferred if rng.random() < noise else preferred


def _oracle_fields(prefix: str, j: Judgement) -> dict[str, Any]:
    return {f"{prefix}reward": j.reward, f"{prefix}cost": j.cost, f"{prefix}severity_level": j.severity}


def build_world(world: WorldParams, seed: int) -> World:
    """The world's SFT rows, preference rows and held-out prompt sets, deterministic in seed."""
    rng = random.Random(seed)
    train, helpful_eval, redteam_eval = split_prompts(world, rng)
    out = World()
    out.helpful_eval = [{"prompt": p.text, "topic": p.intent.name, "category": None} for p in helpful_eval]
    out.redteam_eval = [{"prompt": p.text, "category": p.intent.name} for p in redteam_eval]
    for _ in range(world.sft_examples):
        prompt = _draw_prompt(train, world, rng)
        response = sample_response(prompt.intent, world, rng)
        j = judge(prompt.text, response, world.reward, world.cost_weights)
        category = prompt.intent.name if prompt.intent.kind == "harmful" else None
        out.sft.append({"prompt": prompt.text, "response": response, "category": category, **_oracle_fields("", j)})
    labels = world.labels
    for _ in range(world.preference_pairs):
        prompt = _draw_prompt(train, world, rng)
        responses = [sample_response(prompt.intent, world, rng) for _ in range(2)]
        j0, j1 = (judge(prompt.text, r, world.reward, world.cost_weights) for r in responses)
        out.preferences.append(
            {
                "prompt": prompt.text,
                "response_0": responses[0],
                "response_1": responses[1],
                "is_response_0_safe": j0.is_safe,
                "is_response_1_safe": j1.is_safe,
                "better_response_id": _bradley_terry(
                    j0.reward, j1.reward, labels.reward_temperature, labels.noise, rng
                ),
                "safer_response_id": _bradley_terry(-j0.cost, -j1.cost, labels.cost_temperature, labels.noise, rng),
                "category": prompt.intent.name if prompt.intent.kind == "harmful" else None,
                "prompt_kind": prompt.intent.kind,
                **_oracle_fields("response_0_", j0),
                **_oracle_fields("response_1_", j1),
            }
        )
    return out
