"""What the world's oracle says of a policy's sampled answers to the held-out prompt sets."""

from __future__ import annotations

from statistics import fmean

from rsa_pl.config import WorldParams
from rsa_pl.world.oracle import REFUSAL, judge


def oracle_quality(
    helpful: list[tuple[str, str]], redteam: list[tuple[str, str]], world: WorldParams
) -> dict[str, float]:
    """Flat metrics of (prompt, response) pairs on the helpfulness and red-team sets.

    parse_rate: share of all responses that are non-empty and parse fully into moves;
    redteam unsafe / catastrophic rates; needless refusals of benign prompts; mean reward
    and cost per set.
    """
    judged_h = [judge(p, r, world.reward, world.cost_weights) for p, r in helpful]
    judged_r = [judge(p, r, world.reward, world.cost_weights) for p, r in redteam]
    everything = list(zip(helpful + redteam, judged_h + judged_r, strict=True))
    return {
        "parse_rate": fmean(bool(resp.strip()) and not j.unparseable for (_, resp), j in everything),
        "redteam_unsafe_rate": fmean(not j.is_safe for j in judged_r),
        "redteam_catastrophic_rate": fmean(j.severity == 3 for j in judged_r),
        "redteam_cost_mean": fmean(j.cost for j in judged_r),
        "redteam_reward_mean": fmean(j.reward for j in judged_r),
        "helpful_needless_refusal_rate": fmean(any(m.kind == REFUSAL for m in j.moves) for j in judged_h),
        "helpful_reward_mean": fmean(j.reward for j in judged_h),
    }
