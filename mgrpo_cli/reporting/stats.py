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
- :func:`crossed_bootstrap_ratio`: the same bootstrap for a ratio of sums (a conditional rate such as
  the share of t1-wrong problems right at t2), or a signed sum of such ratios (a difference of rates).
  Each resample recomputes every ratio from its resampled numerator and denominator sums: the
  denominators differ between runs, so per-problem differences of a rate are not defined.
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


def ratio_of_sums(num, den) -> float:
    """``sum(num) / sum(den)``; NaN when the denominator sums to 0."""
    total = float(np.sum(den))
    return float(np.sum(num)) / total if total else math.nan


def crossed_bootstrap_ratio(parts, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                            seed: int = 0) -> Interval:
    """``sum_k w_k · sum(num_k) / sum(den_k)`` over (seeds, problems) matrices, with a percentile
    bootstrap over seeds × problems.

    ``parts`` is a list of ``(w, num, den)``: one part gives a rate, ``[(1, num_b, den_b), (-1, num_a,
    den_a)]`` the difference of two rates with the same seeds and problems resampled for both (paired).
    Each resample draws seeds and problems with replacement, independently, and recomputes every
    ratio of sums on the crossed sub-matrices. The point estimate and interval are NaN when a
    denominator sums to 0 on the data; a resample whose denominator sums to 0 is dropped from the
    percentiles. Deterministic for a given ``seed``.
    """
    mats = [(float(w), np.asarray(num, dtype=float), np.asarray(den, dtype=float)) for w, num, den in parts]
    if not mats:
        raise ValueError("crossed_bootstrap_ratio: no parts")
    shape = mats[0][1].shape
    if len(shape) != 2 or 0 in shape or any(m.shape != shape for _, num, den in mats for m in (num, den)):
        raise ValueError(f"crossed_bootstrap_ratio: need non-empty (seeds, problems) matrices of one shape, got "
                         f"{[(num.shape, den.shape) for _, num, den in mats]}")
    n_seeds, n_problems = shape
    mean = sum(w * ratio_of_sums(num, den) for w, num, den in mats)
    if math.isnan(mean):
        return Interval(mean, math.nan, math.nan, n_seeds * n_problems, "bootstrap")
    rng = np.random.default_rng(seed)
    batch = max(1, 2_000_000 // (n_seeds * n_problems * len(mats)))
    stats = []
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        s = rng.integers(0, n_seeds, (b, n_seeds))
        p = rng.integers(0, n_problems, (b, n_problems))
        value = np.zeros(b)
        for w, num, den in mats:
            nsum = num[s[:, :, None], p[:, None, :]].sum(axis=(1, 2))
            dsum = den[s[:, :, None], p[:, None, :]].sum(axis=(1, 2))
            with np.errstate(invalid="ignore", divide="ignore"):
                value = value + w * np.where(dsum > 0, nsum / np.where(dsum > 0, dsum, 1.0), np.nan)
        stats.append(value)
    values = np.concatenate(stats)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Interval(mean, math.nan, math.nan, n_seeds * n_problems, "bootstrap")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return Interval(mean, float(low), float(high), n_seeds * n_problems, "bootstrap")


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
