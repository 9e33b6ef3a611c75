"""The evaluate stage's plots: PNG figures (matplotlib, headless) and the CSV data DVC plots.

- frontier: helpfulness vs harmlessness win rate of every policy, the RSA(P) q path drawn
  from the stage-1 policy (q = 0) to the stage-2 policy (q = 1);
- cost per category: mean cost of sampled red-team answers, per category and policy;
- cost tail: the complementary CDF P(cost >= c) of sampled red-team answers, per policy.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI machines and GPU boxes
import matplotlib.pyplot as plt


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """rows (a judge that gave no such scores leaves them out: then only the header)."""
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def frontier(metrics: dict[str, dict[str, float]], q_of: dict[str, float], folder: Path) -> list[dict[str, Any]]:
    """metrics: policy -> its metrics; q_of: the q of each policy on the RSA(P) path (reward 0,
    merged q, safety 1). A policy without both win rates (a judge that could not settle them) is
    left out."""
    rows = [
        {"policy": p, "harmless_win_rate": m["harmless_win_rate"], "helpful_win_rate": m["helpful_win_rate"],
         "q": q_of.get(p, "")}
        for p, m in metrics.items() if "harmless_win_rate" in m and "helpful_win_rate" in m
    ]  # fmt: skip
    _write_csv(folder / "frontier.csv", rows, ["policy", "harmless_win_rate", "helpful_win_rate", "q"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    path = sorted((r for r in rows if r["q"] != ""), key=lambda r: r["q"])
    ax.plot([r["harmless_win_rate"] for r in path], [r["helpful_win_rate"] for r in path], "-", color="0.6",
            label="RSA(P) path (q)")  # fmt: skip
    for r in rows:
        ax.scatter(r["harmless_win_rate"], r["helpful_win_rate"], s=30)
        ax.annotate(r["policy"], (r["harmless_win_rate"], r["helpful_win_rate"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.axhline(0.5, color="0.85", lw=0.8)
    ax.axvline(0.5, color="0.85", lw=0.8)
    ax.set(xlabel="harmlessness win rate vs SFT", ylabel="helpfulness win rate vs SFT", xlim=(0, 1), ylim=(0, 1),
           title="Helpfulness-harmlessness frontier")  # fmt: skip
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "frontier.png", dpi=120)
    plt.close(fig)
    return rows


def cost_per_category(per_category: dict[str, dict[str, dict[str, float]]], folder: Path) -> None:
    """per_category: policy -> category -> metrics."""
    rows = [
        {"policy": p, "category": c, "cost_mean": m["cost_mean"], "unsafe_rate": m["unsafe_rate"]}
        for p, cats in per_category.items()
        for c, m in cats.items()
        if "cost_mean" in m and "unsafe_rate" in m
    ]
    _write_csv(folder / "cost_per_category.csv", rows, ["policy", "category", "cost_mean", "unsafe_rate"])
    categories = sorted({r["category"] for r in rows})
    policies = list(per_category)
    width = 0.8 / max(1, len(policies))
    fig, ax = plt.subplots(figsize=(max(6, len(categories) * 1.1), 4))
    for i, policy in enumerate(policies):
        values = [per_category[policy].get(c, {}).get("cost_mean", 0.0) for c in categories]
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=policy)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(categories))], categories, rotation=30, ha="right")
    ax.set(ylabel="mean cost of sampled answers", title="Cost per red-team category")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "cost_per_category.png", dpi=120)
    plt.close(fig)


def cost_tail(costs: dict[str, Sequence[float]], folder: Path) -> None:
    """costs: policy -> the costs of its sampled red-team answers."""
    rows = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for policy, values in costs.items():
        if not values:
            continue
        levels = sorted(set(values))
        n = len(values)
        ccdf = [sum(v >= c for v in values) / n for c in levels]
        rows += [{"policy": policy, "cost": c, "ccdf": p} for c, p in zip(levels, ccdf, strict=True)]
        ax.step(levels, ccdf, where="post", label=policy)
    _write_csv(folder / "cost_tail.csv", rows, ["policy", "cost", "ccdf"])
    ax.set_yscale("log")
    ax.set(xlabel="cost c", ylabel="P(cost >= c), sampled red-team answers", title="Cost tail")
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "cost_tail.png", dpi=120)
    plt.close(fig)
