"""The embedded-world report's numbers: means and spreads over seeds, paired Student-t intervals
(quantiles from scipy.stats), the better/worse/unclear rule the verdict rests on, and lookups into
runs.json (collect's dict): a method's metric per seed, and the runs' params.

Named stats, not statistics: `python experiments/embedded.py` puts experiments/ first on sys.path,
where a statistics.py would shadow the standard library's module for every package in the process.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from scipy import stats

from experiments.collect import key_name, normalise
from experiments.grid import SETTINGS, Method

LEVEL = 0.95  # two-sided confidence of the paired intervals
# probabilities that span decades are compared as log10 (a difference of -2: a hundred times rarer)
LOG_KEYS = frozenset({"catastrophe_prob", "catastrophe_prob_geomean"})
TIE = 1e-9  # |A - B| at or below this in every seed: the same number up to rounding
# a tail metric's key (after normalise): <policy>.cost_cvar_<level, dotless: 0_05, 1_5e-05>, not its .n, .ci95_*
_CVAR_KEY = re.compile(r"\.cost_cvar_(\d+(?:_\d+)?(?:e[+-]?\d+)?)$")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if n > 1 else math.nan


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided level's Student-t quantile with df degrees of freedom (t_{0.975, 4} = 2.7764...)."""
    return float(stats.t.ppf(0.5 + level / 2, df))


def resolvable_effect(n: int, level: float = LEVEL) -> float:
    """|mean| / sd of n paired differences above which their t interval excludes zero."""
    return t_quantile(n - 1, level) / math.sqrt(n)


def paired_ci(differences: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided t interval (nan bounds below 2 pairs)."""
    mean, sd = mean_sd(differences)
    n = len(differences)
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def lower_is_better(metric: str) -> bool:
    return not metric.endswith("win_rate") and metric != "reward_mean"


def classify(differences: Sequence[float], metric: str) -> str:
    """'better' / 'worse' (for A, of A - B per seed) when the paired interval excludes 0, else 'unclear'.
    Differences all within TIE (float rounding of equal numbers, as the control's against TDPO) are a tie:
    their spread is 0, so a t interval would call any rounding residue significant."""
    if differences and max(abs(d) for d in differences) <= TIE:
        return "unclear"
    _, lo, hi = paired_ci(differences)
    if math.isnan(lo):
        return "unclear"
    lower = lower_is_better(metric)
    if hi < 0:
        return "better" if lower else "worse"
    if lo > 0:
        return "worse" if lower else "better"
    return "unclear"


def scaled(metric: str, value: float) -> float:
    """The value on the scale metrics are compared on: log10 for a probability in LOG_KEYS."""
    return math.log10(max(value, 1e-300)) if metric in LOG_KEYS else value


def mode(values: Iterable[Any]) -> Any:
    """The most common value (ties: the first seen); None for none."""
    first: dict[str, Any] = {}
    counts: Counter[str] = Counter()
    for value in values:
        if value is not None:
            first.setdefault(repr(value), value)
            counts[repr(value)] += 1
    return first[counts.most_common(1)[0][0]] if counts else None


class Runs:
    """Lookups into runs.json: a method's metric over the seeds that finished, and the runs' params."""

    def __init__(self, runs: dict[str, Any]) -> None:
        self.experiments: dict[str, dict] = normalise(runs)["experiments"]
        self.settings = {s.name: s for s in SETTINGS}
        levels = set()
        for record in self.experiments.values():
            levels |= {float(m[1].replace("_", ".")) for k in record["eval"] if (m := _CVAR_KEY.search(k))}
        self.tail_levels: list[float] = sorted(levels, reverse=True)  # the CVaRs' tail masses: 0.1, 0.05

    def record(self, setting: str, seed: int) -> dict | None:
        return self.experiments.get(self.settings[setting].experiment(seed))

    def by_seed(self, setting: str, policy: str, metric: str) -> dict[int, float]:
        key = key_name(f"{policy}.{metric}")
        found = {}
        for seed in self.settings[setting].seeds:
            record = self.record(setting, seed)
            if record is not None and key in record["eval"]:
                found[seed] = float(record["eval"][key])
        return found

    def values(self, method: Method, metric: str) -> list[float]:
        return list(self.by_seed(method.setting, method.policy, metric).values())

    def mean(self, method: Method, metric: str) -> float:
        return mean_sd(self.values(method, metric))[0]

    def paired(self, a: Method, b: Method, metric: str) -> list[float]:
        """a - b per seed, over the seeds both finished; log10(a) - log10(b) for a probability (LOG_KEYS)."""
        x, y = self.by_seed(a.setting, a.policy, metric), self.by_seed(b.setting, b.policy, metric)
        return [scaled(metric, x[s]) - scaled(metric, y[s]) for s in sorted(x.keys() & y.keys())]

    def seeds(self) -> list[int]:
        """The seeds of the runs at hand."""
        return sorted({int(r["seed"]) for r in self.experiments.values()})

    def records(self, settings: Iterable[str] | None = None) -> list[dict]:
        chosen = None if settings is None else set(settings)
        return [r for r in self.experiments.values() if chosen is None or r["setting"] in chosen]

    def param(self, key: str, settings: Iterable[str] | None = None) -> Any:
        """params' key as most of the runs (of these settings) have it."""
        return mode([r["params"].get(key) for r in self.records(settings)])

    def stage_values(self, pairs: str, key: str, settings: Iterable[str] | None = None) -> list[Any]:
        """key (e.g. "beta", "train.lr") of the stage trained on these pairs ("helpful": beta_1's
        stage, "safety": beta_2's), one per run: train_reward or train_safety as the run ordered them."""
        found = []
        for record in self.records(settings):
            p = record["params"]
            section = next((s for s in ("train_reward", "train_safety") if p.get(f"{s}.pairs") == pairs), None)
            if section is not None:
                found.append(p.get(f"{section}.{key}"))
        return found

    def stage_param(self, pairs: str, key: str, settings: Iterable[str] | None = None) -> Any:
        return mode(self.stage_values(pairs, key, settings))

    def both_stages(self, key: str, settings: Iterable[str] | None = None) -> Any:
        """key of either stage (e.g. "train.lr", "alpha") as most stages of the runs have it."""
        return mode([*self.stage_values("helpful", key, settings), *self.stage_values("safety", key, settings)])
