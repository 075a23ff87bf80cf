"""Intervals of the report checked against hand computations."""
import math

import numpy as np
import pytest

from mgrpo_cli.reporting.stats import Interval, crossed_bootstrap, holm, t_interval, verdict

T_975 = {2: 4.302653, 9: 2.262157}  # Student-t 97.5% quantiles from a printed table, by degrees of freedom


def test_t_interval_of_three_seeds():
    iv = t_interval([0.5, 0.6, 0.7])
    half = T_975[2] * 0.1 / math.sqrt(3)  # s = 0.1
    assert iv.mean == pytest.approx(0.6)
    assert iv.low == pytest.approx(0.6 - half, abs=1e-6) and iv.high == pytest.approx(0.6 + half, abs=1e-6)
    assert iv.n == 3 and iv.method == "t"


def test_t_interval_of_one_value_has_no_bounds_and_of_equal_values_is_a_point():
    one = t_interval([0.4])
    assert one.mean == 0.4 and not one.defined
    same = t_interval([0.4, 0.4, 0.4])
    assert same.low == same.high == same.mean == pytest.approx(0.4)
    with pytest.raises(ValueError):
        t_interval([])


def test_bootstrap_over_two_seeds_without_problem_noise_is_the_exact_resampling_distribution():
    # rows constant over problems: only the seed draw matters; resampled means are 0, 0.5, 1 with
    # probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5% percentiles are 0 and 1
    iv = crossed_bootstrap([[0.0] * 5, [1.0] * 5])
    assert iv.mean == 0.5 and iv.low == pytest.approx(0.0) and iv.high == pytest.approx(1.0)


def test_bootstrap_over_problems_of_one_run_matches_the_normal_approximation():
    values = np.array([1.0] * 120 + [0.0] * 280)  # 400 problems, mean 0.3
    iv = crossed_bootstrap(values[None, :])
    half = 1.959964 * math.sqrt(0.3 * 0.7 / 400)  # the bootstrap's variance uses 1/n
    assert iv.mean == pytest.approx(0.3)
    assert iv.low == pytest.approx(0.3 - half, abs=0.006) and iv.high == pytest.approx(0.3 + half, abs=0.006)


def test_crossed_bootstrap_carries_seed_and_problem_variance():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 60), rng.normal(0, 2, 300)  # seed effects, problem effects
    d = a[:, None] + b[None, :] + 0.5
    iv = crossed_bootstrap(d, n_resamples=4000)
    half = 1.959964 * math.sqrt(a.var() / a.size + b.var() / b.size)
    assert iv.mean == pytest.approx(d.mean())
    assert iv.half_width == pytest.approx(half, rel=0.1)
    # a problems-only bootstrap would miss the seed part
    assert iv.half_width > 1.3 * 1.959964 * math.sqrt(b.var() / b.size)


def test_bootstrap_of_a_constant_difference_is_that_constant_and_deterministic():
    point = crossed_bootstrap(np.full((3, 7), 0.25))
    assert point == Interval(0.25, 0.25, 0.25, 21, "bootstrap", 0.0)
    d = np.random.default_rng(0).integers(-1, 2, (3, 50))
    assert crossed_bootstrap(d, n_resamples=500) == crossed_bootstrap(d, n_resamples=500)


def test_verdict_words():
    assert verdict(Interval(0.05, 0.02, 0.08, 3, "t")) == "better (interval excludes 0)"
    assert verdict(Interval(0.05, 0.02, 0.08, 3, "t"), higher_is_better=False) == "worse (interval excludes 0)"
    assert verdict(Interval(-0.05, -0.08, -0.02, 3, "t")) == "worse (interval excludes 0)"
    assert verdict(Interval(0.01, -0.02, 0.04, 3, "t")) == "no detectable difference (interval includes 0)"
    assert verdict(Interval(0.01, math.nan, math.nan, 1, "t")).startswith("no interval")


def test_t_interval_p_value_has_the_closed_form_of_two_degrees_of_freedom():
    # df = 2: P(T > t) = (1 - t / sqrt(t² + 2)) / 2
    iv = t_interval([0.5, 0.6, 0.7])
    t = 0.6 / (0.1 / math.sqrt(3))
    assert iv.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert t_interval([0.2, 0.2]).p == 0.0 and t_interval([0.0, 0.0]).p == 1.0
    assert t_interval([0.1, math.nan, 0.3]).n == 2  # a seed without a value (a rate with no denominator)


def test_holm_adjusts_by_rank_and_keeps_the_order():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06
    assert holm([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    assert holm([0.6, 0.9]) == [1.0, 1.0] and holm([]) == []


def test_two_way_interval_from_the_anova_mean_squares():
    from scipy import stats

    from mgrpo_cli.reporting.stats import two_way_interval

    # rows 2, 3; columns 1.5, 3, 3; mean 2.5: MS_seeds = 3 · 0.5 = 1.5, MS_problems = 2 · 1.5 / 2 = 1.5,
    # residuals 0, -0.5, 0.5, 0, 0.5, -0.5 -> MS_residual = 1 / 2; Var(mean) = (1.5 + 1.5 - 0.5) / 6
    iv = two_way_interval([[1, 2, 3], [2, 4, 3]])
    df = 2.5 ** 2 / (1.5 ** 2 / 1 + 1.5 ** 2 / 2 + 0.5 ** 2 / 2)  # Satterthwaite
    half = stats.t.ppf(0.975, df) * math.sqrt(2.5 / 6)
    assert iv.mean == 2.5 and iv.method == "two-way"
    assert iv.low == pytest.approx(2.5 - half, rel=1e-9) and iv.high == pytest.approx(2.5 + half, rel=1e-9)
    # without problem effects it is close to the t-interval over the seeds' means
    rng = np.random.default_rng(3)
    d = rng.normal(0, 1, (10, 1))[:, [0] * 200] + rng.normal(0, 0.01, (10, 200))
    assert two_way_interval(d).half_width == pytest.approx(t_interval(d.mean(axis=1)).half_width, rel=0.02)


def test_bootstrap_p_value_is_the_share_beyond_zero():
    d = np.concatenate([np.ones((1, 30)), np.zeros((1, 10))], axis=1)  # one run, 40 problems, 75% ones
    iv = crossed_bootstrap(d, n_resamples=2000)
    assert iv.p == 0.0 and iv.low > 0  # no resample has a mean of 0 or below
    assert crossed_bootstrap(d - 0.75, n_resamples=2000).p > 0.5  # centred: about half on each side
