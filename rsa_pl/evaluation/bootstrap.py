"""Cluster (prompt-level) percentile bootstrap: confidence intervals for the evaluate stage's metrics.

The sampled answers to one prompt are correlated, so the resampling unit is the prompt: a draw
picks n_units prompts with replacement, that is, gives each prompt an integer weight (a
multinomial count; the weights of one draw sum to n_units), and an answer weighs what its prompt
weighs. Each estimator computes one metric for every draw at once from a (draws, n_units) weight
matrix; `percentile_interval` turns those estimates into an interval.

Shared arguments: values, per-answer floats (1-D, finite); unit_of, per-answer unit (prompt) index
in [0, n_units); weights, (draws, n_units) non-negative unit weights (`resample_weights`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

DRAWS = 1000
LEVEL = 0.95
_BLOCK = 1 << 22  # elements of one (draws x answers) block of the sorting estimators: bounds their memory


def resample_weights(n_units: int, draws: int, seed: int) -> np.ndarray:
    """(draws, n_units) int64: per draw, how often each unit is picked in n_units picks with replacement."""
    if n_units < 0:
        raise ValueError(f"resample_weights: n_units must be >= 0, got {n_units}")
    if draws < 1:
        raise ValueError(f"resample_weights: draws must be >= 1, got {draws}")
    rng = np.random.default_rng(seed)
    if n_units == 0:
        return np.zeros((draws, 0), dtype=np.int64)
    picks = rng.integers(n_units, size=(draws, n_units), dtype=np.int64)  # faster than rng.multinomial, same law
    picks += np.arange(draws, dtype=np.int64)[:, None] * n_units  # one bincount for all draws: row r's bins
    return np.bincount(picks.ravel(), minlength=draws * n_units).astype(np.int64, copy=False).reshape(draws, n_units)


def weighted_mean(values: ArrayLike, unit_of: ArrayLike, weights: ArrayLike) -> np.ndarray:
    """Per draw, the weighted mean of the answers, sum(w * v) / sum(w); nan where sum(w) == 0."""
    v, u, w = _checked("weighted_mean", values, unit_of, weights)
    n_units = w.shape[1]
    total = w @ np.bincount(u, weights=v, minlength=n_units)
    count = w @ np.bincount(u, minlength=n_units).astype(np.float64)
    return np.divide(total, count, out=np.full(len(w), np.nan), where=count > 0)


def weighted_sum(values: ArrayLike, unit_of: ArrayLike, weights: ArrayLike) -> np.ndarray:
    """Per draw, the weighted sum of the answers, sum(w * v) (0 where no answer has weight)."""
    v, u, w = _checked("weighted_sum", values, unit_of, weights)
    return w @ np.bincount(u, weights=v, minlength=w.shape[1])


def weighted_upper_cvar(values: ArrayLike, unit_of: ArrayLike, weights: ArrayLike, level: float) -> np.ndarray:
    """Per draw, the CVaR of the upper tail with answer weights (`metrics.upper_cvar` weighted).

    The mean of the worst `level` fraction of the weight: answers taken in descending value until
    their weight reaches level * sum(w), the boundary answer counted fractionally. With integer
    weights it is upper_cvar of the list with each value repeated its weight times. nan where
    sum(w) == 0."""
    if not 0.0 < level <= 1.0:
        raise ValueError(f"weighted_upper_cvar: level must be in (0, 1], got {level}")
    v, u, w = _checked("weighted_upper_cvar", values, unit_of, weights)

    def cut(ordered: np.ndarray, answer_weights: np.ndarray) -> np.ndarray:
        cum_weight = np.cumsum(answer_weights, axis=1)
        cum_total = np.cumsum(answer_weights * ordered, axis=1)
        mass = level * cum_weight[:, -1]
        # the boundary answer: the first whose cumulative weight exceeds the mass (the last if none does)
        k = np.minimum((cum_weight <= mass[:, None]).sum(axis=1), len(ordered) - 1)
        rows = np.arange(len(k))
        weight_before = np.where(k > 0, cum_weight[rows, k - 1], 0.0)
        total_before = np.where(k > 0, cum_total[rows, k - 1], 0.0)
        tail = total_before + (mass - weight_before) * ordered[k]
        return np.divide(tail, mass, out=np.full(len(k), np.nan), where=mass > 0)

    return _per_draw(v, u, w, descending=True, reduce=cut)


def weighted_median(values: ArrayLike, unit_of: ArrayLike, weights: ArrayLike) -> np.ndarray:
    """Per draw, the weighted median of the answers: the mean of the two values where the ascending
    cumulative weight first reaches and first exceeds half the total. With integer weights it is
    statistics.median of the list with each value repeated its weight times. nan where sum(w) == 0."""
    v, u, w = _checked("weighted_median", values, unit_of, weights)

    def middle(ordered: np.ndarray, answer_weights: np.ndarray) -> np.ndarray:
        cum_weight = np.cumsum(answer_weights, axis=1)
        half = cum_weight[:, -1:] / 2
        last = len(ordered) - 1
        lower = np.minimum((cum_weight < half).sum(axis=1), last)
        upper = np.minimum((cum_weight <= half).sum(axis=1), last)
        return np.where(half[:, 0] > 0, (ordered[lower] + ordered[upper]) / 2, np.nan)

    return _per_draw(v, u, w, descending=False, reduce=middle)


def percentile_interval(estimates: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile interval of bootstrap estimates: their (1 - level)/2 and 1 - (1 - level)/2
    quantiles, nan draws (no answer with weight) left out; None when every draw is nan.

    Quantiles interpolate linearly between order statistics (np.nanquantile's "linear", Hyndman and
    Fan's type 7): of 1001 sorted draws the 95% interval is the 26th to the 976th."""
    if not 0.0 < level <= 1.0:
        raise ValueError(f"percentile_interval: level must be in (0, 1], got {level}")
    e = np.asarray(estimates, dtype=np.float64)
    if e.ndim != 1:
        raise ValueError(f"percentile_interval: estimates must be 1-D, got shape {e.shape}")
    if np.isnan(e).all():
        return None
    alpha = (1.0 - level) / 2
    lo, hi = np.nanquantile(e, [alpha, 1.0 - alpha], method="linear")
    return float(lo), float(hi)


def _checked(caller: str, values: ArrayLike, unit_of: ArrayLike, weights: ArrayLike) -> tuple[np.ndarray, ...]:
    """(values float64, unit_of intp, weights float64), validated against each other."""
    v = np.asarray(values, dtype=np.float64)
    u = np.asarray(unit_of)
    w = np.asarray(weights)
    if v.ndim != 1 or u.ndim != 1:
        raise ValueError(f"{caller}: values and unit_of must be 1-D, got shapes {v.shape} and {u.shape}")
    if len(v) != len(u):
        raise ValueError(f"{caller}: {len(v)} values but {len(u)} unit indices")
    if u.size == 0:
        u = u.astype(np.intp)
    elif not np.issubdtype(u.dtype, np.integer):
        raise ValueError(f"{caller}: unit_of must hold integers, got dtype {u.dtype}")
    if w.ndim != 2:
        raise ValueError(f"{caller}: weights must be 2-D (draws, n_units), got shape {w.shape}")
    if not (np.issubdtype(w.dtype, np.integer) or np.issubdtype(w.dtype, np.floating)):
        raise ValueError(f"{caller}: weights must be numbers, got dtype {w.dtype}")
    w = w.astype(np.float64, copy=False)
    if u.size and (u.min() < 0 or u.max() >= w.shape[1]):
        bad = u[(u < 0) | (u >= w.shape[1])][0]
        raise ValueError(f"{caller}: unit index {bad} out of range [0, {w.shape[1]}) (weights' n_units)")
    if not np.isfinite(v).all():
        raise ValueError(f"{caller}: values must be finite")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(f"{caller}: weights must be finite and >= 0")
    return v, u.astype(np.intp, copy=False), w


def _per_draw(
    v: np.ndarray,
    u: np.ndarray,
    w: np.ndarray,
    descending: bool,
    reduce: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """reduce(sorted values, answer weights in that order (block of draws x answers)) over blocks of
    draws; the values sorted once. nan for every draw when there are no answers."""
    if v.size == 0:
        return np.full(len(w), np.nan)
    order = np.argsort(-v if descending else v, kind="stable")
    ordered, units = v[order], u[order]
    step = max(1, _BLOCK // v.size)
    return np.concatenate([reduce(ordered, w[i : i + step][:, units]) for i in range(0, len(w), step)] or [[]])
