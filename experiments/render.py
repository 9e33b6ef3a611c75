"""reports/embedded.md and its figures from runs.json (experiments/embedded.py `report`).

write: runs.json (collect's dict) -> reports/embedded.md and reports/embedded/*.png, with nothing
but runs.json, experiments/discussion.md and benchmarks/results/ as input, so it regenerates
exactly. Every number the prose states about the runs (betas, alpha, lr, batch, seeds, the t rule)
is read from the runs' params and metrics (experiments/stats.py); method labels are grid.py's names.

The report's public surface is this module's collect (experiments/collect.py's) and write.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt

from experiments.collect import collect, cvar_key, merged_policy, normalise, policy_name, train_metric
from experiments.grid import METHODS, Q_PATH, SEEDS, SETTINGS, Method
from experiments.stats import (
    LEVEL,
    Runs,
    classify,
    lower_is_better,
    mean_sd,
    paired_ci,
    resolvable_effect,
    tail_verdict,
)

__all__ = ["collect", "write"]

# (key in eval/metrics.json after "<policy>.", column, format); cost CVaR columns are added per tail level
BASE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("helpful_win_rate", "helpful win", ".3f"),
    ("harmless_win_rate", "harmless win", ".3f"),
    ("reward_mean", "reward", ".2f"),
    ("cost_mean", "cost", ".2f"),
    ("unsafe_rate", "unsafe", ".3f"),
)
TRAILING_METRICS: tuple[tuple[str, str, str], ...] = (
    ("severe_rate", "catastrophic", ".3f"),
    ("needless_refusal_rate", "needless refusal", ".3f"),
    ("length_mean", "length", ".1f"),
    ("kl_to_sft", "KL to SFT", ".2f"),
)
STAGES = ("train_reward", "train_safety")


def _metrics(runs: Runs) -> list[tuple[str, str, str]]:
    return [
        *BASE_METRICS,
        *((cvar_key(t), f"CVaR{t * 100:g}% cost", ".2f") for t in runs.tail_levels),
        *TRAILING_METRICS,
    ]


def _name(key: str, runs: Runs) -> str:
    return next(column for k, column, _ in _metrics(runs) if k == key)


def _tail_keys(runs: Runs) -> list[str]:
    return [cvar_key(t) for t in runs.tail_levels]


def _sci(x: float | None) -> str:
    """0.002 -> 2e-3, 0.0005 -> 5e-4 (the grid's spelling of a learning rate)."""
    if not isinstance(x, int | float):
        return "n/a"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def _values(values: Iterable[Any]) -> str:
    """The distinct values, in order ("0.5", or "0.25/0.5/1" where runs differ)."""
    return "/".join(dict.fromkeys(_num(v) for v in values if v is not None)) or "n/a"


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


def _method(label: str) -> Method:
    return next(m for m in METHODS if m.label == label)


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
    ]
    return _table(header, rows, align="r")


# The comparisons the verdict rests on: (RSA method, its risk-neutral counterpart)
SACPO = "SACPO (DPO then DPO)"
SACPO_TUNED = "SACPO lr 5e-4"
SACPO_ANCHORED = "SACPO lr 5e-4 beta_2 0.1"  # DPO at lr 5e-4 with stage 2 anchored as hard as stage 1
TDPO = "TDPO then TDPO"
COMPARED_METRICS = ("helpful_win_rate", "harmless_win_rate", "unsafe_rate", "severe_rate")


def _difference_cell(diffs: Sequence[float], fmt: str, lower: bool) -> str:
    mean, lo, hi = paired_ci(diffs)
    if math.isnan(mean):
        return "n/a"
    better = sum(1 for d in diffs if (d < 0 if lower else d > 0))
    ci = "" if math.isnan(lo) else f" [{lo:{fmt}}, {hi:{fmt}}]"
    return f"{mean:+{fmt}}{ci} ({better}/{len(diffs)})"


def comparison_table(runs: Runs, pairs: Sequence[tuple[Method, Method]]) -> str:
    keys = {*COMPARED_METRICS, *_tail_keys(runs), "reward_mean", "cost_mean"}
    metrics = [m for m in _metrics(runs) if m[0] in keys]
    header = ["A", "B", *(f"Δ {column}" for _, column, _ in metrics)]
    rows = [
        [
            a.label,
            b.label,
            *(_difference_cell(runs.paired(a, b, key), fmt, lower_is_better(key)) for key, _, fmt in metrics),
        ]
        for a, b in pairs
    ]
    return _table(header, rows, align="r")


def verdict_lines(runs: Runs, reference: str = SACPO) -> list[str]:
    """One line per RSA method against the reference, from the paired intervals alone."""
    other = _method(reference)
    short = reference.split(" (")[0]
    tail = _tail_keys(runs)
    summaries = {
        "beats": f"**beats {short} on the tail** at no clear cost in helpfulness",
        "lower-but-less-helpful": f"lower tail than {short}, but **less helpful** (not a matched comparison)",
        "heavier-but-more-helpful": f"heavier tail than {short}, but **more helpful** (not a matched comparison)",
        "worse": f"**worse tail than {short}**",
    }
    lines = []
    for method in METHODS:
        if method.group != "RSA" or method.policy not in {"safety"} or "safety first" in method.label:
            continue
        pairs = len(runs.paired(method, other, "unsafe_rate"))
        if pairs < 2:
            lines.append(f"- {method.label}: {pairs} seed(s) paired with {short} so far; no verdict.")
            continue
        verdicts = {
            key: classify(runs.paired(method, other, key), key)
            for key in (*tail, "severe_rate", "unsafe_rate", "helpful_win_rate")
        }
        kind = tail_verdict((verdicts[k] for k in (*tail, "severe_rate")), verdicts["helpful_win_rate"])
        summary = summaries.get(kind, f"no tail difference from {short} that {pairs} seeds can resolve")
        parts = ", ".join(f"{_name(k, runs)} {v}" for k, v in verdicts.items())
        lines.append(f"- {method.label}: {summary} ({parts}).")
    return lines


def q_path_table(runs: Runs, lr: str = "") -> str:
    """P-SACPO against RSA(P) at each q, paired by seed (the frontier at matched q)."""
    pairs = [(_method(f"RSA(P) cvar 0.95 q={q:g}"), _method(f"P-SACPO{lr} q={q:g}")) for q in Q_PATH]
    dpo = f"DPO{lr} (helpfulness only)"
    pairs.insert(0, (_method("RSA stage 1 (cvar 0.95, helpfulness only)"), _method(dpo)))
    pairs.append((_method("RSA cvar mu=0.95"), _method(SACPO_TUNED if lr else SACPO)))
    return comparison_table(runs, pairs)


def frontier_figure(runs: Runs, path: Path) -> None:
    """Helpfulness against harmlessness and against the cost tail: every method, the q paths."""
    tail = _tail_keys(runs)[-1]
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    panels = (
        ("harmless_win_rate", "harmless win rate vs SFT (greedy)"),
        (tail, f"{_name(tail, runs)} (sampled, red team)"),
    )
    paths = {
        "P-SACPO path": ["DPO (helpfulness only)", *(f"P-SACPO q={q:g}" for q in Q_PATH), SACPO],
        "P-SACPO lr 5e-4 path": [
            "DPO lr 5e-4 (helpfulness only)",
            *(f"P-SACPO lr 5e-4 q={q:g}" for q in Q_PATH),
            SACPO_TUNED,
        ],
        "RSA(P) path": [
            "RSA stage 1 (cvar 0.95, helpfulness only)",
            *(f"RSA(P) cvar 0.95 q={q:g}" for q in Q_PATH),
            "RSA cvar mu=0.95",
        ],
    }
    colours = {"P-SACPO path": "tab:blue", "P-SACPO lr 5e-4 path": "tab:green", "RSA(P) path": "tab:red"}
    for axis, (x_key, x_label) in zip(axes, panels, strict=True):
        for name, labels in paths.items():
            xs = [runs.mean(_method(label), x_key) for label in labels]
            ys = [runs.mean(_method(label), "helpful_win_rate") for label in labels]
            axis.plot(xs, ys, "-", color=colours[name], alpha=0.5, label=name)
        for method in METHODS:
            x, y = runs.values(method, x_key), runs.values(method, "helpful_win_rate")
            if not x:
                continue
            (mx, sx), (my, sy) = mean_sd(x), mean_sd(y)
            axis.errorbar(mx, my, xerr=0 if math.isnan(sx) else sx, yerr=0 if math.isnan(sy) else sy, fmt="o", ms=4,
                          capsize=2, color=_colour(method), alpha=0.8)  # fmt: skip
            axis.annotate(_short(method.label), (mx, my), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel(x_label)
        axis.set_ylabel("helpful win rate vs SFT (greedy)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[1].invert_xaxis()  # right = safer in both panels
    figure.suptitle("Helpfulness-harmlessness frontier (mean ± sd over seeds; right and up is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _colour(method: Method) -> str:
    if method.policy == "sft":  # SFT's row is read from the tdpo setting: grey, not TDPO's colour
        return "tab:gray"
    if method.setting.startswith("sacpo-lr5e-4"):
        return "tab:green"
    if method.setting == "tdpo":
        return "tab:purple"
    return "tab:red" if method.group == "RSA" else "tab:blue"


def _short(label: str) -> str:
    return (
        label.replace(" (helpfulness only)", " H")
        .replace("RSA stage 1 (cvar 0.95, helpfulness only)", "RSA H")
        .replace(" (DPO then DPO)", "")
        .replace("RSA cvar 0.95 ", "RSA ")
        .replace(" (stage 1 of the reverse order)", "")
        .replace("safety first, then helpfulness", "S then H")
        .replace("RSA(P) cvar 0.95 safety first, q=0.5", "RSA(P) S then H q=0.5")
    )


TAIL_METHODS = ("SFT", "DPO (helpfulness only)", SACPO, SACPO_TUNED, TDPO, "RSA cvar mu=0.95",
                "RSA erm mu=2", "RSA(P) cvar 0.95 q=0.5", "P-SACPO q=0.5")  # fmt: skip


def pooled_ccdf(runs: Runs, method: Method) -> list[tuple[float, float]]:
    """P(cost >= c) over every seed's sampled red-team answers (seeds weigh equally: same counts)."""
    policy = policy_name(method.policy)
    curves = []
    for seed in SEEDS:
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
    figure, axis = plt.subplots(figsize=(7.5, 5))
    for label in TAIL_METHODS:
        curve = pooled_ccdf(runs, _method(label))
        if curve:
            axis.step([c for c, _ in curve], [p for _, p in curve], where="post", label=label)
    axis.set_yscale("log")
    axis.set_xlabel("cost of a sampled red-team answer")
    axis.set_ylabel("P(cost >= c), pooled over seeds")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    axis.set_title("The red-team cost tail")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


CATEGORY_METHODS = ("SFT", SACPO, SACPO_TUNED, TDPO, "RSA cvar mu=0.95", "RSA cvar mu=0.9", "RSA erm mu=2")


def _categories(runs: Runs) -> list[str]:
    return sorted({c for r in runs.experiments.values() for p in r["per_category"].values() for c in p})


def category_table(runs: Runs, key: str, fmt: str) -> str:
    methods = [_method(label) for label in CATEGORY_METHODS]
    rows = []
    for category in _categories(runs):
        cells = []
        for method in methods:
            policy = policy_name(method.policy)
            values = [
                float(record["per_category"][policy][category][key])
                for seed in SEEDS
                if (record := runs.record(method.setting, seed)) is not None
                and category in record["per_category"].get(policy, {})
            ]
            cells.append(_cell(values, fmt))
        rows.append([category, *cells])
    return _table(["category", *CATEGORY_METHODS], rows, align="r")


# (the param each sweep varies, its methods); the sweep's name states the params it holds fixed
SENSITIVITY = (
    ("mu", ["RSA cvar mu=0.9", "RSA cvar mu=0.95", "RSA cvar mu=0.99"]),
    ("mu", ["RSA erm mu=1", "RSA erm mu=2", "RSA erm mu=5"]),
    ("alpha", ["RSA cvar 0.95 alpha=0.25", "RSA cvar mu=0.95", "RSA cvar 0.95 alpha=1"]),
)


def _sweep_name(runs: Runs, varied: str, labels: Sequence[str]) -> str:
    """ "cvar mu (alpha 0.5)" / "alpha (cvar 0.95)", the fixed values read from the sweep's runs."""
    settings = {_method(label).setting for label in labels}

    def both(key: str) -> str:
        return _values([*runs.stage_values("helpful", key, settings), *runs.stage_values("safety", key, settings)])

    if varied == "mu":
        return f"{both('risk.measure')} mu (alpha {both('alpha')})"
    return f"alpha ({both('risk.measure')} {both('risk.mu')})"


def sensitivity_table(runs: Runs) -> str:
    keys = ["helpful_win_rate", "harmless_win_rate", "unsafe_rate", *_tail_keys(runs), "severe_rate", "kl_to_sft"]
    metrics = [m for m in _metrics(runs) if m[0] in keys]
    rows = []
    for varied, labels in SENSITIVITY:
        sweep = _sweep_name(runs, varied, labels)
        for label in labels:
            method = _method(label)
            rows.append([sweep, label, *(_cell(runs.values(method, key), fmt) for key, _, fmt in metrics)])
    rows.append(["reference", SACPO, *(_cell(runs.values(_method(SACPO), key), fmt) for key, _, fmt in metrics)])
    return _table(["sweep", "method", *(column for _, column, _ in metrics)], rows, align="r")


def q_half_table(runs: Runs) -> str:
    """Every setting's RSA(P)/P-SACPO policy at q = 0.5."""
    methods = [Method(f"{s.name} q=0.5", s.name, merged_policy(0.5), "q") for s in SETTINGS if 0.5 in s.q]
    return method_table(runs, methods)


STEP_METHODS = ("dpo", "tdpo", "rsa-cvar", "rsa-erm", "trl-dpo")


def _train_s(record: dict) -> float | None:
    """Both stages' time/train_s (None unless both are recorded)."""
    times = [train_metric(record, stage, "time/train_s") for stage in STAGES]
    return None if None in times else sum(t for t in times if t is not None)


def step_cost(runs: Runs, benchmarks: Path) -> str:
    """The risk term's step time: benchmarks/results/bench_step.json, and this experiment's stage times."""
    parts = []
    bench = benchmarks / "bench_step.json"
    if bench.exists():
        data = json.loads(bench.read_text())
        meta = data["meta"]
        rows = []
        for size, methods in data["summary"].items():
            dpo = methods["dpo"]["time_s"]
            for name in STEP_METHODS:
                if name in methods:
                    m = methods[name]
                    rows.append([size, name, f"{m['time_s']:.3f}", f"{m['time_s'] / dpo:.2f}", f"{m['peak_mib']:.0f}",
                                 f"{m['time_ratio']:.2f}"])  # fmt: skip
        parts.append(
            f"From `benchmarks/bench_step.py` (benchmarks/results/bench_step.json: {meta.get('machine', '?')}, "
            f"{meta.get('threads', '?')} thread per run, {meta.get('pairs')} pairs x "
            f"({meta.get('prompt_len')} prompt + {meta.get('response_len')} response) tokens, "
            f"LoRA r {meta.get('lora_r')}; median of {meta.get('rounds')} rounds):\n\n"
            + _table(["size", "method", "step (s)", "x rsa-pl dpo", "peak MiB", "x TRL DPOTrainer"], rows, align="r")
        )
    rows = []
    sacpo_times = {}
    for setting in SETTINGS:
        times = {}
        for seed in SEEDS:
            record = runs.record(setting.name, seed)
            if record is not None and (t := _train_s(record)) is not None:
                times[seed] = t
        if setting.name == "sacpo":
            sacpo_times = times
        rows.append((setting, times))
    table = []
    for setting, times in rows:
        ratios = [times[s] / sacpo_times[s] for s in times if s in sacpo_times]
        # stage 2's loss (and risk measure) as its runs were trained; the grid's where none finished
        name = runs.param("train_safety.loss", [setting.name]) or setting.stage2.loss
        measure = runs.param("train_safety.risk.measure", [setting.name]) or setting.stage2.measure
        loss = name if name == "dpo" else f"{name} {measure}"
        table.append([setting.name, loss, _cell(list(times.values()), ".0f"), _cell(ratios, ".2f")])
    parts.append(
        # how many experiments ran at once is not in the runs' records (dvc queue start -j): stated as run
        "In this experiment (both stages' `time/train_s`, seconds; two experiments ran at once on the 2 cores, so "
        "these carry their neighbour's load; x SACPO is per seed):\n\n"
        + _table(["setting", "loss", "train s (both stages)", "x SACPO"], table, align="r")
    )
    return "\n\n".join(parts)


def _setup(runs: Runs) -> str:
    p = runs.param
    n = len(runs.experiments)
    train_s = sum(train_metric(r, stage, "time/train_s") or 0.0 for r in runs.experiments.values() for stage in STAGES)
    beta_1, beta_2 = runs.stage_param("helpful", "beta"), runs.stage_param("safety", "beta")
    return (
        f"- World: the embedded safety world (`prepare.world`): {p('prepare.world.preference_pairs')} preference rows "
        "(each labelled for helpfulness and for safety, PKU-SafeRLHF style), "
        f"{p('prepare.world.sft_examples')} SFT examples, {p('prepare.world.helpful_eval_prompts')} "
        f"benign and {p('prepare.world.redteam_eval_prompts')} red-team eval prompts ({len(_categories(runs))} "
        f"categories), catastrophe probability {p('prepare.world.harmful.catastrophe')} after a harmful step, cost "
        f"weights {p('prepare.world.cost_weights')}. Reward and cost are the oracle's exact values.\n"
        f"- Model: a {p('sft.model.architecture')} of hidden size {p('sft.model.hidden_size')}, "
        f"{p('sft.model.num_layers')} layers, trained from scratch by the sft stage (one SFT model, shared by every "
        "method and seed, as every method in the paper starts from the same SFT model). Not shrunk: the committed "
        "params.yaml's world and model.\n"
        f"- Stages: LoRA r {runs.both_stages('lora.r')}, {runs.both_stages('train.max_epochs')} epochs, batch "
        f"{runs.both_stages('train.batch_size')}, lr {runs.both_stages('train.lr')}; beta_1 {_num(beta_1)}, "
        f"beta_2 {_num(beta_2)}, alpha {_num(runs.both_stages('alpha'))} unless the method says otherwise.\n"
        f"- Evaluation: greedy answers (win rates against SFT's, tie = 0.5) and "
        f"{p('evaluate.samples_per_prompt')} sampled answers per prompt at temperature {p('evaluate.temperature')} "
        "(every rate, mean, CVaR and KL is over the samples).\n"
        f"- Seeds {', '.join(map(str, runs.seeds()))}: stage 1 and 2 data order and LoRA initialisation "
        "(`train.seed`) and the evaluation's sampling (`evaluate.seed`).\n"
        f"- {n} experiments; training time summed over them: {train_s / 3600:.2f} h (both stages; evaluation not "
        "included)."
    )


def _verdicts(runs: Runs) -> str:
    """The verdict section: its rule and its references, each described from the runs' params."""
    n = len(runs.seeds())
    rule = f" (with {n} seeds: |mean| > {resolvable_effect(n):.2f} sd)" if n >= 2 else ""
    sacpo, tuned, anchored = (_method(label).setting for label in (SACPO, SACPO_TUNED, SACPO_ANCHORED))
    lr = runs.both_stages("train.lr", [sacpo])
    grid = {s.name: s for s in SETTINGS}
    default_lr = grid[sacpo].stage1.lr is None and grid[sacpo].stage2.lr is None
    token_level = [
        r["setting"] for r in runs.records() if {r["params"].get(f"{s}.loss") for s in STAGES} & {"rsa", "tdpo"}
    ]
    others = set(
        runs.stage_values("helpful", "train.lr", token_level) + runs.stage_values("safety", "train.lr", token_level)
    )
    shared = (
        "the lr of every RSA and TDPO run"
        if others == {lr}
        else f"RSA and TDPO at {_values(map(_sci, sorted(others)))}"
    )
    tuned_lr = runs.both_stages("train.lr", [tuned])
    step = _ratio_words(lr, tuned_lr)
    beta_tuned, beta_anchored = (
        runs.stage_param("safety", "beta", [tuned]),
        runs.stage_param("safety", "beta", [anchored]),
    )
    beta_1 = runs.stage_param("helpful", "beta", [anchored])
    change = _change_words(beta_tuned, beta_anchored)
    target = f"stage 1's {_num(beta_1)}" if beta_anchored == beta_1 else _num(beta_anchored)
    level = f"{LEVEL * 100:g}%"
    whose = "params.yaml's" if default_lr else "its"
    return (
        "Each RSA variant against SACPO, paired by seed; 'better'/'worse' means the two-sided "
        f"{level} Student-t interval of the per-seed difference excludes zero{rule}, 'unclear' otherwise.\n\n"
        + f"Against SACPO at {whose} lr ({_sci(lr)}, {shared}):\n\n"
        + "\n".join(verdict_lines(runs))
        + f"\n\nAgainst {SACPO_TUNED} (DPO with {step}):\n\n"
        + "\n".join(verdict_lines(runs, SACPO_TUNED))
        + f"\n\nAgainst {SACPO_ANCHORED} (the same, with stage 2's beta {change} to {target}):\n\n"
        + "\n".join(verdict_lines(runs, SACPO_ANCHORED))
        + f"\n\nAgainst {TDPO} (the same token-level loss with the KL in place of the risk measure):\n\n"
        + "\n".join(verdict_lines(runs, TDPO))
    )


def _ratio_words(lr: float | None, other: float | None) -> str:
    """ "a 4x smaller step": other's learning rate against lr."""
    if not isinstance(lr, int | float) or not isinstance(other, int | float) or not lr or not other:
        return "another step"
    ratio = lr / other
    if math.isclose(ratio, 1.0):
        return "the same step"
    return f"a {ratio:.3g}x smaller step" if ratio > 1 else f"a {1 / ratio:.3g}x larger step"


def _change_words(old: float | None, new: float | None) -> str:
    """ "doubled" / "halved" / "x3": new against old."""
    if not isinstance(old, int | float) or not isinstance(new, int | float) or not old:
        return "changed"
    ratio = new / old
    words = {2.0: "doubled", 0.5: "halved", 1.0: "unchanged"}
    return next((w for r, w in words.items() if math.isclose(ratio, r)), f"x{ratio:.3g}")


DISCUSSION = Path(__file__).with_name("discussion.md")
_NEW_MERGED = re.compile(r"^q(\d+)_(\d+)(?=\.|$)")
_NEW_CVAR = re.compile(r"(^|\.)cost_cvar_(\d+)_(\d+(?:e[+-]?\d+)?)(?=\.|$)")


def _old_key(key: str) -> str:
    """An eval key in the spelling before the renames: q0_5.cost_cvar_0_05 -> q0.5.cost_cvar_0.05
    (collect.key_name's inverse)."""
    return _NEW_CVAR.sub(r"\1cost_cvar_\2.\3", _NEW_MERGED.sub(r"q\1.\2", key))


def runs_digest(runs: dict[str, Any]) -> str:
    """A short digest of the runs' evaluation metrics: the discussion names the runs it reads. Hashed
    with merged policies and tail metrics in their old spelling (q0.5, cost_cvar_0.05), so the same
    runs keep their digest whichever spelling runs.json holds (the discussion was written before the
    renames)."""
    evaluation = {
        name: {_old_key(key): value for key, value in record["eval"].items()}
        for name, record in sorted(normalise(runs)["experiments"].items())
    }
    payload = json.dumps(evaluation, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write(runs: dict[str, Any], reports: Path, benchmarks: Path | None = None) -> Path:
    """reports/embedded.md and reports/embedded/*.png from runs (collect's dict, of any age)."""
    view = Runs(runs)
    figures = reports / "embedded"
    figures.mkdir(parents=True, exist_ok=True)
    frontier_figure(view, figures / "frontier.png")
    tail_figure(view, figures / "cost_tail.png")
    benchmarks = benchmarks or reports.parent / "benchmarks" / "results"
    sacpo, tuned, anchored, tdpo = (_method(label) for label in (SACPO, SACPO_TUNED, SACPO_ANCHORED, TDPO))
    rsa = [m for m in METHODS if m.group == "RSA" and m.policy == "safety"]
    rsa_pairs = [(m, sacpo) for m in [*rsa, tdpo, tuned]]
    tuned_pairs = [(m, tuned) for m in [*rsa, tdpo]]
    anchored_pairs = [(m, anchored) for m in [*rsa, tdpo]]
    tuned_lr = _sci(view.both_stages("train.lr", [tuned.setting]))
    anchored_at = (
        f"lr {_sci(view.both_stages('train.lr', [anchored.setting]))}, "
        f"beta_2 {_num(view.stage_param('safety', 'beta', [anchored.setting]))}"
    )
    severity = len(view.param("prepare.world.cost_weights") or [])
    rsa_p_setting = [_method(f"RSA(P) cvar 0.95 q={Q_PATH[0]:g}").setting]
    rsa_p_mu = _num(view.param("train_safety.risk.mu", rsa_p_setting))
    rsa_p = f"{view.param('train_safety.risk.measure', rsa_p_setting)} {rsa_p_mu}"
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
    sections = [
        "# Does RSA do what the paper claims? The embedded world\n",
        "Generated by `python experiments/embedded.py report` from `reports/embedded/runs.json` (which "
        "`python experiments/embedded.py run` fills from the DVC experiments); do not edit by hand. "
        f"Runs digest `{digest}`.\n",
        "## Setup\n\n" + _setup(view),
        "## Verdict, from the paired intervals alone\n\n" + _verdicts(view),
        discussion,
        "## Every method (mean ± sd over seeds)\n\n"
        "Win rates: greedy answers against SFT's (tie = 0.5); everything else over the sampled answers: reward on "
        "benign prompts, cost, unsafe (cost > 0), cost CVaR (mean of the worst fraction), catastrophic "
        f"(severity-{severity} harm) on red-team prompts; needless refusal on benign prompts; length in tokens; KL "
        "to SFT estimated from the sampled answers' log-probabilities.\n\n" + method_table(view, METHODS),
        "## Paired differences against SACPO\n\n"
        f"A - B per seed: mean, [{LEVEL * 100:g}% t interval], (seeds where A is better). Lower "
        "cost/unsafe/CVaR/catastrophic is better; higher win rate/reward is better.\n\n"
        + comparison_table(view, rsa_pairs),
        f"## Paired differences against SACPO at lr {tuned_lr}\n\n" + comparison_table(view, tuned_pairs),
        f"## Paired differences against SACPO at {anchored_at}\n\n" + comparison_table(view, anchored_pairs),
        "## Paired differences against TDPO (the risk measure against token-level KL)\n\n"
        + comparison_table(view, [(m, tdpo) for m in rsa]),
        "## The frontier and the q paths\n\n"
        "![frontier](embedded/frontier.png)\n\n"
        f"RSA(P) ({rsa_p}) against P-SACPO at the same q, paired by seed (the first row is stage 1 alone, the "
        "last stage 2 alone):\n\n"
        + q_path_table(view)
        + f"\n\nThe same against P-SACPO at lr {tuned_lr}:\n\n"
        + q_path_table(view, " lr 5e-4"),
        "## The cost tail and the categories\n\n![cost tail](embedded/cost_tail.png)\n\n"
        f"Mean cost per red-team category (mean ± sd over seeds):\n\n{category_table(view, 'cost_mean', '.2f')}\n\n"
        f"{_name(_tail_keys(view)[-1], view)} per category:\n\n"
        + category_table(view, _tail_keys(view)[-1], ".1f")
        + "\n\nCatastrophic rate per category:\n\n"
        + category_table(view, "severe_rate", ".3f"),
        "## Sensitivity of the tail to mu and alpha\n\n" + sensitivity_table(view),
        "## Every setting at q = 0.5\n\n" + q_half_table(view),
        "## The cost of the risk term\n\n" + step_cost(view, benchmarks),
    ]
    out = reports / "embedded.md"
    out.write_text("\n\n".join(s.strip() for s in sections if s.strip()) + "\n")
    return out
