r"""The grader: whether a completion states the gold answer, for the training reward and ``mgrpo eval``.

A ``Grader`` answers for batches of (completion, gold) pairs, keeps counters for logging and owns
the math-verify worker process (``grading.worker``). A verdict is
True/False, or None when the pair cannot be graded: the gold itself does not parse (``ungradable``)
or the worker died with that answer in flight (``grader_error``).

Equivalence policy (gold first: ``math_verify.verify(gold, prediction)`` is asymmetric):
  * Both sides are cleaned alike: ``$``, ``\$``, ``\%``/``%``, ``^\circ``, ``\!``, ``\,``,
    ``\left``/``\right``, ``\displaystyle`` are dropped, ``\dfrac``/``\tfrac`` read as ``\frac``.
    So ``50\%`` = ``50`` but ``0.5`` ≠ ``50\%``, and ``90^\circ`` = ``90`` (gold answers state the
    number of percent or degrees).
  * Identical after that (up to spaces next to symbols): correct, without sympy.
  * Plain numbers on both sides (integers, decimals, ``a/b``, ``\frac{a}{b}``, thousands
    separators ``1,234``/``1{,}234``, scientific ``1.5e3``/``1.5\times10^{3}``) are compared in
    ``fractions.Fraction`` without sympy: exactly, or, when either side is written as a decimal,
    after rounding both to 6 decimal places (math-verify's rule): ``0.333333`` = ``1/3``,
    ``0.33`` ≠ ``1/3``, ``-2`` ≠ ``2``.
  * Anything else goes to math-verify (LaTeX extraction only, never its ``parse_expr``-based
    expression extraction), which gives: radicals and algebra by sympy simplification
    (``\sqrt{8}`` = ``2\sqrt{2}``, ``x+y`` = ``y+x``); units in ``\text{…}`` after a number
    ignored (``18\text{ cm}`` = ``18``); tuples ordered ``(1,2)`` ≠ ``(2,1)``; sets and bare
    lists unordered (``\{1,2\}`` = ``\{2,1\}``, ``1,2`` = ``2,1``); intervals compare bounds and
    bracket types (``[1,2)`` ≠ ``[1,2]``, and ``(1,2)`` reads as an open interval); ``x \in [a,b]`` and ``x=3`` match ``[a,b]`` and ``3``.

Safety: model text is never given to ``eval``, ``exec``, ``sympify`` or ``parse_expr``; the fast
paths are regexes and ``Fraction``; math-verify runs in the worker process under its limits. A pair
past the time limit, a completion over ``MAX_COMPLETION_CHARS`` or an answer over
``MAX_ANSWER_CHARS`` is a wrong answer (``False``, reward 0) counted as ``grader_timeout``.

Left out: answer-type specific rules (multiple-choice letters beyond what math-verify does, units
spelt without ``\text``), partial credit.
"""
from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from mgrpo_cli.grading.extract import MAX_ANSWER_CHARS, MAX_COMPLETION_CHARS, extract_answer
from mgrpo_cli.grading.worker import Worker

_CACHE_SIZE = 4096

# ---------------------------------------------------------------------------------------------
# In-process fast paths (no sympy)
# ---------------------------------------------------------------------------------------------
_DROP_RE = re.compile(r"\\\$|\$|\\%|%|\^\s*\{?\s*\\circ\s*\}?|\\[!,;:]|\\(?:left|right|displaystyle)(?![a-zA-Z])")
_SPACE_RE = re.compile(r"\s*([^\w\s\\])\s*|\s+")
_DEC = r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)"
_SCI_RE = re.compile(
    rf"({_DEC})(?:[eE]([+-]?\d{{1,3}})|\s?(?:\\times|\\cdot|\*)\s?10\^(?:\{{([+-]?\d{{1,3}})\}}|(\d)))?"
)
_FRAC_RE = re.compile(r"([+-]?)(?:\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}|\\frac(\d)(\d)|([+-]?\d+)/([+-]?\d+))")


def _clean(answer: str) -> str:
    """Drop what never changes an answer's value (see the policy); keep the LaTeX otherwise."""
    answer = _DROP_RE.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return answer.replace("\u2212", "-").strip().rstrip(".").strip()


def _key(cleaned: str) -> str:
    """Exact-match key: spaces next to symbols removed, other runs of spaces made one."""
    return _SPACE_RE.sub(lambda m: m.group(1) or " ", cleaned).strip()


def _plain_number(key: str) -> tuple[Fraction, bool] | None:
    """(value, written as a decimal) for a plain number, else None."""
    key = key.replace("{,}", ",")
    match = _SCI_RE.fullmatch(key)
    if match:
        mantissa, exp = match.group(1).replace(",", ""), match.group(2) or match.group(3) or match.group(4)
        value = Fraction(mantissa) * Fraction(10) ** int(exp or 0)
        return value, "." in mantissa or exp is not None
    match = _FRAC_RE.fullmatch(key)
    if match:
        sign, num, den = match.group(1), *[g for g in match.groups()[1:] if g is not None]
        if int(den) == 0:
            return None
        return Fraction(int(num), int(den)) * (-1 if sign == "-" else 1), False
    return None


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    if a[1] or b[1]:
        return round(a[0], 6) == round(b[0], 6)
    return a[0] == b[0]

# ---------------------------------------------------------------------------------------------
# Grader
# ---------------------------------------------------------------------------------------------
_COUNTERS = ("graded", "correct", "no_answer", "fast_path", "grader_timeout", "ungradable", "grader_error",
             "worker_restarts")


class Grader:
    """Grades completions against gold answers; one per run, shared by training and eval.

    Counters (``stats``/``pop_stats``): ``graded`` pairs given a verdict, ``correct``,
    ``no_answer`` (nothing extracted), ``fast_path`` (decided without sympy), ``grader_timeout``
    (cut off by a time or size limit: wrong), ``ungradable`` (the gold cannot be graded: ``None``),
    ``grader_error`` (the worker died with the pair in flight: ``None``), ``worker_restarts``.
    """

    _shortcuts = True  # exact-match and plain-number paths; off only to benchmark math-verify

    def __init__(self, timeout_s: float, last_number_fallback: bool) -> None:
        self.timeout_s = float(timeout_s)
        self.last_number_fallback = bool(last_number_fallback)
        self._worker = Worker(self.timeout_s)
        weakref.finalize(self, self._worker.close)  # also at interpreter exit
        self._cache: OrderedDict[tuple[str, str], bool | str] = OrderedDict()
        self._lock = threading.Lock()
        self._total = dict.fromkeys(_COUNTERS, 0)
        self._since = dict.fromkeys(_COUNTERS, 0)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        with self._lock:
            self._worker.close()

    @property
    def worker_pid(self) -> int | None:
        """The math-verify worker's process id while one runs (for monitoring), else None."""
        return self._worker.pid

    def stats(self) -> dict[str, int]:
        return dict(self._total)

    def pop_stats(self) -> dict[str, int]:
        with self._lock:
            out, self._since = self._since, dict.fromkeys(_COUNTERS, 0)
        return out

    def _count(self, name: str, n: int = 1) -> None:
        self._total[name] += n
        self._since[name] += n

    def correct(self, completions: Sequence[str], golds: Sequence[str]) -> list[bool | None]:
        """Per pair: True/False, or None when the gold cannot be graded or the grader's worker died
        while grading it (counted as ``grader_error``; the next pair or call restarts the worker)."""
        if len(completions) != len(golds):
            raise ValueError(f"got {len(completions)} completions but {len(golds)} gold answers")
        with self._lock:
            verdicts: list[bool | str | None] = [None] * len(golds)
            pending: dict[tuple[str, str], list[int]] = {}
            for i, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
                verdicts[i] = self._local(completion, gold, i, pending)
            if pending:
                todo = list(pending)
                restarts = self._worker.restarts
                for job, result in zip(todo, self._worker.grade(todo), strict=True):
                    self._remember(job, result)
                    for i in pending[job]:
                        verdicts[i] = result
                self._count("worker_restarts", self._worker.restarts - restarts)
            return [self._tally(v) for v in verdicts]

    def _local(self, completion: str, gold: Any, i: int, pending: dict) -> bool | str | None:
        """A verdict decided in this process, or None after queueing the pair for the worker."""
        if gold is None or not str(gold).strip():
            return "gold"
        if len(completion) > MAX_COMPLETION_CHARS:
            return "timeout"
        pred = extract_answer(completion, last_number_fallback=self.last_number_fallback)
        if pred is None:
            self._count("no_answer")
            return False
        if len(pred) > MAX_ANSWER_CHARS:
            return "timeout"
        gold_c, pred_c = _clean(str(gold)), _clean(pred)
        if self._shortcuts:
            gold_k, pred_k = _key(gold_c), _key(pred_c)
            if gold_k == pred_k:
                self._count("fast_path")
                return True
            gold_n, pred_n = _plain_number(gold_k), _plain_number(pred_k)
            if gold_n is not None and pred_n is not None:
                self._count("fast_path")
                return _numbers_equal(gold_n, pred_n)
        job = (gold_c, pred_c)
        if job in self._cache:
            self._cache.move_to_end(job)
            return self._cache[job]
        pending.setdefault(job, []).append(i)
        return None

    def _remember(self, job: tuple[str, str], result: bool | str) -> None:
        if result != "error":
            self._cache[job] = result
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)

    def _tally(self, verdict: bool | str | None) -> bool | None:
        if verdict == "error":
            self._count("grader_error")
            return None
        if verdict in ("gold", None):
            self._count("ungradable")
            return None
        self._count("graded")
        if verdict == "timeout":
            self._count("grader_timeout")
            return False
        if verdict:
            self._count("correct")
        return bool(verdict)
