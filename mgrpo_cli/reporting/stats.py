"""Confidence intervals for ``mgrpo report``, computed with ``scipy.stats``.

- :func:`t_interval`: the 95% Student-t interval of a mean over replicates (seeds), ``mean ± t(0.975,
  n−1) · s/√n`` with ``s`` the sample standard deviation (``scipy.stats.t.interval`` on ``scipy.stats.sem``).
- :func:`crossed_bootstrap`: the percentile bootstrap interval of the mean of a seeds × problems
  matrix (e.g. per-problem paired differences, MGRPO − GRPO, one row per seed). Seeds and problems are
  resampled independently of each other (``scipy.stats.bootstrap`` with two unpaired samples of row
  and column indices), so the interval carries both the training noise between seeds and the sampling
  noise of a finite problem set. With one seed it is the ordinary bootstrap over problems. With few
  seeds (2–3) the seed part of the spread is underestimated by the bootstrap, as always with tiny
  samples: read it beside the t-interval over seeds.
- :func:`verdict`: the plain-words reading of a difference interval (excludes 0 or not).

Left out: multiple-comparison corrections and Bayesian summaries; ``rliable``'s stratified bootstrap
(it resamples runs within tasks but not the problems, and pulls arch, statsmodels and seaborn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (``low``/``high`` are NaN when none exists)."""

    mean: float
    low: float
    high: float
    n: int  # replicates behind the interval (seeds, or problems for a single run)
    method: str  # "t" | "bootstrap"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def excludes_zero(self) -> bool:
        return self.defined and (self.low > 0 or self.high < 0)


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` with its Student-t interval (NaN bounds when there is one value)."""
    from scipy import stats

    x = np.asarray(values, dtype=float).reshape(-1)
    if x.size == 0:
        raise ValueError("t_interval: no values")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, 1, "t")
    if np.all(x == x[0]):
        return Interval(mean, mean, mean, int(x.size), "t")
    sem = float(stats.sem(x))  # s / sqrt(n), ddof = 1
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), int(x.size), "t")


def crossed_bootstrap(matrix, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> Interval:
    """Mean of a (seeds, problems) matrix with a percentile bootstrap over seeds × problems.

    Each resample draws seeds (rows) and problems (columns) with replacement, independently, and
    takes the mean of the crossed sub-matrix. Deterministic for a given ``seed``.
    """
    from scipy import stats

    d = np.asarray(matrix, dtype=float)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"crossed_bootstrap: need a non-empty (seeds, problems) matrix, got shape {d.shape}")
    n_seeds, n_problems = d.shape
    mean = float(d.mean())
    if np.all(d == d.flat[0]) or n_seeds * n_problems < 2:
        return Interval(mean, mean, mean, n_seeds * n_problems, "bootstrap")
    if n_seeds == 1:
        samples = (np.arange(n_problems),)

        def statistic(p, axis=-1):
            return d[0][p].mean(axis=-1)
    else:
        samples = (np.arange(n_seeds), np.arange(n_problems))

        def statistic(s, p, axis=-1):  # s: (batch, n_seeds), p: (batch, n_problems) resampled indices
            return d[s[..., :, None], p[..., None, :]].mean(axis=(-2, -1))

    batch = max(1, 2_000_000 // (n_seeds * n_problems))
    res = stats.bootstrap(samples, statistic, n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", paired=False, vectorized=True, batch=batch,
                          rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), n_seeds * n_problems, "bootstrap")


def verdict(iv: Interval, higher_is_better: bool = True,
            words: tuple[str, str, str] = ("better", "worse", "no detectable difference")) -> str:
    """``better``/``worse`` (interval excludes 0, in the direction of ``higher_is_better``) or
    ``no detectable difference`` (interval includes 0, or no interval)."""
    if not iv.defined:
        return "no interval (too few replicates)"
    if not iv.excludes_zero():
        return f"{words[2]} (interval includes 0)"
    good = (iv.mean > 0) == higher_is_better
    return f"{words[0] if good else words[1]} (interval excludes 0)"
