"""Intervals of the report checked against hand computations."""
import math

import numpy as np
import pytest

from mgrpo_cli.reporting.stats import Interval, crossed_bootstrap, t_interval, verdict

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
    assert point == Interval(0.25, 0.25, 0.25, 21, "bootstrap")
    d = np.random.default_rng(0).integers(-1, 2, (3, 50))
    assert crossed_bootstrap(d, n_resamples=500) == crossed_bootstrap(d, n_resamples=500)


def test_verdict_words():
    assert verdict(Interval(0.05, 0.02, 0.08, 3, "t")) == "better (interval excludes 0)"
    assert verdict(Interval(0.05, 0.02, 0.08, 3, "t"), higher_is_better=False) == "worse (interval excludes 0)"
    assert verdict(Interval(-0.05, -0.08, -0.02, 3, "t")) == "worse (interval excludes 0)"
    assert verdict(Interval(0.01, -0.02, 0.04, 3, "t")) == "no detectable difference (interval includes 0)"
    assert verdict(Interval(0.01, math.nan, math.nan, 1, "t")).startswith("no interval")
