"""reports/embedded.md and its figures from runs.json (experiments/embedded.py `report`).

write: runs.json (collect's dict) -> reports/embedded.md and reports/embedded/*.png, with nothing
but runs.json and experiments/discussion.md as input, so it regenerates exactly. Every number the
prose states about the runs (betas, alpha, lr, seeds, the t rule, the worlds) is read from the
runs' params and metrics (experiments/stats.py); method labels are grid.py's.

The questions, each a section and a figure: the headline (each reading of the measure against
TDPO, paired by seed, and the control), the anchoring curves (the tail against stage 2's KL to
the stage-1 policy, and the tail at matched drift), the decision-point probabilities, and the
sharp world.

The report's public surface is this module's collect (experiments/collect.py's) and write.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt

from experiments.collect import cvar_key, normalise, policy_name, train_metric
from experiments.grid import ANCHORING, HEADLINE, HEADLINE_LABELS, METHODS, SETTINGS, Method
from experiments.stats import (
    LEVEL,
    LOG_KEYS,
    Runs,
    classify,
    lower_is_better,
    mean_sd,
    paired_ci,
    resolvable_effect,
    scaled,
)

__all__ = ["write"]

STAGES = ("train_reward", "train_safety")
TAIL_LEVEL = 0.05  # the CVaR the figures and the verdict read (the table has every level)
# (key in eval/metrics.json after "<policy>.", column, format); cost CVaR columns are added per tail level
BASE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("helpful_win_rate", "helpful win", ".3f"),
    ("harmless_win_rate", "harmless win", ".3f"),
    ("reward_mean", "reward", ".2f"),
    ("cost_mean", "cost", ".2f"),
    ("unsafe_rate", "unsafe", ".3f"),
)
TRAILING_METRICS: tuple[tuple[str, str, str], ...] = (
    ("severe_rate", "catastrophic", ".4f"),
    ("catastrophe_prob", "P(catastrophe) at decision points", ".2e"),
    ("needless_refusal_rate", "needless refusal", ".3f"),
    ("length_mean", "length", ".1f"),
    ("kl_to_sft", "KL to SFT", ".2f"),
    ("kl_to_stage1", "KL to stage 1", ".2f"),
)
TDPO_LABEL = HEADLINE_LABELS["tdpo"]
CONTROL_LABEL = HEADLINE_LABELS["rsa-cvar-1"]
TAIL_KEYS = ("severe_rate", "catastrophe_prob")  # with the CVaRs: what "the tail" means in the verdict
DRIFT = "kl_to_stage1"


def _delta(key: str, runs: Runs) -> tuple[str, str]:
    """A difference's column title and format."""
    return (f"Δ log10 {_name(key, runs)}", ".2f") if key in LOG_KEYS else (f"Δ {_name(key, runs)}", _fmt(key, runs))


def _metrics(runs: Runs) -> list[tuple[str, str, str]]:
    return [
        *BASE_METRICS,
        *((cvar_key(t), f"CVaR{t * 100:g}% cost", ".2f") for t in runs.tail_levels),
        *TRAILING_METRICS,
    ]


def _name(key: str, runs: Runs) -> str:
    return next(column for k, column, _ in _metrics(runs) if k == key)


def _fmt(key: str, runs: Runs) -> str:
    return next(fmt for k, _, fmt in _metrics(runs) if k == key)


def _tail_keys(runs: Runs) -> list[str]:
    return [*(cvar_key(t) for t in runs.tail_levels), *TAIL_KEYS]


def _cvar(runs: Runs) -> str:
    """The CVaR the figures read: TAIL_LEVEL's, or the smallest level the runs have."""
    levels = runs.tail_levels
    return cvar_key(TAIL_LEVEL if TAIL_LEVEL in levels else (levels[-1] if levels else TAIL_LEVEL))


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def _cell(values: Sequence[float], fmt: str) -> str:
    mean, sd = mean_sd(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{fmt}}" if math.isnan(sd) else f"{mean:{fmt}} ± {sd:{fmt}}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "l") -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---" if align == "l" or i == 0 else "---:" for i in range(len(header))]) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _method(label: str, group: str = "headline") -> Method:
    return next(m for m in METHODS if m.label == label and m.group == group)


def _group(group: str) -> list[Method]:
    return [m for m in METHODS if m.group == group]


def _stage2(group: str) -> list[Method]:
    """The stage-2 policies of the group's headline settings, TDPO first."""
    return [m for m in _group(group) if m.policy == "safety" and m.label in HEADLINE_LABELS.values()]


def method_table(runs: Runs, methods: Sequence[Method]) -> str:
    metrics = _metrics(runs)
    header = ["method", "seeds", *(column for _, column, _ in metrics)]
    rows = [
        [
            m.label,
            str(len(runs.values(m, "unsafe_rate"))),
            *(_cell(runs.values(m, key), fmt) for key, _, fmt in metrics),
        ]
        for m in methods
        if runs.values(m, "unsafe_rate")
    ]
    return _table(header, rows, align="r")


def _difference_cell(diffs: Sequence[float], fmt: str, lower: bool) -> str:
    mean, lo, hi = paired_ci(diffs)
    if math.isnan(mean):
        return "n/a"
    better = sum(1 for d in diffs if (d < 0 if lower else d > 0))
    ci = "" if math.isnan(lo) else f" [{lo:{fmt}}, {hi:{fmt}}]"
    return f"{mean:+{fmt}}{ci} ({better}/{len(diffs)})"


COMPARED = ("helpful_win_rate", "harmless_win_rate", "unsafe_rate", DRIFT)


def _compared(runs: Runs) -> list[tuple[str, str, str]]:
    keys = {*COMPARED, *_tail_keys(runs)}
    return [m for m in _metrics(runs) if m[0] in keys]


def comparison_table(runs: Runs, pairs: Sequence[tuple[Method, Method]]) -> str:
    metrics = _compared(runs)
    header = ["A", "B", *(_delta(key, runs)[0] for key, _, _ in metrics)]
    rows = [
        [
            a.label,
            b.label,
            *(
                _difference_cell(runs.paired(a, b, key), _delta(key, runs)[1], lower_is_better(key))
                for key, _, _ in metrics
            ),
        ]
        for a, b in pairs
        if runs.paired(a, b, "unsafe_rate")
    ]
    return _table(header, rows, align="r")


def _classes(diffs_of: dict[str, list[float]]) -> dict[str, str]:
    return {key: classify(diffs, key) for key, diffs in diffs_of.items()}


def _verdict_words(classes: dict[str, str], tail: Sequence[str], n: int, against: str) -> str:
    """One clause from the classes of the tail metrics and of the helpful win rate."""
    better = [k for k in tail if classes.get(k) == "better"]
    worse = [k for k in tail if classes.get(k) == "worse"]
    helpful = classes.get("helpful_win_rate", "unclear")
    cost = {"better": ", and **more helpful**", "worse": ", but **less helpful**"}.get(helpful, "")
    if better and not worse:
        return f"**lighter tail than {against}**{cost}"
    if worse and not better:
        return f"**heavier tail than {against}**{cost}"
    if better and worse:
        return f"mixed: lighter on some tail metrics, heavier on others{cost}"
    return f"no tail difference from {against} that {n} seeds can resolve{cost}"


def verdict_lines(runs: Runs, group: str) -> list[str]:
    """Each stage-2 RSA method of the group against TDPO at equal alpha, from the paired intervals."""
    tdpo = _method(TDPO_LABEL, group)
    tail = _tail_keys(runs)
    lines = []
    for method in _stage2(group):
        if method.label == TDPO_LABEL:
            continue
        n = len(runs.paired(method, tdpo, "unsafe_rate"))
        if n < 2:
            lines.append(f"- {method.label}: {n} seed(s) paired with TDPO so far; no verdict.")
            continue
        classes = _classes({key: runs.paired(method, tdpo, key) for key in (*tail, "unsafe_rate", "helpful_win_rate")})
        drift = paired_ci(runs.paired(method, tdpo, DRIFT))[0]
        anchors = "" if math.isnan(drift) else f"; stage 2's KL to stage 1 {drift:+.2f} against TDPO's"
        parts = ", ".join(f"{_name(k, runs)} {v}" for k, v in classes.items())
        lines.append(f"- {method.label}: {_verdict_words(classes, tail, n, 'TDPO')} ({parts}{anchors}).")
    return lines


def control_check(runs: Runs) -> str:
    """The control (cvar mu = 1, the KL) against TDPO: the largest difference of any metric, any seed."""
    control, tdpo = _method(CONTROL_LABEL), _method(TDPO_LABEL)
    worst: tuple[float, str, str, int] | None = None
    compared = 0
    for policy in ("reward", "safety"):
        for seed in runs.seeds():
            a, b = runs.record(control.setting, seed), runs.record(tdpo.setting, seed)
            if a is None or b is None:
                continue
            for key, value in a["eval"].items():
                if not key.startswith(f"{policy}.") or key.count(".") != 1 or key not in b["eval"]:
                    continue
                compared += 1
                gap = abs(float(value) - float(b["eval"][key]))
                scale = max(abs(float(value)), abs(float(b["eval"][key])), 1e-12)
                if worst is None or gap / scale > worst[0]:
                    worst = (gap / scale, key, f"{float(value):.6g} against {float(b['eval'][key]):.6g}", seed)
    if worst is None:
        return "The control has not run yet."
    relative, key, values, seed = worst
    keys = ("helpful_win_rate", _cvar(runs), "severe_rate", "catastrophe_prob", DRIFT)
    gaps = []
    for k in keys:
        diffs = runs.paired(control, tdpo, k)
        if diffs:
            gaps.append(f"{_delta(k, runs)[0]} {max(diffs, key=abs):+.2g}")
    return (
        f"The control, RSA with cvar at mu = 1 (the CVaR of the whole distribution is its mean: the KL), trained "
        f"and evaluated like every RSA run, against TDPO: over {compared} metric values (stage 1 and stage 2, every "
        f"seed both finished), the largest relative difference is {relative:.2e}, at `{key}` (seed {seed}: "
        f"{values}); the largest stage-2 differences of the verdict's metrics over the seeds: {', '.join(gaps)}. "
        "The two losses are equal in exact arithmetic; in floats the CVaR path (a threshold search, weights "
        "pi_ref / mu) and the KL's closed form round differently, and sampled answers amplify a last-bit "
        "difference in the weights into a different sample now and then."
    )


# --- matched drift -------------------------------------------------------------------------------

ANCHOR_CURVES = {  # measure -> the stage-2 settings of its curve (headline alpha 0.5 plus the anchoring runs)
    label: [name] + [s.name for s in ANCHORING if s.name.rsplit("-a", 1)[0] == name]
    for name, label in HEADLINE_LABELS.items()
    if any(s.name.rsplit("-a", 1)[0] == name for s in ANCHORING)
}


def _curve(runs: Runs, settings: Sequence[str], seed: int, key: str) -> list[tuple[float, float]]:
    """(KL to stage 1, key) of each setting's stage-2 policy at this seed, sorted by KL."""
    points = []
    for name in settings:
        record = runs.record(name, seed)
        if record is None:
            continue
        drift, value = record["eval"].get(f"safety.{DRIFT}"), record["eval"].get(f"safety.{key}")
        if drift is not None and value is not None:
            points.append((float(drift), scaled(key, float(value))))
    return sorted(points)


def _interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """The curve's value at x by linear interpolation; None outside its range (no extrapolation)."""
    if len(curve) < 2 or not curve[0][0] <= x <= curve[-1][0]:
        return None
    xs, ys = zip(*curve, strict=True)
    return float(np.interp(x, xs, ys))


def matched_differences(runs: Runs, measure: Sequence[str], reference: Sequence[str], key: str) -> list[float]:
    """Per seed, the measure's key minus the reference's at the same KL to stage 1: each of one curve's
    points inside the other's KL range against the other interpolated there, averaged within the seed
    (a probability in LOG_KEYS as log10, interpolated in log10)."""
    out = []
    for seed in runs.seeds():
        mine, theirs = _curve(runs, measure, seed, key), _curve(runs, reference, seed, key)
        diffs = [y - t for x, y in mine if (t := _interpolate(theirs, x)) is not None]
        diffs += [m - y for x, y in theirs if (m := _interpolate(mine, x)) is not None]
        if diffs:
            out.append(float(np.mean(diffs)))
    return out


def matched_table(runs: Runs) -> str:
    tdpo = ANCHOR_CURVES[TDPO_LABEL]
    keys = [k for k in (*_tail_keys(runs), "unsafe_rate", "helpful_win_rate") if k != "cost_mean"]
    rows = []
    for label, settings in ANCHOR_CURVES.items():
        if label == TDPO_LABEL:
            continue
        cells = [_difference_cell(matched_differences(runs, settings, tdpo, k), _delta(k, runs)[1], lower_is_better(k))
                 for k in keys]  # fmt: skip
        rows.append([label.split(" (")[0], *cells])
    return _table(["measure (curve) against TDPO's curve", *(_delta(k, runs)[0] for k in keys)], rows, align="r")


def matched_lines(runs: Runs) -> list[str]:
    tdpo = ANCHOR_CURVES[TDPO_LABEL]
    tail = [k for k in _tail_keys(runs)]
    lines = []
    for label, settings in ANCHOR_CURVES.items():
        if label == TDPO_LABEL:
            continue
        diffs = {k: matched_differences(runs, settings, tdpo, k) for k in (*tail, "helpful_win_rate")}
        n = min(len(d) for d in diffs.values())
        if n < 2:
            lines.append(f"- {label}: its curve and TDPO's overlap in KL on {n} seed(s); no verdict.")
            continue
        classes = _classes(diffs)
        parts = ", ".join(f"{_name(k, runs)} {v}" for k, v in classes.items())
        lines.append(f"- {label}, at matched drift: {_verdict_words(classes, tail, n, 'TDPO')} ({parts}).")
    return lines


def anchoring_table(runs: Runs) -> str:
    keys = [DRIFT, "kl_to_sft", "helpful_win_rate", "unsafe_rate", _cvar(runs), "severe_rate", "catastrophe_prob"]
    rows = []
    for label, settings in ANCHOR_CURVES.items():
        for name in settings:
            setting = next(s for s in SETTINGS if s.name == name)
            method = Method(label, name, "safety", "anchoring")
            rows.append([label.split(" (")[0], f"{setting.stage2.alpha:g}", str(len(runs.values(method, DRIFT))),
                         *(_cell(runs.values(method, k), _fmt(k, runs)) for k in keys)])  # fmt: skip
    return _table(["measure", "stage 2 alpha", "seeds", *(_name(k, runs) for k in keys)], rows, align="r")


# --- figures -------------------------------------------------------------------------------------

COLOURS = {
    "tdpo": "tab:purple",
    "rsa-cvar-0.95": "tab:red",
    "rsa-cvar-1": "tab:gray",
    "rsa-cvar_lower-0.9": "tab:blue",
    "rsa-cvar_lower-0.95": "tab:cyan",
    "rsa-erm_lower-0.5": "tab:green",
    "rsa-cvar_radpo-0.95": "tab:orange",
    "rsa-cvar-0.95-safety-first": "tab:brown",
}
MARKERS = {"sft": "s", "reward": "^", "safety": "o", "q0_5": "D"}


def _colour(method: Method) -> str:
    if method.policy == "sft":
        return "black"
    return COLOURS.get(method.setting.removeprefix("sharp-"), "tab:gray")


def _errorbar(axis, runs: Runs, method: Method, x_key: str, y_key: str, label: str, log_x: bool = False) -> bool:
    xs, ys = runs.values(method, x_key), runs.values(method, y_key)
    if not xs or not ys:
        return False
    (mx, sx), (my, sy) = mean_sd(xs), mean_sd(ys)
    axis.errorbar(mx, my, xerr=0 if math.isnan(sx) else sx, yerr=0 if math.isnan(sy) else sy,
                  fmt=MARKERS.get(method.policy, "o"), ms=6, capsize=2, color=_colour(method), label=label)  # fmt: skip
    return True


def frontier_figure(runs: Runs, group: str, path: Path, title: str) -> None:
    """One question: where each method lands, helpfulness against the cost tail and against the
    decision-point probability; labels through the legend."""
    cvar = _cvar(runs)
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for axis, (x_key, x_label) in zip(axes, ((cvar, f"{_name(cvar, runs)} (sampled red-team answers)"),
                                             ("catastrophe_prob", "P(catastrophe) at the decision points (exact)")),
                                      strict=True):  # fmt: skip
        for method in _group(group):
            _errorbar(axis, runs, method, x_key, "helpful_win_rate", method.label)
        axis.set_xlabel(x_label + "  (left is safer)")
        axis.set_ylabel("helpful win rate vs SFT (greedy)")
        axis.grid(alpha=0.3)
        if x_key == "catastrophe_prob":
            axis.set_xscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"{title} (mean ± sd over seeds; markers: square SFT, triangle stage 1, circle stage 2, "
                    "diamond RSA(P) q=0.5)", fontsize=10)  # fmt: skip
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def anchoring_figure(runs: Runs, path: Path) -> None:
    """The tail against stage 2's KL to the stage-1 policy: one curve per measure, over alpha."""
    keys = (_cvar(runs), "severe_rate", "catastrophe_prob", "helpful_win_rate")
    figure, axes = plt.subplots(1, len(keys), figsize=(18, 4.8))
    for axis, key in zip(axes, keys, strict=True):
        for label, settings in ANCHOR_CURVES.items():
            points = []
            for name in settings:
                method = Method(label, name, "safety", "anchoring")
                xs, ys = runs.values(method, DRIFT), runs.values(method, key)
                if xs and ys:
                    points.append((mean_sd(xs), mean_sd(ys), next(s for s in SETTINGS if s.name == name).stage2.alpha))
            if not points:
                continue
            points.sort(key=lambda p: p[0][0])
            colour = COLOURS[settings[0]]
            axis.plot(
                [p[0][0] for p in points], [p[1][0] for p in points], "-o", color=colour, label=label.split(" (")[0]
            )
            for (mx, sx), (my, sy), _ in points:
                axis.errorbar(mx, my, xerr=0 if math.isnan(sx) else sx, yerr=0 if math.isnan(sy) else sy,
                              color=colour, alpha=0.4, capsize=2)  # fmt: skip
        axis.set_xlabel("stage 2's KL to the stage-1 policy (sampled)")
        axis.set_ylabel(_name(key, runs))
        if key == "catastrophe_prob":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    figure.suptitle(
        "Anchoring curves: stage 2's alpha swept per measure (left to right: more anchoring to less); "
        "a measure below TDPO's curve at the same KL suppresses the tail better",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def pooled_ccdf(runs: Runs, method: Method) -> list[tuple[float, float]]:
    """P(cost >= c) over every seed's sampled red-team answers (seeds weigh equally: same counts)."""
    policy = policy_name(method.policy)
    curves = []
    for seed in runs.seeds():
        record = runs.record(method.setting, seed)
        if record is not None and policy in record["cost_tail"]:
            curves.append(sorted(record["cost_tail"][policy]))
    if not curves:
        return []
    levels = sorted({c for curve in curves for c, _ in curve})

    def at(curve: list[list[float]], c: float) -> float:
        later = [p for level, p in curve if level >= c]
        return later[0] if later else 0.0

    return [(c, sum(at(curve, c) for curve in curves) / len(curves)) for c in levels]


def tail_figure(runs: Runs, path: Path) -> None:
    groups = [g for g in ("headline", "sharp") if any(runs.values(m, "unsafe_rate") for m in _group(g))]
    figure, axes = plt.subplots(1, max(len(groups), 1), figsize=(7 * max(len(groups), 1), 5), squeeze=False)
    for axis, group in zip(axes[0], groups, strict=False):
        for method in [_method("SFT", group), *_stage2(group)]:
            curve = pooled_ccdf(runs, method)
            if curve:
                axis.step([c for c, _ in curve], [p for _, p in curve], where="post", label=method.label,
                          color=_colour(method))  # fmt: skip
        axis.set_yscale("log")
        axis.set_xlabel("cost of a sampled red-team answer")
        axis.set_ylabel("P(cost >= c), pooled over seeds")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
        axis.set_title(f"The red-team cost tail: {_WORLDS[group]}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


_WORLDS = {"headline": "the committed world", "sharp": "the sharp world"}


def _categories(runs: Runs) -> list[str]:
    return sorted({c for r in runs.experiments.values() for p in r["per_category"].values() for c in p})


def category_table(runs: Runs, key: str, fmt: str) -> str:
    methods = [_method("SFT"), *_stage2("headline")]
    rows = []
    for category in _categories(runs):
        cells = []
        for method in methods:
            policy = policy_name(method.policy)
            values = [
                float(record["per_category"][policy][category][key])
                for seed in runs.seeds()
                if (record := runs.record(method.setting, seed)) is not None
                and category in record["per_category"].get(policy, {})
                and key in record["per_category"][policy][category]
            ]
            cells.append(_cell(values, fmt))
        rows.append([category, *cells])
    return _table(["category", *(m.label.split(" (")[0] for m in methods)], rows, align="r")


# --- setup, cost, assembly ----------------------------------------------------------------------


def _train_s(record: dict) -> float | None:
    """Both stages' time/train_s (None unless both are recorded)."""
    times = [train_metric(record, stage, "time/train_s") for stage in STAGES]
    return None if None in times else sum(t for t in times if t is not None)


def _world(runs: Runs, group: str) -> str:
    settings = [m.setting for m in _group(group)]
    if not runs.records(settings):
        return "no runs yet"
    p = lambda key: runs.param(key, settings)  # noqa: E731
    helpful = p("prepare.world.reward.catastrophe_helpful")
    return (
        f"catastrophe probability {p('prepare.world.harmful.catastrophe')} after a harmful step, a catastrophic "
        f"step {'counted' if helpful in (True, None) else 'not counted'} as a helpful step by the oracle"
    )


def _setup(runs: Runs) -> str:
    p = runs.param
    n = len(runs.experiments)
    train_s = sum(t for r in runs.experiments.values() if (t := _train_s(r)) is not None)
    headline = [s.name for s in HEADLINE]
    seeds = {g: sorted({int(r["seed"]) for r in runs.records([s.name for s in SETTINGS if s.group == g])})
             for g in ("headline", "anchoring", "sharp")}  # fmt: skip
    return (
        f"- Worlds: the committed embedded world (`params.yaml`: {p('prepare.world.preference_pairs', headline)} "
        f"preference rows, {p('prepare.world.sft_examples', headline)} SFT examples, "
        f"{p('prepare.world.helpful_eval_prompts', headline)} benign and "
        f"{p('prepare.world.redteam_eval_prompts', headline)} red-team eval prompts, cost weights "
        f"{p('prepare.world.cost_weights', headline)}; {_world(runs, 'headline')}), "
        f"and the sharp world (`configs/sharp.yaml`: {_world(runs, 'sharp')}), each with its own SFT model. "
        "Reward and cost are the oracle's exact values.\n"
        f"- Model: a {p('sft.model.architecture')} of hidden size {p('sft.model.hidden_size')}, "
        f"{p('sft.model.num_layers')} layers, trained from scratch by the sft stage; every method and seed of a "
        "world starts from the same SFT model.\n"
        f"- Stages: LoRA r {runs.both_stages('lora.r')}, {runs.both_stages('train.max_epochs')} epochs, batch "
        f"{runs.both_stages('train.batch_size')}, lr {runs.both_stages('train.lr')}; beta_1 "
        f"{_num(runs.stage_param('helpful', 'beta'))}, beta_2 {_num(runs.stage_param('safety', 'beta'))}, alpha "
        f"{_num(runs.both_stages('alpha', headline))} in both stages unless the method says otherwise. Both stages "
        "use the method's loss and measure (RSA: the risk measure in stage 1 and stage 2).\n"
        f"- Evaluation: greedy answers (win rates against SFT's, tie = 0.5) and {p('evaluate.samples_per_prompt')} "
        f"sampled answers per prompt at temperature {p('evaluate.temperature')} (rates, means, CVaRs and KLs over "
        "the samples), and the exact probability of a catastrophe at the world's decision points (teacher forcing; "
        "`rsa_pl/evaluation/decisions.py`).\n"
        f"- Seeds: headline {_seeds(seeds['headline'])}, anchoring {_seeds(seeds['anchoring'])}, sharp world "
        f"{_seeds(seeds['sharp'])}; a seed sets both stages' data order and LoRA initialisation (`train.seed`) and "
        "the evaluation's sampling (`evaluate.seed`).\n"
        f"- {n} experiments; training time summed over them: {train_s / 3600:.2f} h (both stages, as each run "
        "recorded it; evaluation not included)."
    )


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds)) if seeds else "none yet"


def cost_section(runs: Runs, benchmarks: Path) -> str:
    parts = []
    bench = benchmarks / "experiment_cost.json"
    if bench.exists():
        data = json.loads(bench.read_text())
        rows = [[r["what"], f"{r['wall_s']:.0f}", f"{r['ratio']:.2f}"] for r in data["rows"]]
        parts.append(
            f"One experiment's evaluation, before and after `evaluate.policies` (`{data['command']}`, "
            f"{data['threads']} thread(s), one process after another on {data['machine']}):\n\n"
            + _table(["evaluate", "wall s", "x every policy"], rows, align="r")
        )
    table = []
    for setting in SETTINGS:
        times = [t for seed in setting.seeds if (r := runs.record(setting.name, seed)) is not None
                 and (t := _train_s(r)) is not None]  # fmt: skip
        if times:
            table.append([setting.name, setting.group, str(len(times)), _cell(times, ".0f")])
    parts.append(
        "Training time per experiment (both stages' `time/train_s`, seconds; two to four experiments ran at once "
        "on 2 cores, one thread each, so these carry their neighbours' load; an anchoring run's stage 1 is restored "
        "from DVC's run-cache, so its time is stage 1's recorded one, not spent again, and the sum in the setup "
        "counts it twice):\n\n" + _table(["setting", "group", "runs", "train s"], table, align="r")
    )
    return "\n\n".join(parts)


DISCUSSION = Path(__file__).with_name("discussion.md")


def runs_digest(runs: dict[str, Any]) -> str:
    """A short digest of the runs' evaluation metrics: the discussion names the runs it reads."""
    evaluation = {name: record["eval"] for name, record in sorted(normalise(runs)["experiments"].items())}
    return hashlib.sha256(json.dumps(evaluation, sort_keys=True).encode()).hexdigest()[:16]


def write(runs: dict[str, Any], reports: Path, benchmarks: Path | None = None) -> Path:
    """reports/embedded.md and reports/embedded/*.png from runs (collect's dict)."""
    view = Runs(runs)
    figures = reports / "embedded"
    figures.mkdir(parents=True, exist_ok=True)
    for stale in ("frontier.png",):  # round 1's figure, replaced by one panel per question
        (figures / stale).unlink(missing_ok=True)
    frontier_figure(view, "headline", figures / "headline.png", "Headline, the committed world")
    frontier_figure(view, "sharp", figures / "sharp.png", "The sharp world")
    anchoring_figure(view, figures / "anchoring.png")
    tail_figure(view, figures / "cost_tail.png")
    benchmarks = benchmarks or reports.parent / "benchmarks" / "results"
    digest = runs_digest(runs)
    discussion = ""
    if DISCUSSION.exists():
        text = DISCUSSION.read_text()
        stale = f"runs: {digest}" not in text
        note = (
            "> **This discussion was written for other runs than the tables above** (its `runs:` digest differs from "
            f"`{digest}`); read the tables, not the prose, until it is rewritten.\n\n"
            if stale
            else ""
        )
        discussion = note + text
    rule = f" (3 seeds: |mean| > {resolvable_effect(3):.2f} sd; 5 seeds: > {resolvable_effect(5):.2f} sd)"
    tdpo = _method(TDPO_LABEL)
    headline = _group("headline")
    sections = [
        "# Does RSA suppress the tail? The embedded world, round 2\n",
        "Generated by `python experiments/embedded.py report` from `reports/embedded/runs.json` (which "
        "`python experiments/embedded.py run` fills from the DVC experiments); do not edit by hand. "
        f"Runs digest `{digest}`.\n",
        "## Setup\n\n" + _setup(view),
        "## Verdict, from the paired intervals alone\n\n"
        "'better'/'worse': the two-sided "
        f"{LEVEL * 100:g}% Student-t interval of the per-seed difference excludes zero{rule}; 'unclear' otherwise. "
        "The tail is the CVaRs of the sampled red-team cost, the catastrophic rate and the decision-point "
        "probability.\n\n"
        "At equal alpha, against TDPO (the same token-level loss with the KL in place of the measure), the "
        "committed world:\n\n" + "\n".join(verdict_lines(view, "headline")) + "\n\n"
        "At matched drift (each measure's anchoring curve against TDPO's at the same KL to stage 1):\n\n"
        + "\n".join(matched_lines(view))
        + "\n\nAt equal alpha, against TDPO, the sharp world:\n\n"
        + "\n".join(verdict_lines(view, "sharp"))
        + "\n\n"
        + control_check(view),
        discussion,
        "## Headline: every method, the committed world (mean ± sd over seeds)\n\n"
        "![headline](embedded/headline.png)\n\n"
        "Win rates: greedy answers against SFT's (tie = 0.5); everything else over the sampled answers: reward on "
        "benign prompts, cost, unsafe (cost > 0), cost CVaR (mean of the worst fraction), catastrophic (a "
        "catastrophic step) on red-team prompts; P(catastrophe) at decision points is exact (no samples); needless "
        "refusal on benign prompts; length in tokens; KL to SFT and to the stage-1 policy from the sampled answers' "
        "log-probabilities.\n\n" + method_table(view, headline),
        "## Headline: paired differences against TDPO\n\n"
        f"A - B per seed: mean, [{LEVEL * 100:g}% t interval], (seeds where A is better). Lower "
        "cost/unsafe/CVaR/catastrophic/probability is better; higher win rate is better; the KL column is not "
        "better or worse, it says which anchors harder.\n\n"
        + comparison_table(view, [(m, tdpo) for m in _stage2("headline") if m.label != TDPO_LABEL]),
        "## Anchoring curves: the tail against stage 2's drift\n\n"
        "![anchoring](embedded/anchoring.png)\n\n"
        "Stage 2's alpha swept with stage 1 fixed at the measure's headline stage 1 (alpha 0.5). An upper-tail "
        "measure is >= KL, so at equal alpha it anchors harder than TDPO; a lower-tail one is <= KL and anchors "
        "less. A measure whose curve lies below TDPO's at the same KL does better than anchoring more or less.\n\n"
        + anchoring_table(view)
        + "\n\nAt matched drift, per seed (each point of one curve inside the other's KL range against the other "
        "interpolated linearly there, averaged; no extrapolation):\n\n" + matched_table(view),
        "## The decision points\n\n"
        "The exact probability that the policy's next sentence is the catastrophe, after one harmful step of the "
        "prompt's category (4 points per red-team prompt), by teacher forcing: the tail probability itself, "
        "without sampling noise. Mean over points (the likeliest points dominate) and geometric mean (the typical "
        "point):\n\n" + decision_table(view),
        "## The sharp world\n\n"
        "![sharp](embedded/sharp.png)\n\n" + method_table(view, _group("sharp")) + "\n\n"
        "Paired against TDPO:\n\n"
        + comparison_table(
            view, [(m, _method(TDPO_LABEL, "sharp")) for m in _stage2("sharp") if m.label != TDPO_LABEL]
        ),
        "## The cost tail and the categories\n\n![cost tail](embedded/cost_tail.png)\n\n"
        f"{_name(_cvar(view), view)} per red-team category, the committed world (mean ± sd over seeds):\n\n"
        + category_table(view, _cvar(view), ".1f")
        + "\n\nCatastrophic rate per category:\n\n"
        + category_table(view, "severe_rate", ".3f"),
        "## What the experiment cost\n\n" + cost_section(view, benchmarks),
    ]
    out = reports / "embedded.md"
    out.write_text("\n\n".join(s.strip() for s in sections if s.strip()) + "\n")
    return out


def decision_table(runs: Runs) -> str:
    rows = []
    for group in ("headline", "sharp"):
        for method in _group(group):
            values = runs.values(method, "catastrophe_prob")
            if values:
                rows.append([_WORLDS[group], method.label, str(len(values)), _cell(values, ".2e"),
                             _cell(runs.values(method, "catastrophe_prob_geomean"), ".2e"),
                             _cell(runs.values(method, "severe_rate"), ".4f")])  # fmt: skip
    return _table(["world", "method", "seeds", "P(catastrophe), mean", "geometric mean", "sampled catastrophic rate"],
                  rows, align="r")  # fmt: skip
