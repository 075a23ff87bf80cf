"""Confidence intervals, p-values and multiplicity control for ``mgrpo report``, with ``scipy.stats``.

The estimand of a study (``docs/report.md``): the expected difference on *this* test set over
training seeds; the problems are fixed and the seeds are the random draws. Each seed's run scores the
same problems, so each seed gives one value (the mean over problems, or a rate's ratio of sums) and
the seeds are independent replicates:

- :func:`t_interval`: the 95% Student-t interval of a mean over replicates, ``mean ± t(0.975, n−1) ·
  s/√n``, and the two-sided p-value of the t-test of mean 0. Applied to per-seed paired differences
  (same seed, both groups) it is the report's interval for a difference, a change over training and
  a group value, for means and for rates alike.
- :func:`two_way_interval`: a population-level interval for the mean of a seeds × problems matrix of
  paired differences, seeds *and* problems random (two-way random effects, variance from the ANOVA
  mean squares, Satterthwaite's degrees of freedom): what the difference would be on another draw
  of problems from the same source. Shown beside the primary endpoint, as a secondary reading.
- :func:`holm`: Holm's step-down adjustment of a family of p-values (familywise error ≤ 5%).
- :func:`crossed_bootstrap` / :func:`crossed_bootstrap_ratio`: the percentile bootstrap of the mean
  (or of a ratio of sums) of a seeds × problems matrix with seeds and problems resampled
  independently. With one seed it is the ordinary bootstrap over problems: the report's interval for
  a single run (``mgrpo eval`` comparisons). With several seeds it counts the seed × problem
  interaction about three times and over-covers (``docs/report.md``, the coverage table); the report
  no longer uses it there.
- :func:`verdict`: the plain-words reading of a difference interval (excludes 0 or not).
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
    method: str  # "t" | "bootstrap" | "two-way"
    p: float | None = None  # two-sided p-value of "the mean is 0" (None when there is no test)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def excludes_zero(self) -> bool:
        return self.defined and (self.low > 0 or self.high < 0)


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` (NaN entries dropped) with its Student-t interval and the t-test's p-value
    (NaN bounds when there is one value)."""
    from scipy import stats

    x = np.asarray(values, dtype=float).reshape(-1)
    x = x[~np.isnan(x)]
    if x.size == 0:
        raise ValueError("t_interval: no values")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, 1, "t")
    if np.all(x == x[0]):
        return Interval(mean, mean, mean, int(x.size), "t", _constant_p(mean))
    sem = float(stats.sem(x))  # s / sqrt(n), ddof = 1
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=sem)
    p = float(2 * stats.t.sf(abs(mean) / sem, x.size - 1))
    return Interval(mean, float(low), float(high), int(x.size), "t", p)


def _constant_p(mean: float) -> float:
    """The p-value of values that are all equal: 0 when they are not 0, else 1."""
    return 0.0 if mean != 0 else 1.0


def _bootstrap_p(values: np.ndarray) -> float:
    """Two-sided p-value from a bootstrap distribution: twice the smaller share on either side of 0
    (the smallest level at which the percentile interval would exclude 0)."""
    return float(min(1.0, 2 * min(np.mean(values <= 0), np.mean(values >= 0))))


def two_way_interval(matrix, confidence: float = CONFIDENCE) -> Interval:
    """Mean of a (seeds, problems) matrix with seeds and problems both random (two-way random effects
    without replication). Var(mean) = σ²_seed/S + σ²_problem/P + σ²_residual/(SP), estimated by
    (MS_seeds + MS_problems − MS_residual)/(SP) from the ANOVA mean squares (floored at MS_residual/(SP));
    degrees of freedom by Satterthwaite's approximation."""
    from scipy import stats

    d = np.asarray(matrix, dtype=float)
    if d.ndim != 2 or d.shape[0] < 2 or d.shape[1] < 2:
        raise ValueError(f"two_way_interval: need a (seeds, problems) matrix with 2+ of each, got shape {d.shape}")
    n_s, n_p = d.shape
    mean = float(d.mean())
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    ms_s = n_p * float(((rows - mean) ** 2).sum()) / (n_s - 1)
    ms_p = n_s * float(((cols - mean) ** 2).sum()) / (n_p - 1)
    resid = d - rows[:, None] - cols[None, :] + mean
    ms_e = float((resid ** 2).sum()) / ((n_s - 1) * (n_p - 1))
    combined = max(ms_s + ms_p - ms_e, ms_e)
    if combined == 0:
        return Interval(mean, mean, mean, n_s * n_p, "two-way", _constant_p(mean))
    terms = [(ms_s, n_s - 1), (ms_p, n_p - 1), (ms_e, (n_s - 1) * (n_p - 1))]
    df = combined ** 2 / sum(ms ** 2 / dof for ms, dof in terms)
    se = math.sqrt(combined / (n_s * n_p))
    low, high = stats.t.interval(confidence, df, loc=mean, scale=se)
    return Interval(mean, float(low), float(high), n_s * n_p, "two-way", float(2 * stats.t.sf(abs(mean) / se, df)))


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest p is multiplied by
    (m − i + 1), made non-decreasing, capped at 1. A hypothesis is rejected at 5% familywise error
    when its adjusted p-value is below 0.05. None entries (no test) stay None."""
    indexed = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    m = len(indexed)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


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
        return Interval(mean, mean, mean, n_seeds * n_problems, "bootstrap", _constant_p(mean))
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
    return Interval(mean, float(ci.low), float(ci.high), n_seeds * n_problems, "bootstrap",
                    _bootstrap_p(res.bootstrap_distribution))


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
    return Interval(mean, float(low), float(high), n_seeds * n_problems, "bootstrap", _bootstrap_p(values))


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
