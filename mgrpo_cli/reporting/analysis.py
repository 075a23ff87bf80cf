"""Grouping, statistics and verdicts of a report's runs.

Runs are grouped by the override keys whose values differ among them; ``seed`` is the replicate
key. Every number is read per seed first (``seed_values``: a run's mean over the problems, or its
rate's ratio of sums) and then over seeds, with the t-interval over seeds (``ESTIMAND``): for every
group Acc@t1, Acc@t2, Δ(t1,t2), Δi→c, Δc→i, the fix and break rates and the answer-changed rate at
the start and the end of training, and the end − start change paired by run; for every pair of groups
that differ in one key, the per-seed paired difference (same seed, same problems). A group of one run
is read over its problems instead (``mgrpo eval`` comparisons).

Verdicts: one primary endpoint (``PRIMARY``, ``analyse(primary=...)``) at 95%, with a population-level
interval beside it (problems random too, ``stats.two_way_interval``); the other between-group
comparisons are secondary, Holm-adjusted over their family, and the changes over training are a
family of their own. Δi→c and Δc→i count the same problems as the fix and break rates
(``DUPLICATES``): their verdict is the rate's, given once.

Reward vanishing (``vanishing``), from each run's per-step training history (MLflow): per layer the
mean over the steps of the share of zero-variance groups (groups whose rewards are all equal, so
their advantages are 0), the share of steps in which layer 1 had no usable group (every group
zero-variance) and the share in which no layer had one (no gradient from the reward at all); per group
the mean with a 95% t-interval over seeds, between groups the difference paired by seed.

Left out: runs on different problem sets in one report (one problem set per report).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mgrpo_cli.reporting.heldout import ProblemResult
from mgrpo_cli.reporting.load import REPLICATE_KEY, Evaluation, ReportError, Run
from mgrpo_cli.reporting.stats import (
    N_RESAMPLES,
    Interval,
    crossed_bootstrap,
    crossed_bootstrap_ratio,
    holm,
    t_interval,
    two_way_interval,
    verdict,
)

# (key, label, higher is better; None: neither direction is better, the verdict says higher or lower)
METRICS = (("acc_t1", "Acc@t1", True), ("acc_t2", "Acc@t2", True), ("delta", "Δ(t1,t2)", True),
           ("delta_i2c", "Δi→c", True), ("delta_c2i", "Δc→i", False),
           ("fix_rate", "fix rate", True), ("break_rate", "break rate", False),
           ("changed", "answer changed", None))
PRIMARY = "acc_t2"  # the primary endpoint at the end of training (``mgrpo report --primary``)
# metrics that carry another one's signal (the same counts over all problems instead of over the
# rate's denominator): shown in the tables, their verdict is the other one's
DUPLICATES = {"delta_i2c": "fix_rate", "delta_c2i": "break_rate"}
ALPHA = 0.05
ESTIMAND = ("the expected difference on these problems over training seeds (the problems fixed, the seeds "
            "random): the mean of the per-seed paired differences (same seed, same problems) with a t-interval "
            "over seeds, for means and rates alike; one run per group: over its problems")
# the conditional rates as (numerator, denominator) of per-problem values (``per_problem``)
RATES = {"fix_rate": ("wr", "t1_wrong"), "break_rate": ("rw", "t1_right")}
TRANSITIONS = (("rr", "right→right", "#4c9a5b"), ("wr", "wrong→right", "#7fc97f"),
               ("rw", "right→wrong", "#e0655a"), ("ww", "wrong→wrong", "#9e9e9e"))
# overrides that change where or how fast a run goes, not what it computes: never a grouping key
IGNORED_KEYS = ("hydra", "paths", "logger", "trainer.threads", "trainer.checkpoint_every",
                "trainer.weight_checksums", "ckpt_path", "eval.batch_size")
# keys that choose the evaluated problems: runs of one report must agree on them
PROBLEM_SET_KEYS = ("dataset", "eval.split", "eval.limit", "rescore")


# ---------------------------------------------------------------------------- groups

@dataclass
class Group:
    values: tuple[str, ...]  # one per varying key
    label: str
    runs: list[Run]  # one per seed, by seed

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


@dataclass
class Grouping:
    keys: list[str]  # the varying keys, in order of first appearance
    groups: list[Group]
    shared: list[str]  # overrides every run has, with one value
    pairs: list[tuple[str, Group, Group]]  # (the key that differs, first value's group, second's)


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in IGNORED_KEYS)


def _short_values(values: list[str]) -> dict[str, str]:
    """Labels for one key's values: paths shortened to their last parts, as few as keep them apart."""
    values = list(dict.fromkeys(values))
    if not all("/" in v for v in values):
        return {v: v for v in values}
    for n in range(1, max(len(Path(v).parts) for v in values) + 1):
        tails = {v: str(Path(*Path(v).parts[-n:])) for v in values}
        if len(set(tails.values())) == len(values):
            return tails
    return {v: v for v in values}


def group_runs(runs: list[Run]) -> Grouping:
    commands = sorted({r.command for r in runs})
    if len(commands) > 1:
        raise ReportError("runs mix `mgrpo train` and `mgrpo eval` results: report one command's runs at a time")
    keys: list[str] = []
    for r in runs:
        for k in r.override_keys:
            if k not in keys and k != REPLICATE_KEY and not _ignored(k):
                keys.append(k)
    varying = [k for k in keys if len({r.value(k) for r in runs}) > 1]
    problem_keys = [k for k in varying if any(k == p or k.startswith(p + ".") for p in PROBLEM_SET_KEYS)]
    if problem_keys:
        k = problem_keys[0]
        raise ReportError(f"runs evaluate different problem sets ({k} = {', '.join(sorted({r.value(k) for r in runs}))}): "
                          "no comparable key; report one problem set at a time")
    shared = [f"{k}={runs[0].value(k)}" for k in keys if k not in varying]
    by_values: dict[tuple[str, ...], list[Run]] = {}
    for r in runs:
        by_values.setdefault(tuple(r.value(k) for k in varying), []).append(r)
    short = [_short_values([v[i] for v in by_values]) for i in range(len(varying))]
    groups = []
    for values, members in by_values.items():
        seeds = [r.seed for r in members]
        if len(set(seeds)) != len(seeds):
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            names = [Path(r.name).name for r in members if r.seed in dup]
            raise ReportError(f"runs {', '.join(names)} share every swept key and seed={dup[0]}: "
                              "no key tells them apart (sweep a key, or report them separately)")
        shown = [short[i][v] for i, v in enumerate(values)]
        if len(varying) == 1:
            label = shown[0]
        else:
            label = ", ".join(f"{k}={v}" for k, v in zip(varying, shown, strict=True)) or "all runs"
        groups.append(Group(values, label, sorted(members, key=lambda r: r.seed)))
    pairs = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            differ = [k for k, x, y in zip(varying, a.values, b.values, strict=True) if x != y]
            if len(differ) == 1:
                pairs.append((differ[0], a, b))
    if len(groups) > 1 and not pairs:
        raise ReportError(f"runs share no comparable key: every two of the groups ({'; '.join(g.label for g in groups)}) "
                          "differ in more than one key; sweep one key at a time")
    return Grouping(varying, groups, shared, pairs)


# ---------------------------------------------------------------------------- numbers

def values_of(t1, t2, changed, metric: str):
    """Per-problem values whose mean is ``metric`` (``metrics.self_correction``'s definitions), from 0/1
    arrays of any shape with the problems last: t1 right, t2 right, final answer changed (``t2`` and
    ``changed`` may be None for ``acc_t1``). ``t1_wrong``/``t1_right`` are the conditional rates'
    denominators (``RATES``)."""
    if metric == "acc_t1":
        return t1
    if metric == "changed":
        return changed
    return {"acc_t2": t2, "delta": t2 - t1, "delta_i2c": (1 - t1) * t2, "delta_c2i": t1 * (1 - t2),
            "rr": t1 * t2, "wr": (1 - t1) * t2, "rw": t1 * (1 - t2), "ww": (1 - t1) * (1 - t2),
            "t1_wrong": 1 - t1, "t1_right": t1}[metric]


def per_row(t1, t2, changed, metric: str):
    """One value per row (seed) of the arrays (``values_of``): the mean over the problems, or for a
    rate the ratio of sums (NaN when its denominator is 0: e.g. no t1-wrong problem)."""
    if metric not in RATES:
        return values_of(t1, t2, changed, metric).mean(axis=-1)
    num, den = (values_of(t1, t2, changed, k).sum(axis=-1) for k in RATES[metric])
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _arrays(rows_list: list[dict[str, ProblemResult]], ids: list[str]):
    """(t1, t2, changed) as float arrays (len(rows_list), len(ids)); t2 and changed None without t2."""
    t1 = np.array([[rows[i].t1 for i in ids] for rows in rows_list], dtype=float)
    if any(rows[i].t2 is None for rows in rows_list for i in ids):
        return t1, None, None
    t2 = np.array([[bool(rows[i].t2) for i in ids] for rows in rows_list], dtype=float)
    changed = np.array([[rows[i].t1_answer != rows[i].t2_answer for i in ids] for rows in rows_list], dtype=float)
    return t1, t2, changed


def per_problem(rows: dict[str, ProblemResult], ids: list[str], metric: str):
    """One value per problem of one evaluation whose mean is ``metric`` (``values_of``)."""
    return values_of(*_arrays([rows], ids), metric)[0]


def _matrix(evals: list[Evaluation], ids: list[str], metric: str):
    return values_of(*_arrays([e.rows for e in evals], ids), metric)  # (seeds, problems)


def _rate_part(w: float, evals: list[Evaluation], ids: list[str], metric: str):
    num, den = RATES[metric]
    return (w, _matrix(evals, ids, num), _matrix(evals, ids, den))


def seed_values(evals: list[Evaluation], ids: list[str], metric: str):
    """The metric of each evaluation (one per seed) on the problems ``ids`` (``per_row``)."""
    return per_row(*_arrays([e.rows for e in evals], ids), metric)


def seeds_interval(values) -> Interval:
    """The t-interval over per-seed values (NaN ones dropped; no interval when none is left)."""
    x = np.asarray(values, dtype=float)
    if np.isnan(x).all():
        return Interval(math.nan, math.nan, math.nan, 0, "t")
    return t_interval(x)


def group_interval(evals: list[Evaluation], ids: list[str], metric: str, n_resamples: int = N_RESAMPLES) -> Interval:
    """The mean over seeds of the per-seed values (``seed_values``) with its t-interval over seeds. One
    run: over its problems (a t-interval; a rate: the bootstrap over problems of its ratio of sums)."""
    if len(evals) > 1:
        return seeds_interval(seed_values(evals, ids, metric))
    if metric in RATES:
        return crossed_bootstrap_ratio([_rate_part(1.0, evals, ids, metric)], n_resamples=n_resamples)
    return t_interval(_matrix(evals, ids, metric)[0])


def value(evals: list[Evaluation], ids: list[str], metric: str) -> float:
    """The metric of a group: the mean over seeds of the per-seed values (one run: its value)."""
    v = seed_values(evals, ids, metric)
    return math.nan if np.isnan(v).all() else float(np.nanmean(v))


def paired_difference(ea: list[Evaluation], eb: list[Evaluation], ids: list[str], metric: str,
                      n_resamples: int = N_RESAMPLES) -> Interval:
    """``metric`` of ``eb`` − ``metric`` of ``ea`` (same seeds in the same order, same problems): the
    t-interval over the per-seed paired differences (the estimand: the expected difference on these
    problems over training seeds). One seed: the bootstrap over problems of the per-problem paired
    differences, or for a rate of the difference of the two ratios of sums."""
    if len(ea) > 1:
        return seeds_interval(seed_values(eb, ids, metric) - seed_values(ea, ids, metric))
    if metric in RATES:
        return crossed_bootstrap_ratio([_rate_part(1.0, eb, ids, metric), _rate_part(-1.0, ea, ids, metric)],
                                       n_resamples=n_resamples)
    return crossed_bootstrap(_matrix(eb, ids, metric) - _matrix(ea, ids, metric), n_resamples=n_resamples)


def population_difference(ea: list[Evaluation], eb: list[Evaluation], ids: list[str], metric: str) -> Optional[Interval]:
    """The difference read with the problems random too (``stats.two_way_interval`` of the seeds ×
    problems matrix of paired differences); None for a rate or with fewer than 2 seeds."""
    if metric in RATES or len(ea) < 2:
        return None
    return two_way_interval(_matrix(eb, ids, metric) - _matrix(ea, ids, metric))


TARGET_HALF_WIDTH = 0.03  # the ±3 points a study should resolve


def seeds_needed(sd: float, half_width: float = TARGET_HALF_WIDTH, confidence: float = 0.95) -> Optional[int]:
    """The smallest n with t(confidence, n − 1) · sd / √n ≤ ``half_width``: the seeds the t-interval
    over per-seed differences of spread ``sd`` needs (None when sd is unknown)."""
    from scipy import stats

    if math.isnan(sd):
        return None
    if sd == 0:
        return 2
    n = 2
    while stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


ROLES = ("primary", "secondary", "duplicate")


@dataclass
class Comparison:
    title: str
    metric: str
    label: str
    higher_is_better: Optional[bool]
    a: str
    b: str
    a_mean: float
    b_mean: float
    diff: Interval
    n_seeds: int
    n_problems: int
    change: bool  # end − start of one group (else group b − group a)
    seed_sd: float = math.nan  # sample sd over seeds of the per-seed difference (NaN with < 2 seeds)
    role: str = "secondary"  # ROLES: the primary endpoint, a secondary one (Holm), or a duplicate's
    p_adjusted: Optional[float] = None  # Holm-adjusted over its family (the primary alone: its own p)
    duplicate_of: Optional[str] = None  # the metric whose verdict this one's is (``DUPLICATES``)
    population: Optional[Interval] = None  # the primary's interval with the problems random too

    def seeds_for(self, half_width: float = TARGET_HALF_WIDTH) -> Optional[int]:
        """Seeds per group for a 95% interval of ± ``half_width`` on this difference (``seeds_needed``)."""
        return seeds_needed(self.seed_sd, half_width)

    @property
    def words(self) -> tuple[str, str, str]:
        if self.change:
            return "grew", "fell", "no detectable change"
        if self.higher_is_better is None:
            return "higher", "lower", "no detectable difference"
        return "better", "worse", "no detectable difference"

    @property
    def verdict(self) -> str:
        if self.role == "duplicate":
            return f"no verdict of its own (the same counts as the {dict((m, lab) for m, lab, _ in METRICS)[self.duplicate_of]})"
        up = True if self.higher_is_better is None or self.change else self.higher_is_better
        if self.role == "primary" and self.p_adjusted == self.diff.p:
            return verdict(self.diff, up, self.words)
        if not self.diff.defined or self.p_adjusted is None:
            return "no interval (too few replicates)"
        if self.p_adjusted >= ALPHA:
            return f"{self.words[2]} (Holm-adjusted p = {self.p_adjusted:.2g})"
        good = (self.diff.mean > 0) == up
        return f"{self.words[0] if good else self.words[1]} (Holm-adjusted p = {self.p_adjusted:.2g})"

    def line(self) -> str:
        d = self.diff
        ci = f"[{pts(d.low)}, {pts(d.high)}]" if d.defined else "[no interval]"
        head = (f"{self.a} {self.label} end − start" if self.change
                else f"{self.b} {self.label} − {self.a} {self.label}")
        return (f"{head} = {pts(d.mean)} {ci} points "
                f"({self.n_seeds} seed{'s' * (self.n_seeds != 1)} × {self.n_problems} problems): {self.verdict}")


def adjust(family: list[Comparison]) -> None:
    """Holm over ``family`` (its p-values), written into each one's ``p_adjusted``."""
    for c, p in zip(family, holm([c.diff.p for c in family]), strict=True):
        c.p_adjusted = p


def pts(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:+.1f}"


def pm(iv: Interval) -> str:
    if not iv.defined:
        return f"{100 * iv.mean:.1f}"
    return f"{100 * iv.mean:.1f} ± {100 * iv.half_width:.1f}"


# ---------------------------------------------------------------------------- reward vanishing

def _no_usable(zv: dict[int, float], groups: dict[int, float], step: int) -> bool:
    """A layer at ``step`` has no usable group: no groups, or all of them zero-variance."""
    return groups.get(step, 1.0) == 0 or zv.get(step, 1.0) >= 1.0


def run_vanishing(history: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """One run's reward-vanishing numbers from its per-step history: ``zero_variance/layer<d>`` (mean
    over steps of the zero-variance share), ``no_usable/layer1`` and ``no_usable/all`` (share of layer 1's
    steps where layer 1, or every layer, had no usable group). Empty without layer 1's history."""
    depths = sorted(int(k.split("/")[1][len("layer"):]) for k in history
                    if k.startswith("train/layer") and k.endswith("/zero_variance_groups"))
    if 1 not in depths:
        return {}
    zv = {d: dict(history[f"train/layer{d}/zero_variance_groups"]) for d in depths}
    groups = {d: dict(history.get(f"train/layer{d}/groups", [])) for d in depths}
    steps = sorted(zv[1])
    out = {f"zero_variance/layer{d}": sum(zv[d].values()) / len(zv[d]) for d in depths if zv[d]}
    out["no_usable/layer1"] = sum(_no_usable(zv[1], groups[1], s) for s in steps) / len(steps)
    out["no_usable/all"] = sum(all(_no_usable(zv[d], groups[d], s) for d in depths) for s in steps) / len(steps)
    return out


def vanishing_order(key: str) -> tuple:
    """Zero-variance shares by layer, then steps without a usable group in layer 1, then in any layer."""
    return key.startswith("no_usable"), key.endswith("/all"), key


def vanishing_keys(groups: dict[str, dict[str, Interval]]) -> list[str]:
    return sorted({k for v in groups.values() for k in v}, key=vanishing_order)


def vanishing_label(key: str) -> str:
    kind, what = key.split("/")
    if kind == "zero_variance":
        return f"{what.replace('layer', 'layer ')}: zero-variance groups (mean over steps)"
    return "steps where layer 1 had no usable group" if what == "layer1" else "steps where no layer had a usable group"


@dataclass
class VanishingComparison:
    a: str
    b: str
    key: str
    diff: Interval  # b − a, t-interval over the per-seed differences
    n_seeds: int

    @property
    def verdict(self) -> str:  # fewer zero-variance groups is better: more of the batch trains
        return verdict(self.diff, higher_is_better=False)

    def line(self) -> str:
        d = self.diff
        ci = f"[{pts(d.low)}, {pts(d.high)}]" if d.defined else "[no interval]"
        return (f"{self.b} − {self.a}, {vanishing_label(self.key)} = {pts(d.mean)} {ci} points "
                f"({self.n_seeds} seed{'s' * (self.n_seeds != 1)}): {self.verdict}")


def vanishing(grouping: Grouping) -> tuple[dict[str, dict[str, Interval]], list[VanishingComparison]]:
    """Per group: the reward-vanishing numbers (``run_vanishing``), mean ± t-interval over seeds (no
    interval with one run); per comparable pair: the difference paired by seed, t-interval."""
    per_run = {id(r): run_vanishing(r.history) for g in grouping.groups for r in g.runs}
    groups: dict[str, dict[str, Interval]] = {}
    for g in grouping.groups:
        values = [per_run[id(r)] for r in g.runs if per_run[id(r)]]
        keys = sorted({k for v in values for k in v}, key=vanishing_order)
        if values:
            groups[g.label] = {k: t_interval([v[k] for v in values if k in v]) for k in keys}
    comparisons = []
    for _, a, b in grouping.pairs:
        if a.label not in groups or b.label not in groups:
            continue
        va = {r.seed: per_run[id(r)] for r in a.runs if per_run[id(r)]}
        vb = {r.seed: per_run[id(r)] for r in b.runs if per_run[id(r)]}
        seeds = sorted(set(va) & set(vb))
        for key in groups[b.label]:
            paired = [vb[s][key] - va[s][key] for s in seeds if key in va[s] and key in vb[s]]
            if paired:
                comparisons.append(VanishingComparison(a.label, b.label, key, t_interval(np.array(paired)),
                                                       len(paired)))
    return groups, comparisons


@dataclass
class Analysis:
    grouping: Grouping
    ids: list[str]
    metrics: list[tuple[str, str, Optional[bool]]]
    start: dict[str, dict[str, Interval]]  # group label -> metric -> interval
    end: dict[str, dict[str, Interval]]
    transitions: dict[str, dict[str, Interval]]
    changes: list[Comparison]
    comparisons: list[Comparison]
    command: str
    steps: tuple[Optional[int], Optional[int]]
    dropped_problems: int
    vanishing: dict[str, dict[str, Interval]] = field(default_factory=dict)  # group -> key -> interval
    vanishing_comparisons: list[VanishingComparison] = field(default_factory=list)
    primary: str = PRIMARY

    @property
    def primaries(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.role == "primary"]

    @property
    def secondaries(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.role == "secondary"]


def _role(metric: str, primary: str, present: set[str]) -> tuple[str, Optional[str]]:
    if metric == primary:
        return "primary", None
    if DUPLICATES.get(metric) in present and DUPLICATES[metric] != primary:
        return "duplicate", DUPLICATES[metric]
    return "secondary", None


def analyse(runs: list[Run], n_resamples: int, progress=None, primary: str = PRIMARY) -> Analysis:
    grouping = group_runs(runs)
    all_ids = [set(e.rows) for r in runs for e in r.evaluations]
    ids = sorted(set.intersection(*all_ids))
    if not ids:
        raise ReportError("runs share no problem ids: their per-problem results cannot be compared")
    dropped = len(set.union(*all_ids)) - len(ids)
    has_t2 = all(e.rows[i].t2 is not None for r in runs for e in r.evaluations for i in ids)
    metrics = [m for m in METRICS if has_t2 or m[0] == "acc_t1"]
    present = {m for m, _, _ in metrics}
    if primary not in present:
        raise ReportError(f"--primary {primary}: not a metric of these runs; choose one of {', '.join(sorted(present))}")
    command = runs[0].command
    start, end, transitions = {}, {}, {}
    changes, comparisons = [], []
    n_jobs = len(grouping.groups) * len(metrics) * (command == "train") + len(grouping.pairs) * len(metrics)
    advance = progress(n_jobs) if progress else (lambda: None)
    for g in grouping.groups:
        first, last = [r.evaluations[0] for r in g.runs], [r.evaluations[-1] for r in g.runs]
        start[g.label] = {m: group_interval(first, ids, m, n_resamples) for m, _, _ in metrics}
        end[g.label] = {m: group_interval(last, ids, m, n_resamples) for m, _, _ in metrics}
        if has_t2:
            transitions[g.label] = {t: group_interval(last, ids, t) for t, _, _ in TRANSITIONS}
        if command != "train":
            continue
        for m, label, better in metrics:
            role, dup = _role(m, "", present)  # no primary among the changes over training
            changes.append(Comparison(g.label, m, label, better, g.label, g.label, start[g.label][m].mean,
                                      end[g.label][m].mean, paired_difference(first, last, ids, m, n_resamples),
                                      len(g.runs), len(ids), change=True, role=role, duplicate_of=dup))
            advance()
    for key, a, b in grouping.pairs:
        seeds = sorted(set(a.seeds) & set(b.seeds))
        if not seeds:
            for _ in metrics:
                advance()
            continue
        ea = [r.evaluations[-1] for r in a.runs if r.seed in seeds]
        eb = [r.evaluations[-1] for r in b.runs if r.seed in seeds]
        for m, label, better in metrics:
            per_seed_diff = seed_values(eb, ids, m) - seed_values(ea, ids, m)
            sd = float(np.nanstd(per_seed_diff, ddof=1)) if len(seeds) > 1 else math.nan
            role, dup = _role(m, primary, present)
            comparisons.append(Comparison(f"{b.label} − {a.label} ({key})", m, label, better, a.label, b.label,
                                          value(ea, ids, m), value(eb, ids, m),
                                          paired_difference(ea, eb, ids, m, n_resamples),
                                          len(seeds), len(ids), change=False, seed_sd=sd, role=role,
                                          duplicate_of=dup,
                                          population=population_difference(ea, eb, ids, m) if role == "primary" else None))
            advance()
    for family in ([c for c in comparisons if c.role == "primary"], [c for c in comparisons if c.role == "secondary"],
                   [c for c in changes if c.role == "secondary"]):
        adjust(family)
    steps = (runs[0].evaluations[0].step, runs[0].evaluations[-1].step)
    groups_vanishing, vanishing_comparisons = vanishing(grouping) if command == "train" else ({}, [])
    return Analysis(grouping, ids, metrics, start, end, transitions, changes, comparisons, command, steps, dropped,
                    groups_vanishing, vanishing_comparisons, primary)


def iv_json(iv: Optional[Interval]) -> Optional[dict]:
    if iv is None:
        return None
    return {"mean": iv.mean, "low": None if math.isnan(iv.low) else iv.low,
            "high": None if math.isnan(iv.high) else iv.high, "n": iv.n, "method": iv.method, "p": iv.p}


def _comparison_json(c: Comparison) -> dict:
    return {"metric": c.metric, "diff": iv_json(c.diff), "verdict": c.verdict, "line": c.line(), "role": c.role,
            "p_holm": c.p_adjusted if c.role == "secondary" else None, "duplicate_of": c.duplicate_of}


def as_json(an: Analysis) -> dict:
    return {
        "keys": an.grouping.keys,
        "problems": len(an.ids),
        "estimand": ESTIMAND,
        "primary": {"metric": an.primary, "comparisons": [
            {"title": c.title, "a": c.a, "b": c.b, "line": c.line(), "verdict": c.verdict, "diff": iv_json(c.diff),
             "population": iv_json(c.population), "p_holm_over_pairs": c.p_adjusted} for c in an.primaries]},
        "groups": {g.label: {"seeds": g.seeds, "runs": [r.name for r in g.runs],
                             "start": {m: iv_json(iv) for m, iv in an.start[g.label].items()},
                             "end": {m: iv_json(iv) for m, iv in an.end[g.label].items()}}
                   for g in an.grouping.groups},
        "comparisons": [{"title": c.title, **_comparison_json(c),
                         "seed_sd": None if math.isnan(c.seed_sd) else c.seed_sd,
                         "seeds_for_3_points": c.seeds_for()} for c in an.comparisons],
        "changes": [{"group": c.a, **_comparison_json(c)} for c in an.changes],
    "vanishing": {"groups": {g: {k: iv_json(iv) for k, iv in v.items()} for g, v in an.vanishing.items()},
                      "comparisons": [{"a": c.a, "b": c.b, "key": c.key, "diff": iv_json(c.diff),
                                       "verdict": c.verdict, "line": c.line()} for c in an.vanishing_comparisons]},
    }
