"""Fabricated studies with a known truth: how often do the report's intervals cover it?

A study = S seeds × 2 methods (a, b) × P problems, each run answering every problem at t1 and t2.
Correctness comes from a probit model with the effects a real study has:

- per problem: a difficulty (``difficulty``), an interaction with the method (``problem_x_method``),
  and its own chance of being kept right or fixed at t2;
- per seed: an effect shared by both methods (``seed``: the problem stream, the sampling);
- per run (seed × method): an effect on t1 (``run``), on keeping right answers (``run_keep``) and on
  fixing wrong ones (``run_fix``: the fix rate varies most between seeds, as in the real studies);
- per seed × problem (``seed_x_problem``, shared by both methods) and per run × problem
  (``run_x_problem``): which problems a run happens to get right.

Method b adds ``effect`` to t1's latent value, ``keep_effect`` to keeping and ``fix_effect`` to fixing.
The defaults give studies like the real ones (``docs/studies.md``): Acc@t1 ≈ 51%, Acc@t2 ≈ 57–60%,
fix rate ≈ 23–25%, break rate ≈ 7–9%; sd over seeds of the per-seed difference b − a ≈ 4.4 points in
Acc@t2 and 7 points in the fix rate (measured there: 3.2 and 6.1).
The problems are drawn once (``problems``) and stay fixed; the estimand is the report's: the expected
difference b − a on *these* problems over seeds, for a mean (Acc@t2) the expected per-seed mean, for a
rate (fix rate) the expected per-seed rate. The truth is that expectation, computed by Monte Carlo
over ``truth_seeds`` seeds (its error is two orders of magnitude below the intervals' half-widths).
:func:`coverage` draws ``n_studies`` studies of ``n_seeds`` seeds and counts the intervals that
contain the truth, for the report's method (``analysis.per_row`` per seed, ``stats.t_interval`` over
the paired per-seed differences) or for the crossed bootstrap it replaced (``stats.crossed_bootstrap``
and ``stats.crossed_bootstrap_ratio``, whose estimand for a rate is the pooled ratio of sums; its
truth is computed the same way).

``scripts/coverage_table.py`` prints the table of ``docs/report.md``; ``tests/reporting/test_coverage.py``
checks the report's method at 3, 5 and 10 seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mgrpo_cli.reporting.analysis import RATES, per_row, values_of
from mgrpo_cli.reporting.stats import crossed_bootstrap, crossed_bootstrap_ratio, t_interval


@dataclass(frozen=True)
class Model:
    """Standard deviations (probit scale) and effects of the fabricated studies (see the module docstring)."""

    n_problems: int = 200
    difficulty: float = 2.0
    problem_x_method: float = 0.3
    keep: tuple[float, float] = (1.8, 1.0)  # mean and sd over problems of keeping a right answer at t2
    fix: tuple[float, float] = (-1.0, 1.0)  # mean and sd over problems of fixing a wrong one
    seed: float = 0.15
    run: float = 0.05
    run_keep: float = 0.08
    run_fix: float = 0.15
    seed_x_problem: float = 0.4
    run_x_problem: float = 0.3
    effect: float = 0.05
    keep_effect: float = 0.2
    fix_effect: float = 0.1
    changed_when_wrong_twice: float = 0.5  # share of wrong→wrong answers that change


@dataclass(frozen=True)
class Problems:
    difficulty: np.ndarray
    x_method: np.ndarray
    keep: np.ndarray
    fix: np.ndarray


def problems(model: Model, seed: int = 0) -> Problems:
    """The fixed problem set of every study (the estimand is conditional on it)."""
    rng = np.random.default_rng(seed)
    p = model.n_problems
    return Problems(rng.normal(0, model.difficulty, p), rng.normal(0, model.problem_x_method, p),
                    rng.normal(*model.keep, p), rng.normal(*model.fix, p))


def draw(model: Model, probs: Problems, shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Runs of both methods for ``shape`` = (..., seeds): arrays {"a"|"b": (t1, t2, changed)}, each
    of shape shape + (problems,), 0/1 floats."""
    full = (*shape, model.n_problems)
    seed = rng.normal(0, model.seed, (*shape, 1))
    seed_x_problem = rng.normal(0, model.seed_x_problem, full)
    out = {}
    for name, m in (("a", 0.0), ("b", 1.0)):
        latent = (probs.difficulty + m * (model.effect + probs.x_method) + seed
                  + rng.normal(0, model.run, (*shape, 1)) + seed_x_problem + rng.normal(0, model.run_x_problem, full))
        t1 = (latent + rng.normal(0, 1, full) > 0).astype(float)
        kept = probs.keep + m * model.keep_effect + rng.normal(0, model.run_keep, (*shape, 1)) + rng.normal(0, 1, full) > 0
        fixed = probs.fix + m * model.fix_effect + rng.normal(0, model.run_fix, (*shape, 1)) + rng.normal(0, 1, full) > 0
        t2 = np.where(t1 > 0, kept, fixed).astype(float)
        other_wrong = rng.random(full) < model.changed_when_wrong_twice
        changed = np.where(t1 != t2, 1.0, np.where(t1 > 0, 0.0, other_wrong.astype(float)))
        out[name] = (t1, t2, changed)
    return out


@dataclass(frozen=True)
class Truth:
    per_seed: float  # E over seeds of the per-seed difference b − a: the report's estimand
    pooled: float  # for a rate, the difference of E(numerator) / E(denominator): the crossed bootstrap's


def truth(model: Model, probs: Problems, metric: str, n_seeds: int = 20_000, seed: int = 1) -> Truth:
    """The estimands by Monte Carlo over ``n_seeds`` seeds (in chunks of 1,000)."""
    rng = np.random.default_rng(seed)
    diffs, sums = [], {"a": np.zeros(2), "b": np.zeros(2)}
    for start in range(0, n_seeds, 1000):
        runs = draw(model, probs, (min(1000, n_seeds - start),), rng)
        diffs.append(per_row(*runs["b"], metric) - per_row(*runs["a"], metric))
        if metric in RATES:
            for name in ("a", "b"):
                sums[name] += [values_of(*runs[name], k).sum() for k in RATES[metric]]
    per_seed = float(np.nanmean(np.concatenate(diffs)))
    pooled = sums["b"][0] / sums["b"][1] - sums["a"][0] / sums["a"][1] if metric in RATES else per_seed
    return Truth(per_seed, float(pooled))


@dataclass(frozen=True)
class Coverage:
    method: str
    metric: str
    n_seeds: int
    n_studies: int
    covered: int
    mean_half_width: float

    @property
    def rate(self) -> float:
        return self.covered / self.n_studies

    @property
    def mc_se(self) -> float:
        """The Monte-Carlo standard error of a 95% coverage estimated from ``n_studies`` studies."""
        return math.sqrt(0.95 * 0.05 / self.n_studies)


def coverage(model: Model, probs: Problems, true: Truth, metric: str, n_seeds: int, n_studies: int,
             method: str = "t", seed: int = 2, n_resamples: int = 1000) -> Coverage:
    """How many of ``n_studies`` fabricated studies' 95% intervals for b − a contain the truth:
    ``method`` "t" = the report's (t-interval over the per-seed paired differences), "crossed" = the
    crossed bootstrap over seeds × problems."""
    rng = np.random.default_rng(seed)
    covered, widths = 0, []
    for start in range(0, n_studies, 250):
        runs = draw(model, probs, (min(250, n_studies - start), n_seeds), rng)
        per_seed = per_row(*runs["b"], metric) - per_row(*runs["a"], metric)  # (studies, seeds)
        for i in range(per_seed.shape[0]):
            if method == "t":
                iv, target = t_interval(per_seed[i]), true.per_seed
            elif metric in RATES:
                parts = [(w, values_of(*(x[i] for x in runs[name]), k_num), values_of(*(x[i] for x in runs[name]), k_den))
                         for w, name in ((1.0, "b"), (-1.0, "a")) for k_num, k_den in [RATES[metric]]]
                iv, target = crossed_bootstrap_ratio(parts, n_resamples=n_resamples, seed=start + i), true.pooled
            else:
                d = values_of(*(x[i] for x in runs["b"]), metric) - values_of(*(x[i] for x in runs["a"]), metric)
                iv, target = crossed_bootstrap(d, n_resamples=n_resamples, seed=start + i), true.per_seed
            covered += int(iv.low <= target <= iv.high)
            widths.append(iv.half_width)
    return Coverage(method, metric, n_seeds, n_studies, covered, float(np.mean(widths)))
