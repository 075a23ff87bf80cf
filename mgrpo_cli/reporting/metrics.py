"""Evaluation metrics as pure functions: self-correction shares, pass@k, maj@k, per-group accuracy.

Self-correction follows SCoRe's definitions, which the MGRPO paper reports: with t1 the layer-1
answer and t2 the answer after one layer-2 pass,
``Acc@t1``, ``Acc@t2``, ``Δ = Acc@t2 − Acc@t1``, ``Δi→c`` (share wrong at t1, right at t2) and
``Δc→i`` (share right at t1, wrong at t2), so that ``Δ = Δi→c − Δc→i``. Those two are shares of
*all* problems and so move with Acc@t1; the conditional rates ``fix_rate`` (share of the t1-wrong
problems right at t2) and ``break_rate`` (share of the t1-right problems wrong at t2) do not.
``pass@k`` is the unbiased estimator of Chen et al. 2021, ``1 − C(n−c, k) / C(n, k)``, in its
product form. No torch, no grading here: callers pass verdicts.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Optional

UNKNOWN = "unknown"
_SPACE = re.compile(r"\s+")


def self_correction(t1: Sequence[bool], t2: Sequence[bool]) -> dict[str, Optional[float]]:
    """Accuracy at both turns, the four transition shares (rr, wr, rw, ww: r = right, w = wrong) and
    the conditional rates ``fix_rate`` = wr / (wr + ww) and ``break_rate`` = rw / (rr + rw).

    ``delta`` is computed as ``delta_i2c - delta_c2i`` so that identity holds exactly in floating
    point; it agrees with ``acc_t2 - acc_t1`` to rounding (about 1e-16). A conditional rate with no
    problem in its denominator (no t1-wrong, or no t1-right problem) is ``None``.
    """
    if len(t1) != len(t2):
        raise ValueError(f"self_correction: t1 and t2 differ in length ({len(t1)} vs {len(t2)})")
    n = len(t1)
    if n == 0:
        raise ValueError("self_correction: no problems (t1 and t2 are empty)")
    counts = Counter((bool(a), bool(b)) for a, b in zip(t1, t2, strict=True))
    n_rr, n_wr = counts[(True, True)], counts[(False, True)]
    n_rw, n_ww = counts[(True, False)], counts[(False, False)]
    delta_i2c, delta_c2i = n_wr / n, n_rw / n
    return {
        "acc_t1": (n_rr + n_rw) / n,
        "acc_t2": (n_rr + n_wr) / n,
        "delta": delta_i2c - delta_c2i,
        "delta_i2c": delta_i2c,
        "delta_c2i": delta_c2i,
        "rr": n_rr / n,
        "wr": n_wr / n,
        "rw": n_rw / n,
        "ww": n_ww / n,
        "fix_rate": n_wr / (n_wr + n_ww) if n_wr + n_ww else None,
        "break_rate": n_rw / (n_rr + n_rw) if n_rr + n_rw else None,
        "n": n,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 − C(n−c, k) / C(n, k)``."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # C(n−c, k) / C(n, k) = prod_{i=n−c+1}^{n} (1 − k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(per_problem_counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as ``(n samples, c correct)`` pairs."""
    values = [pass_at_k(n, c, k) for n, c in per_problem_counts]
    if not values:
        raise ValueError("mean_pass_at_k: no problems")
    return sum(values) / len(values)


def normalize_vote(answer: str) -> str:
    """The light normalisation answers are compared under for voting: strip, remove whitespace."""
    return _SPACE.sub("", answer.strip())


def maj_at_k(answers: Sequence[Optional[str]], verdicts: Sequence[Optional[bool]], k: int) -> bool:
    """Whether the majority answer among the first ``k`` samples is correct.

    ``None`` (no extracted answer) and blank answers take no part in the vote; ties go to the answer
    seen first. The voted answer's verdict is that of its first occurrence (``None`` counts as wrong).
    """
    if len(answers) != len(verdicts):
        raise ValueError(f"maj_at_k: answers and verdicts differ in length "
                         f"({len(answers)} vs {len(verdicts)})")
    if k < 1:
        raise ValueError(f"maj_at_k: need k >= 1, got k={k}")
    votes: Counter[str] = Counter()
    first_verdict: dict[str, Optional[bool]] = {}
    for answer, verdict in zip(answers[:k], verdicts[:k], strict=True):
        if answer is None:
            continue
        key = normalize_vote(answer)
        if not key:
            continue
        votes[key] += 1
        first_verdict.setdefault(key, verdict)
    if not votes:
        return False
    winner, _ = votes.most_common(1)[0]  # equal counts keep first-seen order
    return bool(first_verdict[winner])


def breakdown(rows: Iterable[dict], key: str, value: str = "correct") -> dict[str, dict]:
    """Accuracy per group: ``{group: {"n": count, "acc": mean of row[value]}}``.

    Groups are ``str(row[key])``; rows without ``key`` (or with ``None``) go to ``"unknown"``.
    Groups are sorted numerically where they are numbers (levels), then by name, ``"unknown"`` last.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.get(value) is None:
            raise ValueError(f"breakdown: row {i} has no {value!r} value: {row!r}")
        group = row.get(key)
        name = UNKNOWN if group is None else str(group)
        sums[name] = sums.get(name, 0.0) + float(row[value])
        counts[name] = counts.get(name, 0) + 1
    return {g: {"n": counts[g], "acc": sums[g] / counts[g]} for g in sorted(counts, key=_group_order)}


def _group_order(name: str) -> tuple[Any, ...]:
    if name == UNKNOWN:
        return (2, 0, name)
    try:
        number = float(name)
    except ValueError:
        return (1, 0, name)
    return (0, number, name) if math.isfinite(number) else (1, 0, name)


def summarize(records: list[dict]) -> dict[str, Any]:
    """The scores of per-problem records (``algo.solve.solved_records``; ``mgrpo eval`` and validation
    during training): ``n``, ``acc_t1`` (the first completion), with n > 1 samples ``mean@n`` (the mean
    sample accuracy), ``pass@k`` for k = 1, 2, 4, ... <= n and ``maj@n``; with a second pass
    :func:`self_correction`'s (a rate with no denominator is None); the t1 accuracy ``by_level`` and
    ``by_subject`` where the records have them."""
    if not records:
        raise ValueError("summarize: no problems to score")
    t1 = [bool(r["correct"][0]) for r in records]
    out: dict[str, Any] = {"n": len(records), "acc_t1": sum(t1) / len(t1)}
    n = min(len(r["correct"]) for r in records)
    if n > 1:
        counts = [(n, sum(bool(c) for c in r["correct"][:n])) for r in records]
        out[f"mean@{n}"] = sum(c for _, c in counts) / (n * len(records))
        k = 1
        while k <= n:
            out[f"pass@{k}"] = mean_pass_at_k(counts, k)
            k *= 2
        out[f"maj@{n}"] = sum(maj_at_k(r["answers"], r["correct"], n) for r in records) / len(records)
    if all(r.get("t2_correct") is not None or r.get("t2_completion") is not None for r in records):
        out.update(self_correction(t1, [bool(r.get("t2_correct")) for r in records]))
    rows = [{"correct": ok, "level": r.get("level"), "subject": r.get("subject")} for r, ok in zip(records, t1, strict=True)]
    for key in ("level", "subject"):
        if any(r.get(key) is not None for r in records):
            out[f"by_{key}"] = breakdown(rows, key)
    return out



def summary_keys(n: int, two_pass: bool) -> list[str]:
    """The numbers :func:`summarize` gives for ``n`` samples per problem, with or without a second pass."""
    keys = ["n", "acc_t1"]
    if n > 1:
        keys += [f"mean@{n}", *(f"pass@{2 ** i}" for i in range(n.bit_length()) if 2 ** i <= n), f"maj@{n}"]
    if two_pass:
        keys += ["acc_t2", "delta", "delta_i2c", "delta_c2i", "rr", "wr", "rw", "ww", "fix_rate", "break_rate"]
    return keys
