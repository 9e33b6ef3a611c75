"""The embedded-world experiments' runs, read from git (experiments/embedded.py `report`).

collect_refs: DVC's experiment commits (refs/exps) -> the grid's experiments' params and metrics,
plus their per-category metrics and red-team cost tails -> one dict; merge_runs folds it into
reports/embedded/runs.json, the record that outlives the clone. Names are normalised on the way in
(normalise: a merged policy is `q0_5`, as the merge stage now names it, not the older `q0.5`; a
tail metric is `cost_cvar_0_05`, as evaluate now names it, not the older `cost_cvar_0.05`) so
that runs from before and after the renames compare in one report; train_metric reads a stage's
training metrics in either file layout.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from experiments.grid import SETTINGS

EXPERIMENT_FILES = ("eval/per_category.json", "eval/plots/cost_tail.csv")
# a merged policy's name before the rename: q then the ratio with a dot (q0.5, q0.25); q0 and q1 had none
_OLD_MERGED = re.compile(r"^q(\d+)\.(\d+)(?=\.|$)")
# a tail metric's name before the rename: cost_cvar_ then the level with a dot (cost_cvar_0.05, and
# 1.5e-05's cost_cvar_1.5e-05), as a whole part of a key; levels :g writes without a dot had none
_OLD_CVAR = re.compile(r"(^|\.)cost_cvar_(\d+)\.(\d+(?:e[+-]?\d+)?)(?=\.|$)")


def policy_name(name: str) -> str:
    """A policy's name as merge writes it now: q0.5 -> q0_5, q0.25 -> q0_25; sft, reward, safety,
    q0, q1 and names already new are unchanged. Also renames the policy prefix of a metric key
    (q0.5.helpful_win_rate -> q0_5.helpful_win_rate)."""
    return _OLD_MERGED.sub(r"q\1_\2", name)


def metric_name(name: str) -> str:
    """A metric's name as evaluate writes it now: cost_cvar_0.05 -> cost_cvar_0_05, cost_cvar_0.1 ->
    cost_cvar_0_1; other metrics and names already new are unchanged. Also renames the metric part
    of a key (q0_5.cost_cvar_0.05.ci95_low -> q0_5.cost_cvar_0_05.ci95_low), not its policy's."""
    return _OLD_CVAR.sub(r"\1cost_cvar_\2_\3", name)


def key_name(key: str) -> str:
    """An eval/metrics.json key (<policy>.<metric>[.n|.ci95_low|.ci95_high]) in the new spelling of
    both its policy and its metric: q0.5.cost_cvar_0.05 -> q0_5.cost_cvar_0_05."""
    return metric_name(policy_name(key))


def _dotless(x: float) -> str:
    """x as a name's part (rsa_pl.evaluation.report.dotless): 0.05 -> 0_05, 1.0 -> 1."""
    return f"{x:g}".replace(".", "_")


def merged_policy(q: float) -> str:
    """The name of the policy merged at ratio q (0.5 -> q0_5, 1.0 -> q1)."""
    return "q" + _dotless(q)


def cvar_key(level: float) -> str:
    """The metric of the cost's upper CVaR at tail mass level (0.05 -> cost_cvar_0_05), as
    rsa_pl.evaluation.report.cvar_key names it."""
    return "cost_cvar_" + _dotless(level)


def normalise(runs: dict[str, Any]) -> dict[str, Any]:
    """runs (collect's dict, of any age) with every policy and metric name in the new spelling: the
    keys of each experiment's eval metrics, per-category metrics (policies and each category's
    metrics) and cost tails (policies). Idempotent; runs is not changed in place."""
    experiments = {}
    for name, record in runs["experiments"].items():
        per_category = {
            policy_name(policy): {
                category: {metric_name(k): v for k, v in metrics.items()} for category, metrics in categories.items()
            }
            for policy, categories in record.get("per_category", {}).items()
        }
        experiments[name] = {
            **record,
            "eval": {key_name(k): v for k, v in record["eval"].items()},
            "per_category": per_category,
            "cost_tail": {policy_name(k): v for k, v in record.get("cost_tail", {}).items()},
        }
    return {**runs, "experiments": experiments}


def train_metric(record: dict[str, Any], stage: str, key: str) -> float | None:
    """A stage's training metric (key like "time/train_s") from an experiment's record, or None.

    Two layouts: metrics/<stage>.json with flat keys ({"time/train_s": 97.7}), and dvclive's
    metrics/<stage>/metrics.json, nested at each "/" ({"time": {"train_s": 97.7}})."""
    for file in (f"metrics/{stage}.json", f"metrics/{stage}/metrics.json"):
        node: Any = record.get("train", {}).get(file)
        if not isinstance(node, dict):
            continue
        if key in node:
            node = node[key]
        else:
            for part in key.split("/"):
                node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, int | float) and not isinstance(node, bool):
            return float(node)
    return None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested params -> {"a.b.c": value}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
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


TRAIN_FILES = ("metrics/train_reward/metrics.json", "metrics/train_safety/metrics.json")


def matches_grid(name: str, record: dict[str, Any]) -> bool:
    """Whether a recorded experiment is one of the grid's and ran with the params its setting sets
    now (a setting whose overrides changed since is run again, not read from the record)."""
    setting = next((s for s in SETTINGS if s.name == record.get("setting")), None)
    if setting is None or record.get("seed") not in setting.seeds or name != setting.experiment(record["seed"]):
        return False
    params = record.get("params") or {}  # an override's value as `dvc exp run -S key=value` parses it
    overrides = setting.overrides(record["seed"]).items()
    return all(key in params and params[key] == yaml.safe_load(value) for key, value in overrides)


def merge_runs(recorded: dict[str, Any], collected: dict[str, Any]) -> dict[str, Any]:
    """runs.json's experiments updated with those read from the git refs. The refs are local to the
    clone that ran them (a fresh clone has none), so runs.json is the record: an experiment it holds
    stays unless the refs hold a newer run of the name, or the grid no longer sets its params. Either
    side may be empty ({}: no runs.json yet, or no refs)."""
    experiments = {
        name: record
        for name, record in normalise({"experiments": recorded.get("experiments", {})})["experiments"].items()
        if matches_grid(name, record)
    }
    for name, record in collected.get("experiments", {}).items():
        if name not in experiments or (record.get("timestamp") or "") >= (experiments[name].get("timestamp") or ""):
            experiments[name] = record
    return {"experiments": dict(sorted(experiments.items()))}


def collect_refs(root: Path) -> dict[str, Any]:
    """The grid's experiments this clone ran, read from git alone: a finished DVC experiment is a commit under
    refs/exps/<baseline>/<name> holding its params.yaml and metrics files. `dvc exp show --all-commits`
    took over 10 minutes for round 2's 70 experiments on 2 busy cores; this takes seconds. A name
    finished more than once counts with its newest commit."""
    wanted = {s.experiment(seed): (s.name, seed) for s in SETTINGS for seed in s.seeds}
    listed = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname) %(committerdate:iso-strict)",
                             "refs/exps"], cwd=root, capture_output=True, text=True, check=True).stdout  # fmt: skip
    newest: dict[str, tuple[str, str]] = {}
    for line in listed.splitlines():
        ref, rev, when = line.split()
        name = ref.rsplit("/", 1)[1]
        if name in wanted and (name not in newest or when > newest[name][1]):
            newest[name] = (rev, when)
    experiments: dict[str, Any] = {}
    for name, (rev, when) in sorted(newest.items()):
        evaluation = _git_show(root, rev, "eval/metrics.json")
        params = _git_show(root, rev, "params.yaml")
        if not evaluation or params is None:
            continue
        setting, seed = wanted[name]
        per_category = _git_show(root, rev, EXPERIMENT_FILES[0])
        tail = _git_show(root, rev, EXPERIMENT_FILES[1])
        train = {file: json.loads(text) for file in TRAIN_FILES if (text := _git_show(root, rev, file))}
        experiments[name] = {
            "setting": setting,
            "seed": seed,
            "rev": rev,
            "timestamp": when,
            "params": flatten(yaml.safe_load(params)),
            "eval": json.loads(evaluation),
            "train": train,
            "per_category": json.loads(per_category) if per_category else {},
            "cost_tail": _cost_tail(tail) if tail else {},
        }
    return normalise({"experiments": experiments})
