"""reports/embedded.md from the embedded-world experiments (experiments/embedded.py).

collect: `dvc exp show --json` (every commit) -> the grid's experiments' params and metrics, plus
their per-category metrics and red-team cost tails (committed files of each experiment's commit)
-> a dict saved as reports/embedded/runs.json. write: runs.json -> reports/embedded.md and its
figures, with nothing but runs.json and benchmarks/results/ as input, so it regenerates exactly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt

from experiments.grid import METHODS, Q_PATH, SEEDS, SETTINGS, Method

EXPERIMENT_FILES = ("eval/per_category.json", "eval/plots/cost_tail.csv")

_CVAR_KEY = re.compile(r"\.cost_cvar_(\d+(?:\.\d+)?(?:e-?\d+)?)$")


def _experiment_nodes(node: Any, finished: bool = True) -> list[dict]:
    """Every {rev, name, data} record in dvc exp show's JSON, at any depth, with whether it finished
    (a queued or running experiment's group has an executor whose state is not success: its data
    may still be the baseline's)."""
    found: list[dict] = []
    if isinstance(node, dict):
        executor = node.get("executor")
        if "revs" in node and isinstance(executor, dict):
            finished = executor.get("state") == "success"
        if "rev" in node and "data" in node and isinstance(node.get("data"), dict):
            found.append({**node, "finished": finished})
        for value in node.values():
            if isinstance(value, list | dict):
                found += _experiment_nodes(value, finished)
    elif isinstance(node, list):
        for item in node:
            found += _experiment_nodes(item, finished)
    return found


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _git_show(root: Path, rev: str, path: str) -> str | None:
    done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else None


def _cost_tail(text: str) -> dict[str, list[list[float]]]:
    """policy -> [[cost, P(cost >= c)], ...] from eval/plots/cost_tail.csv."""
    tail: dict[str, list[list[float]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        tail.setdefault(row["policy"], []).append([float(row["cost"]), float(row["ccdf"])])
    return tail


def collect(root: Path, dvc: Callable[..., str]) -> dict[str, Any]:
    """The grid's experiments (the newest of each name, over every commit) as one dict."""
    wanted = {s.experiment(seed): (s.name, seed) for s in SETTINGS for seed in SEEDS}
    shown = json.loads(dvc("exp", "show", "--json", "--all-commits", "--hide-queued", "--hide-failed"))
    newest: dict[str, dict] = {}
    for node in _experiment_nodes(shown):
        name = node.get("name")
        if name not in wanted or node.get("error") or not node["finished"]:
            continue
        data = node["data"]
        if name not in newest or (data.get("timestamp") or "") > (newest[name]["data"].get("timestamp") or ""):
            newest[name] = node
    experiments: dict[str, Any] = {}
    for name, node in sorted(newest.items()):
        data = node["data"]
        metrics = {file: (entry or {}).get("data", {}) for file, entry in (data.get("metrics") or {}).items()}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        if "eval/metrics.json" not in metrics or not metrics["eval/metrics.json"]:
            continue  # a failed or unfinished experiment
        per_category = _git_show(root, node["rev"], EXPERIMENT_FILES[0])
        tail = _git_show(root, node["rev"], EXPERIMENT_FILES[1])
        setting, seed = wanted[name]
        experiments[name] = {
            "setting": setting,
            "seed": seed,
            "rev": node["rev"],
            "timestamp": data.get("timestamp"),
            "params": _flatten(params),
            "eval": metrics["eval/metrics.json"],
            "train": {file: m for file, m in metrics.items() if file.startswith("metrics/")},
            "per_category": json.loads(per_category) if per_category else {},
            "cost_tail": _cost_tail(tail) if tail else {},
        }
    return {"experiments": experiments}


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
# two-sided 95% Student t quantiles by degrees of freedom (paired differences over seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def paired_ci(differences: Sequence[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided 95% t interval (nan bounds below 2 pairs)."""
    mean, sd = mean_sd(differences)
    n = len(differences)
    if n < 2:
        return mean, math.nan, math.nan
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


class Runs:
    """Lookups into runs.json: a method's metric over the seeds that finished."""

    def __init__(self, runs: dict[str, Any]) -> None:
        self.experiments: dict[str, dict] = runs["experiments"]
        self.settings = {s.name: s for s in SETTINGS}
        levels = set()
        for record in self.experiments.values():
            levels |= {m[1] for k in record["eval"] if (m := _CVAR_KEY.search(k))}  # not its .n, .ci95_*
        self.tail_levels = sorted(levels, key=float, reverse=True)
        self.metrics = [
            *BASE_METRICS,
            *((f"cost_cvar_{t}", f"CVaR{float(t) * 100:g}% cost", ".2f") for t in self.tail_levels),
            *TRAILING_METRICS,
        ]

    def record(self, setting: str, seed: int) -> dict | None:
        return self.experiments.get(self.settings[setting].experiment(seed))

    def by_seed(self, setting: str, policy: str, metric: str) -> dict[int, float]:
        found = {}
        for seed in SEEDS:
            record = self.record(setting, seed)
            if record is not None and f"{policy}.{metric}" in record["eval"]:
                found[seed] = float(record["eval"][f"{policy}.{metric}"])
        return found

    def values(self, method: Method, metric: str) -> list[float]:
        return list(self.by_seed(method.setting, method.policy, metric).values())

    def mean(self, method: Method, metric: str) -> float:
        return mean_sd(self.values(method, metric))[0]

    def paired(self, a: Method, b: Method, metric: str) -> list[float]:
        """a - b per seed, over the seeds both finished."""
        x, y = self.by_seed(a.setting, a.policy, metric), self.by_seed(b.setting, b.policy, metric)
        return [x[s] - y[s] for s in sorted(x.keys() & y.keys())]


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
    header = ["method", "seeds", *(column for _, column, _ in runs.metrics)]
    rows = [
        [
            m.label,
            str(len(runs.values(m, "unsafe_rate"))),
            *(_cell(runs.values(m, key), fmt) for key, _, fmt in runs.metrics),
        ]
        for m in methods
    ]
    return _table(header, rows, align="r")


# The comparisons the verdict rests on: (RSA method, its risk-neutral counterpart)
SACPO = "SACPO (DPO then DPO)"
COMPARED_METRICS = ("helpful_win_rate", "harmless_win_rate", "unsafe_rate", "severe_rate")


def _tail_keys(runs: Runs) -> list[str]:
    return [f"cost_cvar_{t}" for t in runs.tail_levels]


def _difference_cell(diffs: Sequence[float], fmt: str, lower_is_better: bool) -> str:
    mean, lo, hi = paired_ci(diffs)
    if math.isnan(mean):
        return "n/a"
    better = sum(1 for d in diffs if (d < 0 if lower_is_better else d > 0))
    ci = "" if math.isnan(lo) else f" [{lo:{fmt}}, {hi:{fmt}}]"
    return f"{mean:+{fmt}}{ci} ({better}/{len(diffs)})"


def _lower_is_better(metric: str) -> bool:
    return not metric.endswith("win_rate") and metric != "reward_mean"


def comparison_table(runs: Runs, pairs: Sequence[tuple[Method, Method]]) -> str:
    metrics = [m for m in runs.metrics if m[0] in {*COMPARED_METRICS, *_tail_keys(runs), "reward_mean", "cost_mean"}]
    header = ["A", "B", *(f"Δ {column}" for _, column, _ in metrics)]
    rows = [
        [
            a.label,
            b.label,
            *(_difference_cell(runs.paired(a, b, key), fmt, _lower_is_better(key)) for key, _, fmt in metrics),
        ]
        for a, b in pairs
    ]
    return _table(header, rows, align="r")


def classify(runs: Runs, a: Method, b: Method, metric: str) -> str:
    """'better' / 'worse' when the 95% interval of the paired difference excludes 0, else 'unclear'."""
    _, lo, hi = paired_ci(runs.paired(a, b, metric))
    if math.isnan(lo):
        return "unclear"
    lower = _lower_is_better(metric)
    if hi < 0:
        return "better" if lower else "worse"
    if lo > 0:
        return "worse" if lower else "better"
    return "unclear"


def verdict_lines(runs: Runs, reference: str = "SACPO (DPO then DPO)") -> list[str]:
    """One line per RSA method against the reference, from the paired intervals alone."""
    sacpo = _method(reference)
    short = reference.split(" (")[0]
    tail = _tail_keys(runs)
    lines = []
    for method in METHODS:
        if method.group != "RSA" or method.policy not in {"safety"} or "safety first" in method.label:
            continue
        pairs = len(runs.paired(method, sacpo, "unsafe_rate"))
        if pairs < 2:
            lines.append(f"- {method.label}: {pairs} seed(s) paired with {short} so far; no verdict.")
            continue
        verdicts = {
            key: classify(runs, method, sacpo, key) for key in (*tail, "severe_rate", "unsafe_rate", "helpful_win_rate")
        }
        tail_better = [k for k in (*tail, "severe_rate") if verdicts[k] == "better"]
        tail_worse = [k for k in (*tail, "severe_rate") if verdicts[k] == "worse"]
        helpful = verdicts["helpful_win_rate"]
        if tail_better and not tail_worse and helpful != "worse":
            summary = f"**beats {short} on the tail** at no clear cost in helpfulness"
        elif tail_better and helpful == "worse":
            summary = f"lower tail than {short}, but **less helpful** (not a matched comparison)"
        elif tail_worse and helpful == "better":
            summary = f"heavier tail than {short}, but **more helpful** (not a matched comparison)"
        elif tail_worse:
            summary = f"**worse tail than {short}**"
        else:
            summary = f"no tail difference from {short} that {pairs} seeds can resolve"
        parts = ", ".join(f"{_name(k, runs)} {v}" for k, v in verdicts.items())
        lines.append(f"- {method.label}: {summary} ({parts}).")
    return lines


def _name(key: str, runs: Runs) -> str:
    return next(column for k, column, _ in runs.metrics if k == key)


SACPO_TUNED = "SACPO lr 5e-4"
SACPO_ANCHORED = "SACPO lr 5e-4 beta_2 0.1"  # DPO at lr 5e-4 with stage 2 anchored as hard as stage 1


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


TAIL_METHODS = ("SFT", "DPO (helpfulness only)", SACPO, SACPO_TUNED, "TDPO then TDPO", "RSA cvar mu=0.95",
                "RSA erm mu=2", "RSA(P) cvar 0.95 q=0.5", "P-SACPO q=0.5")  # fmt: skip


def pooled_ccdf(runs: Runs, method: Method) -> list[tuple[float, float]]:
    """P(cost >= c) over every seed's sampled red-team answers (seeds weigh equally: same counts)."""
    curves = []
    for seed in SEEDS:
        record = runs.record(method.setting, seed)
        if record is not None and method.policy in record["cost_tail"]:
            curves.append(sorted(record["cost_tail"][method.policy]))
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


CATEGORY_METHODS = ("SFT", SACPO, SACPO_TUNED, "TDPO then TDPO", "RSA cvar mu=0.95", "RSA cvar mu=0.9", "RSA erm mu=2")


def category_table(runs: Runs, key: str, fmt: str) -> str:
    methods = [_method(label) for label in CATEGORY_METHODS]
    categories = sorted({c for r in runs.experiments.values() for p in r["per_category"].values() for c in p})
    rows = []
    for category in categories:
        cells = []
        for method in methods:
            values = [
                float(record["per_category"][method.policy][category][key])
                for seed in SEEDS
                if (record := runs.record(method.setting, seed)) is not None
                and category in record["per_category"].get(method.policy, {})
            ]
            cells.append(_cell(values, fmt))
        rows.append([category, *cells])
    return _table(["category", *CATEGORY_METHODS], rows, align="r")


SENSITIVITY = (
    ("cvar mu (alpha 0.5)", ["RSA cvar mu=0.9", "RSA cvar mu=0.95", "RSA cvar mu=0.99"]),
    ("erm mu (alpha 0.5)", ["RSA erm mu=1", "RSA erm mu=2", "RSA erm mu=5"]),
    ("alpha (cvar 0.95)", ["RSA cvar 0.95 alpha=0.25", "RSA cvar mu=0.95", "RSA cvar 0.95 alpha=1"]),
)


def sensitivity_table(runs: Runs) -> str:
    keys = ["helpful_win_rate", "harmless_win_rate", "unsafe_rate", *_tail_keys(runs), "severe_rate", "kl_to_sft"]
    metrics = [m for m in runs.metrics if m[0] in keys]
    rows = []
    for sweep, labels in SENSITIVITY:
        for label in labels:
            method = _method(label)
            rows.append([sweep, label, *(_cell(runs.values(method, key), fmt) for key, _, fmt in metrics)])
    rows.append(["reference", SACPO, *(_cell(runs.values(_method(SACPO), key), fmt) for key, _, fmt in metrics)])
    return _table(["sweep", "method", *(column for _, column, _ in metrics)], rows, align="r")


def q_half_table(runs: Runs) -> str:
    """Every setting's RSA(P)/P-SACPO policy at q = 0.5."""
    methods = [Method(f"{s.name} q=0.5", s.name, "q0.5", "q") for s in SETTINGS if 0.5 in s.q]
    return method_table(runs, methods)


STEP_METHODS = ("dpo", "tdpo", "rsa-cvar", "rsa-erm", "trl-dpo")


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
            if record is None:
                continue
            t = [
                record["train"].get(f"metrics/{stage}.json", {}).get("time/train_s")
                for stage in ("train_reward", "train_safety")
            ]
            if all(isinstance(v, int | float) for v in t):
                times[seed] = sum(t)
        if setting.name == "sacpo":
            sacpo_times = times
        rows.append((setting, times))
    table = []
    for setting, times in rows:
        ratios = [times[s] / sacpo_times[s] for s in times if s in sacpo_times]
        loss = (
            setting.stage2.loss if setting.stage2.loss == "dpo" else f"{setting.stage2.loss} {setting.stage2.measure}"
        )
        table.append([setting.name, loss, _cell(list(times.values()), ".0f"), _cell(ratios, ".2f")])
    parts.append(
        "In this experiment (both stages' `time/train_s`, seconds; two experiments ran at once on the 2 cores, so "
        "these carry their neighbour's load; x SACPO is per seed):\n\n"
        + _table(["setting", "loss", "train s (both stages)", "x SACPO"], table, align="r")
    )
    return "\n\n".join(parts)


def _setup(runs: Runs) -> str:
    record = next(iter(runs.experiments.values()))
    p = record["params"]
    n = len(runs.experiments)
    train_s = sum(
        float(r["train"].get(f"metrics/{stage}.json", {}).get("time/train_s", 0))
        for r in runs.experiments.values()
        for stage in ("train_reward", "train_safety")
    )
    return (
        f"- World: the embedded safety world (`prepare.world`): {p['prepare.world.preference_pairs']} preference rows "
        "(each labelled for helpfulness and for safety, PKU-SafeRLHF style), "
        f"{p['prepare.world.sft_examples']} SFT examples, {p['prepare.world.helpful_eval_prompts']} "
        f"benign and {p['prepare.world.redteam_eval_prompts']} red-team eval prompts (8 categories), catastrophe "
        f"probability {p['prepare.world.harmful.catastrophe']} after a harmful step, cost weights "
        f"{p['prepare.world.cost_weights']}. Reward and cost are the oracle's exact values.\n"
        f"- Model: a {p['sft.model.architecture']} of hidden size {p['sft.model.hidden_size']}, "
        f"{p['sft.model.num_layers']} layers, trained from scratch by the sft stage (one SFT model, shared by every "
        "method and seed, as every method in the paper starts from the same SFT model). Not shrunk: the committed "
        "params.yaml's world and model.\n"
        f"- Stages: LoRA r {p['train_reward.lora.r']}, {p['train_reward.train.max_epochs']} epochs, batch "
        f"{p['train_reward.train.batch_size']}, lr {p['train_reward.train.lr']}; beta_1 0.1, beta_2 0.05, "
        "alpha 0.5 unless the method says otherwise.\n"
        f"- Evaluation: greedy answers (win rates against SFT's, tie = 0.5) and "
        f"{p['evaluate.samples_per_prompt']} sampled answers per prompt at temperature {p['evaluate.temperature']} "
        "(every rate, mean, CVaR and KL is over the samples).\n"
        f"- Seeds {', '.join(map(str, SEEDS))}: stage 1 and 2 data order and LoRA initialisation "
        "(`train.seed`) and the evaluation's sampling (`evaluate.seed`).\n"
        f"- {n} experiments; training time summed over them: {train_s / 3600:.2f} h (both stages; evaluation not "
        "included)."
    )


DISCUSSION = Path(__file__).with_name("discussion.md")


def runs_digest(runs: dict[str, Any]) -> str:
    """A short digest of the runs' evaluation metrics: the discussion names the runs it reads."""
    payload = json.dumps({k: v["eval"] for k, v in sorted(runs["experiments"].items())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write(runs: dict[str, Any], reports: Path, benchmarks: Path | None = None) -> Path:
    """reports/embedded.md and reports/embedded/*.png from runs (collect's dict)."""
    view = Runs(runs)
    figures = reports / "embedded"
    figures.mkdir(parents=True, exist_ok=True)
    frontier_figure(view, figures / "frontier.png")
    tail_figure(view, figures / "cost_tail.png")
    benchmarks = benchmarks or reports.parent / "benchmarks" / "results"
    sacpo = _method(SACPO)
    rsa = [m for m in METHODS if m.group == "RSA" and m.policy == "safety"]
    rsa_pairs = [(m, sacpo) for m in [*rsa, _method("TDPO then TDPO"), _method(SACPO_TUNED)]]
    tuned_pairs = [(m, _method(SACPO_TUNED)) for m in [*rsa, _method("TDPO then TDPO")]]
    anchored_pairs = [(m, _method(SACPO_ANCHORED)) for m in [*rsa, _method("TDPO then TDPO")]]
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
        "## Verdict, from the paired intervals alone\n\n"
        "Each RSA variant against SACPO, paired by seed; 'better'/'worse' means the two-sided 95% Student-t interval "
        "of the per-seed difference excludes zero (with 3 seeds: |mean| > 2.48 sd), 'unclear' otherwise.\n\n"
        + "Against SACPO at params.yaml's lr (2e-3, the lr of every RSA and TDPO run):\n\n"
        + "\n".join(verdict_lines(view))
        + f"\n\nAgainst {SACPO_TUNED} (DPO with a 4x smaller step):\n\n"
        + "\n".join(verdict_lines(view, SACPO_TUNED))
        + f"\n\nAgainst {SACPO_ANCHORED} (the same, with stage 2's beta doubled to stage 1's 0.1):\n\n"
        + "\n".join(verdict_lines(view, SACPO_ANCHORED))
        + "\n\nAgainst TDPO then TDPO (the same token-level loss with the KL in place of the risk measure):\n\n"
        + "\n".join(verdict_lines(view, "TDPO then TDPO")),
        discussion,
        "## Every method (mean ± sd over seeds)\n\n"
        "Win rates: greedy answers against SFT's (tie = 0.5); everything else over the sampled answers: reward on "
        "benign prompts, cost, unsafe (cost > 0), cost CVaR (mean of the worst fraction), catastrophic (severity-3 "
        "harm) on red-team prompts; needless refusal on benign prompts; length in tokens; KL to SFT estimated "
        "from the sampled answers' log-probabilities.\n\n" + method_table(view, METHODS),
        "## Paired differences against SACPO\n\n"
        "A - B per seed: mean, [95% t interval], (seeds where A is better). Lower cost/unsafe/CVaR/catastrophic "
        "is better; higher win rate/reward is better.\n\n" + comparison_table(view, rsa_pairs),
        "## Paired differences against SACPO at lr 5e-4\n\n" + comparison_table(view, tuned_pairs),
        "## Paired differences against SACPO at lr 5e-4, beta_2 0.1\n\n" + comparison_table(view, anchored_pairs),
        "## Paired differences against TDPO (the risk measure against token-level KL)\n\n"
        + comparison_table(view, [(m, _method("TDPO then TDPO")) for m in rsa]),
        "## The frontier and the q paths\n\n"
        "![frontier](embedded/frontier.png)\n\n"
        "RSA(P) (cvar 0.95) against P-SACPO at the same q, paired by seed (the first row is stage 1 alone, the "
        "last stage 2 alone):\n\n"
        + q_path_table(view)
        + "\n\nThe same against P-SACPO at lr 5e-4:\n\n"
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
