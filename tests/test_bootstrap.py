"""rsa_pl.evaluation.bootstrap against plain references (the weighted list expanded by repetition),
its limits, its coverage and its bad input."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import numpy as np
import pytest

from rsa_pl.evaluation.bootstrap import (
    DRAWS,
    LEVEL,
    percentile_interval,
    resample_weights,
    weighted_mean,
    weighted_median,
    weighted_sum,
    weighted_upper_cvar,
)
from rsa_pl.evaluation.metrics import upper_cvar

# 1/3 and 0.3 put the CVaR's boundary inside a repeated value; 0.25 and 0.5 often exactly on an edge
CVAR_LEVELS = [1e-3, 0.05, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.9, 1.0]


def expand(values: np.ndarray, unit_of: np.ndarray, row: np.ndarray) -> list[float]:
    """The resampled data set of one draw: each answer repeated as often as its unit was picked."""
    return [float(v) for v, u in zip(values.tolist(), unit_of.tolist(), strict=True) for _ in range(int(row[u]))]


def make_data(seed: int, n_units: int = 12, draws: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, unit_of, weights): 0 to 5 answers per unit (some units have none), answers not
    grouped by unit, many tied values; multinomial draws plus hand-made rows (all ones, all zeros,
    one unit only, an empty unit only, large uneven counts)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, size=n_units)
    counts[0], counts[-1] = 3, 0  # at least one answer; at least one empty unit
    unit_of = rng.permutation(np.repeat(np.arange(n_units), counts))
    values = rng.integers(-3, 4, size=len(unit_of)) * 0.5
    values[::4] = rng.normal(size=len(values[::4]))
    special = np.zeros((5, n_units), dtype=np.int64)
    special[0] = 1
    special[2, 0] = 1
    special[3, -1] = 4
    special[4, : n_units // 2] = rng.integers(0, 9, size=n_units // 2)
    special[4, 0] = 7
    weights = np.concatenate([resample_weights(n_units, draws, seed), special])
    return values, unit_of, weights


def reference(
    values: np.ndarray, unit_of: np.ndarray, weights: np.ndarray, statistic: Callable[[list[float]], float]
) -> list[float]:
    out = []
    for row in weights:
        data = expand(values, unit_of, row)
        out.append(statistic(data) if data else math.nan)
    return out


def assert_same(actual: np.ndarray, expected: list[float], rel: float = 1e-12) -> None:
    assert actual.dtype == np.float64
    assert actual.shape == (len(expected),)
    assert actual.tolist() == pytest.approx(expected, rel=rel, abs=1e-12, nan_ok=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_mean_and_sum_match_the_expanded_list(seed: int) -> None:
    values, unit_of, weights = make_data(seed)
    assert_same(weighted_mean(values, unit_of, weights), reference(values, unit_of, weights, statistics.fmean))
    sums = reference(values, unit_of, weights, math.fsum)
    assert_same(weighted_sum(values, unit_of, weights), [0.0 if math.isnan(s) else s for s in sums])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_median_matches_the_expanded_list(seed: int) -> None:
    values, unit_of, weights = make_data(seed)
    expected = reference(values, unit_of, weights, statistics.median)
    assert weighted_median(values, unit_of, weights).tolist() == pytest.approx(expected, rel=0, abs=0, nan_ok=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", CVAR_LEVELS)
def test_weighted_upper_cvar_matches_the_expanded_list(seed: int, level: float) -> None:
    values, unit_of, weights = make_data(seed)
    expected = reference(values, unit_of, weights, lambda data: upper_cvar(data, level))
    assert_same(weighted_upper_cvar(values, unit_of, weights, level), expected)


def test_estimators_on_hand_computed_draws() -> None:
    # unit 0 has three answers (0, 0, 0), unit 1 one (1): answers weigh, units do not
    values, unit_of = np.array([0.0, 1.0, 0.0, 0.0]), np.array([0, 1, 0, 0])
    weights = np.array([[1, 1], [0, 2], [2, 0], [1, 3], [0, 0]])
    assert_same(weighted_mean(values, unit_of, weights), [0.25, 1.0, 0.0, 0.5, math.nan])
    assert_same(weighted_sum(values, unit_of, weights), [1.0, 2.0, 0.0, 3.0, 0.0])
    assert_same(weighted_median(values, unit_of, weights), [0.0, 1.0, 0.0, 0.5, math.nan])
    # one answer per unit: weights (2, 1, 1) are the list [5, 5, 3, 1]; (2, 1, 2) is [5, 5, 3, 1, 1]
    values, unit_of, weights = np.array([3.0, 5.0, 1.0]), np.array([1, 0, 2]), np.array([[2, 1, 1], [2, 1, 2]])
    assert_same(weighted_median(values, unit_of, weights), [4.0, 3.0])
    for level, expected in [
        (0.2, [5.0, 5.0]),
        (0.5, [5.0, (10 + 0.5 * 3) / 2.5]),
        (0.6, [(10 + 0.4 * 3) / 2.4, 13 / 3]),  # in the first, the boundary value 3 counted 0.4 times
        (0.75, [13 / 3, (13 + 0.75 * 1) / 3.75]),
        (1.0, [3.5, 3.0]),
    ]:
        assert_same(weighted_upper_cvar(values, unit_of, weights, level), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_unit_weights_reproduce_the_point_estimates(seed: int) -> None:
    values, unit_of, _ = make_data(seed)
    ones = np.ones((1, 12), dtype=np.int64)
    data = values.tolist()
    assert weighted_mean(values, unit_of, ones)[0] == pytest.approx(statistics.fmean(data), rel=1e-12, abs=1e-14)
    assert weighted_sum(values, unit_of, ones)[0] == pytest.approx(math.fsum(data), rel=1e-12, abs=1e-12)
    assert weighted_median(values, unit_of, ones)[0] == statistics.median(data)
    for level in CVAR_LEVELS:
        assert weighted_upper_cvar(values, unit_of, ones, level)[0] == pytest.approx(upper_cvar(data, level), 1e-12)


def test_cvar_limits() -> None:
    values, unit_of, weights = make_data(3, n_units=30, draws=200)
    weights = weights[weights @ np.bincount(unit_of, minlength=30) > 0]  # draws with some answer
    means = weighted_mean(values, unit_of, weights)
    assert weighted_upper_cvar(values, unit_of, weights, 1.0) == pytest.approx(means, rel=1e-12)
    # the maximum over the answers the draw picked, not over all answers
    picked_max = [max(expand(values, unit_of, row)) for row in weights]
    assert weighted_upper_cvar(values, unit_of, weights, 1e-9) == pytest.approx(picked_max, rel=1e-12)
    assert len(set(picked_max)) > 1
    tails = np.stack([weighted_upper_cvar(values, unit_of, weights, level) for level in (1.0, 0.5, 0.2, 0.05)])
    assert (np.diff(tails, axis=0) >= -1e-12).all()  # a thinner tail is never less costly


def test_equal_values_give_a_zero_width_interval() -> None:
    unit_of = np.repeat(np.arange(50), 3)
    values = np.full(len(unit_of), 0.75)
    weights = resample_weights(50, DRAWS, seed=5)
    for estimates in [
        weighted_mean(values, unit_of, weights),
        weighted_median(values, unit_of, weights),
        weighted_upper_cvar(values, unit_of, weights, 0.1),
    ]:
        lo, hi = percentile_interval(estimates)
        assert lo == pytest.approx(0.75, abs=1e-12)
        assert hi - lo <= 1e-12
    assert percentile_interval(weighted_sum(values, unit_of, weights)) == (112.5, 112.5)


def test_resample_weights() -> None:
    weights = resample_weights(150, DRAWS, seed=7)
    assert weights.dtype == np.int64
    assert weights.shape == (DRAWS, 150)
    assert (weights.sum(axis=1) == 150).all()
    assert (weights >= 0).all()
    assert np.array_equal(weights, resample_weights(150, DRAWS, seed=7))
    assert not np.array_equal(weights, resample_weights(150, DRAWS, seed=8))
    # uniform picks: each unit is picked once per draw on average, Binomial(150, 1/150) times
    assert abs(weights.mean() - 1.0) < 1e-12
    assert np.abs(weights.mean(axis=0) - 1.0).max() < 0.2  # sd of a unit's mean over 1000 draws: 0.03
    assert abs(weights.var() - (1 - 1 / 150)) < 0.05
    assert (weights == 0).mean() == pytest.approx((1 - 1 / 150) ** 150, abs=0.01)  # ~37% of units left out
    assert resample_weights(0, 4, seed=0).shape == (4, 0)
    assert resample_weights(1, 3, seed=0).tolist() == [[1], [1], [1]]


def test_no_answers_and_no_units() -> None:
    empty = np.array([], dtype=np.float64)
    for weights in (resample_weights(0, 5, seed=0), resample_weights(4, 5, seed=0)):
        for estimator in (weighted_mean, weighted_median):
            assert np.isnan(estimator(empty, [], weights)).all()
        assert np.isnan(weighted_upper_cvar(empty, [], weights, 0.5)).all()
        assert (weighted_sum(empty, [], weights) == 0).all()
        assert percentile_interval(weighted_mean(empty, [], weights)) is None


def quantile_type7(data: list[float], p: float) -> float:
    ordered = sorted(data)
    h = (len(ordered) - 1) * p
    low = math.floor(h)
    return ordered[low] + (h - low) * (ordered[min(low + 1, len(ordered) - 1)] - ordered[low])


def test_percentile_interval() -> None:
    assert percentile_interval(np.arange(1001.0)) == pytest.approx((25.0, 975.0), rel=1e-12)
    assert percentile_interval(np.arange(1001.0), level=1.0) == (0.0, 1000.0)
    assert percentile_interval(np.arange(101.0), level=0.9) == pytest.approx((5.0, 95.0))
    rng = np.random.default_rng(11)
    estimates = rng.normal(size=DRAWS)
    lo, hi = percentile_interval(estimates)
    data = estimates.tolist()
    assert (lo, hi) == pytest.approx((quantile_type7(data, 0.025), quantile_type7(data, 0.975)), rel=1e-12)
    with_nan = np.concatenate([estimates[:500], [math.nan] * 37, estimates[500:]])
    assert percentile_interval(with_nan) == (lo, hi)  # nan draws are left out
    assert percentile_interval(np.array([math.nan, math.nan])) is None
    assert percentile_interval(np.array([2.0, math.nan])) == (2.0, 2.0)
    assert LEVEL == 0.95
    assert DRAWS == 1000


def coverage(
    p: Callable[[np.random.Generator], np.ndarray], seed: int, answer_level: bool = False, draws: int = DRAWS
) -> float:
    """The share of 200 data sets (200 prompts, 4 answers each, answer ~ Bernoulli(p of its prompt))
    whose 95% interval for the mean contains 0.3, the mean of p's distribution. answer_level: resample
    answers, not prompts (800 units). (Over seeds 1 to 10 both coverages below were 0.925 to 0.97 with prompts
    as units, the correlated one 0.735 to 0.80 with answers and 200 draws.)"""
    rng = np.random.default_rng(seed)
    unit_of = np.repeat(np.arange(200), 4)
    hits = 0
    for dataset in range(200):
        values = (rng.random(800) < np.repeat(p(rng), 4)).astype(np.float64)
        units = np.arange(800) if answer_level else unit_of
        weights = resample_weights(len(np.unique(units)), draws, seed=seed * 1000 + dataset)
        lo, hi = percentile_interval(weighted_mean(values, units, weights))
        hits += lo <= 0.3 <= hi
    return hits / 200


def test_coverage_of_independent_bernoulli_answers() -> None:
    assert 0.88 <= coverage(lambda rng: np.full(200, 0.3), seed=2) <= 0.99


def test_coverage_of_correlated_answers_needs_the_prompt_as_unit() -> None:
    # p ~ Beta(0.3, 0.7): mean 0.3, intra-prompt correlation 0.5, so a prompt's 4 answers are worth
    # 1.6 independent ones; an answer-level bootstrap's interval is too narrow by sqrt(2.5)
    prompts = coverage(lambda rng: rng.beta(0.3, 0.7, size=200), seed=2)
    answers = coverage(lambda rng: rng.beta(0.3, 0.7, size=200), seed=2, answer_level=True, draws=200)  # 200: fast
    assert 0.88 <= prompts <= 0.99
    assert answers < 0.85


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: weighted_mean([1.0, 2.0], [0], np.ones((2, 1))), "2 values but 1 unit indices"),
        (lambda: weighted_sum([1.0, 2.0], [0, 2], np.ones((2, 2))), r"unit index 2 out of range \[0, 2\)"),
        (lambda: weighted_median([1.0, 2.0], [-1, 0], np.ones((2, 2))), r"unit index -1 out of range"),
        (lambda: weighted_upper_cvar([1.0], [0], np.ones((2, 1)), 0.0), r"level must be in \(0, 1\]"),
        (lambda: weighted_upper_cvar([1.0], [0], np.ones((2, 1)), 1.5), r"level must be in \(0, 1\]"),
        (lambda: weighted_upper_cvar([1.0], [0], np.ones((2, 1)), math.nan), r"level must be in \(0, 1\]"),
        (lambda: percentile_interval(np.arange(3.0), level=0.0), r"level must be in \(0, 1\]"),
        (lambda: percentile_interval(np.arange(3.0), level=1.01), r"level must be in \(0, 1\]"),
        (lambda: percentile_interval(np.ones((2, 2))), "estimates must be 1-D"),
        (lambda: weighted_mean([1.0], [0], np.ones(3)), "weights must be 2-D"),
        (lambda: weighted_mean([1.0], [0.0], np.ones((2, 1))), "unit_of must hold integers"),
        (lambda: weighted_mean([[1.0]], [0], np.ones((2, 1))), "must be 1-D"),
        (lambda: weighted_mean([math.nan], [0], np.ones((2, 1))), "values must be finite"),
        (lambda: weighted_mean([1.0], [0], -np.ones((2, 1))), "weights must be finite and >= 0"),
        (lambda: resample_weights(-1, 10, seed=0), "n_units must be >= 0"),
        (lambda: resample_weights(5, 0, seed=0), "draws must be >= 1"),
    ],
)
def test_bad_input_raises(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_win_rates_by_hand() -> None:
    """1 for a win, 0.5 for a tie, 0 for a loss, averaged; higher scores win unless told
    otherwise (harmlessness compares costs, lower is better)."""
    from rsa_pl.evaluation.metrics import win, win_rate

    policy, baseline = [2.0, 1.0, 3.0, 0.5], [1.0, 1.0, 4.0, 0.25]
    assert win_rate(policy, baseline) == (1 + 0.5 + 0 + 1) / 4
    assert win_rate(policy, baseline, higher_is_better=False) == (0 + 0.5 + 1 + 0) / 4
    assert (win(3.0, 1.0), win(1.0, 1.0), win(1.0, 3.0)) == (1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match=r"^win_rate: 2 policy scores but 1 baseline scores$"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"^win_rate: no prompts$"):
        win_rate([], [])


def test_metric_inputs_out_of_their_domain_are_named() -> None:
    from rsa_pl.evaluation.metrics import sampled_kl

    for level in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^upper_cvar: level must be in \(0, 1\], got {level}$"):
            upper_cvar([1.0, 2.0], level)
    assert sampled_kl([-1.0, -3.0], [-2.0, -2.0]) == 0.0
    for policy, reference in (([], []), ([-1.0], [-1.0, -2.0])):
        with pytest.raises(ValueError, match=r"^sampled_kl: needs as many reference as policy log-probabilities"):
            sampled_kl(policy, reference)


def test_one_bootstrap_draw_is_allowed_and_bad_input_names_its_estimator() -> None:
    assert resample_weights(5, 1, seed=0).shape == (1, 5)
    assert resample_weights(5, 1, seed=0).sum() == 5
    with pytest.raises(ValueError, match=r"^resample_weights: draws must be >= 1, got 0$"):
        resample_weights(5, 0, seed=0)
    weights = resample_weights(2, 3, seed=0)
    estimators = {"weighted_mean": weighted_mean, "weighted_sum": weighted_sum, "weighted_median": weighted_median,
                  "weighted_upper_cvar": lambda v, u, w: weighted_upper_cvar(v, u, w, 0.5)}  # fmt: skip
    for name, estimator in estimators.items():
        with pytest.raises(ValueError, match=rf"^{name}: 3 values but 2 unit indices$"):
            estimator([1.0, 2.0, 3.0], [0, 1], weights)


def test_a_draw_that_picked_one_answer_once_has_that_answers_mean() -> None:
    weights = np.array([[1, 0, 0], [0, 0, 0], [0, 2, 1]])
    means = weighted_mean([5.0, 7.0, 1.0], [0, 1, 2], weights)
    assert means[0] == 5.0
    assert np.isnan(means[1])
    assert means[2] == 5.0
