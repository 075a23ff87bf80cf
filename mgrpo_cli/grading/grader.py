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

from mgrpo_cli.grading.extract import MAX_ANSWER_CHARS, MAX_COMPLETION_CHARS, extract_answer, split_parts
from mgrpo_cli.grading.worker import Worker

_CACHE_SIZE = 4096

# ---------------------------------------------------------------------------------------------
# In-process fast paths (no sympy)
# ---------------------------------------------------------------------------------------------
_DROP_RE = re.compile(
    r"\\\$|\$|\\%|%|\^\s*\{?\s*\\circ\s*\}?|\\[!,;:]|\\(?:left|right|displaystyle)(?![a-zA-Z])"
    r"|\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{\s*(?:percent(?:age)?|pct)\s*\}"
    r"|(?<![A-Za-z\\])(?:percent(?:age)?|pct)(?![A-Za-z])"
)
_SPACING_RE = re.compile(r"~|(?<!\\)\\ |\\(?:q?quad|enspace|thinspace)(?![a-zA-Z])|\\hspace\*?\{[^{}]*\}")
_SPACE_RE = re.compile(r"\s*([^\w\s\\])\s*|\s+")
_LOOSE_SPACE_RE = re.compile(r"(?<![\d,])\s+|\s+(?!\d)")  # all but digit-space-digit and comma-space


def _number_re(comma: bool) -> re.Pattern[str]:
    r"""A plain number, written without spaces but those inside it (``1 000``, ``32, 349``).

    Thousands: groups of three after 1-3 leading digits not starting with 0, separated by ``{,}``,
    a space, or (``comma``) ``,``; ``0,5``/``0{,}5`` is a decimal comma. Then scientific forms
    (``1.5e3``, ``1.5\times10^{3}``, ``10^{3}``), fractions ``a/b``, ``\frac{a}{b}``, ``\frac ab``
    and mixed numbers ``2\frac{1}{2}`` (proper fraction)."""
    sep = r"(?:\{,\}|,)" if comma else r"\{,\}"
    mantissa = rf"(?:[1-9]\d{{0,2}}(?:{sep}\d{{3}})+|[1-9]\d{{0,2}}(?: \d{{3}})+|\d+)(?:\.\d*)?|\.\d+|0{sep}\d+"
    power = r"10\^(?:\{([+-]?\d{1,3})\}|(\d))"
    frac = r"\\frac(?:\{([+-]?\d+)\}\{([+-]?\d+)\}|(\d)(\d))"
    return re.compile(
        rf"([+-]?)(?:({mantissa})(?:[eE]([+-]?\d{{1,3}})|(?:\\times|\\cdot|\*){power})?|{power}"
        rf"|(\d*){frac}|([+-]?\d+)/([+-]?\d+))"
    )


_NUMBER_RE = {comma: _number_re(comma) for comma in (False, True)}
_DECIMAL_COMMA_RE = re.compile(r"0(?:\{,\}|,)")


def _clean(answer: str) -> str:
    """Drop what never changes an answer's value (see the policy); keep the LaTeX otherwise."""
    answer = _DROP_RE.sub("", _SPACING_RE.sub(" ", answer))
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\u2212", "-")
    return answer.strip().rstrip(" \t\n.,;").strip()


def _key(cleaned: str) -> str:
    """Exact-match key: spaces next to symbols removed, other runs of spaces made one."""
    return _SPACE_RE.sub(lambda m: m.group(1) or " ", cleaned).strip()


def _number(cleaned: str, comma: bool) -> tuple[Fraction, bool] | None:
    """(value, written as a decimal) for a plain number, else None. ``comma``: a bare ``,`` may be a
    thousands separator or a leading ``0,`` decimal comma (never where the gold is a list)."""
    match = _NUMBER_RE[comma].fullmatch(_LOOSE_SPACE_RE.sub("", cleaned))
    if match is None:
        return None
    sign = -1 if match.group(1) == "-" else 1
    (mantissa, exp_e, exp_braced, exp_digit, bare_braced, bare_digit, whole,
     num, den, num_digit, den_digit, slash_num, slash_den) = match.groups()[1:]
    if mantissa is not None:
        decimal = "." in mantissa or _DECIMAL_COMMA_RE.match(mantissa) is not None
        if _DECIMAL_COMMA_RE.match(mantissa) is not None:
            mantissa = _DECIMAL_COMMA_RE.sub("0.", mantissa, count=1)
        exp = exp_e or exp_braced or exp_digit or "0"
        value = Fraction(re.sub(r"\{,\}|[, ]", "", mantissa)) * Fraction(10) ** int(exp)
        return sign * value, decimal
    if bare_braced is not None or bare_digit is not None:
        return sign * Fraction(10) ** int(bare_braced or bare_digit), False
    if slash_num is not None:
        num, den = slash_num, slash_den
    elif num is None:
        num, den = num_digit, den_digit
    if int(den) == 0 or (whole and not 0 <= int(num) < int(den)):  # x/0; a mixed number's fraction is proper
        return None
    return sign * (int(whole or 0) + Fraction(int(num), int(den))), False


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    if a[1] or b[1]:
        return round(a[0], 6) == round(b[0], 6)
    return a[0] == b[0]


def _same_numbers(gold: list[tuple[Fraction, bool]], pred: list[tuple[Fraction, bool]]) -> bool:
    """The two lists hold the same numbers, in any order, each as often (a bare list is unordered)."""
    if len(gold) != len(pred):
        return False
    left = list(pred)
    for g in gold:
        j = next((j for j, p in enumerate(left) if _numbers_equal(g, p)), None)
        if j is None:
            return False
        del left[j]
    return True


def _wrapped(cleaned: str, open_: str, close: str) -> str | None:
    """The inside of ``cleaned`` when one bracket pair ``open_`` … ``close`` encloses all of it."""
    if not (cleaned.startswith(open_) and cleaned.endswith(close)) or len(cleaned) < len(open_) + len(close):
        return None
    inner, depth = cleaned[len(open_) : len(cleaned) - len(close)], 0
    for char in inner:
        depth += (char in "([{") - (char in ")]}")
        if depth < 0:
            return None
    return inner if depth == 0 else None


def _gold_parts(cleaned: str, parts: list[str]) -> tuple[int, tuple[str, str]]:
    """How many boxes a several-box answer takes for this gold, and the brackets they go in: the
    gold's parts (a bare list), or those inside its tuple ``(…)`` or set ``\\{…\\}``."""
    if len(parts) > 1:
        return len(parts), ("", "")
    for brackets in (("(", ")"), ("\\{", "\\}")):
        inner = _wrapped(cleaned, *brackets)
        if inner is not None and len(split_parts(inner)) > 1:
            return len(split_parts(inner)), brackets
    return 1, ("", "")

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
        gold_c = _clean(str(gold))
        gold_parts = split_parts(gold_c)
        gold_n = _number(gold_c, comma=True)
        gold_list = gold_n is None and len(gold_parts) > 1
        parts, brackets = _gold_parts(gold_c, gold_parts if gold_list else [gold_c])
        pred = extract_answer(completion, last_number_fallback=self.last_number_fallback, parts=parts,
                              brackets=brackets)
        if pred is None:
            self._count("no_answer")
            return False
        if len(pred) > MAX_ANSWER_CHARS:
            return "timeout"
        pred_c = _clean(pred)
        if self._shortcuts:
            verdict = self._fast(gold_c, gold_n, gold_parts if gold_list else None, pred_c)
            if verdict is not None:
                self._count("fast_path")
                return verdict
        job = (gold_c, pred_c)
        if job in self._cache:
            self._cache.move_to_end(job)
            return self._cache[job]
        pending.setdefault(job, []).append(i)
        return None

    @staticmethod
    def _fast(gold_c: str, gold_n: tuple[Fraction, bool] | None, gold_list: list[str] | None,
              pred_c: str) -> bool | None:
        """The verdict of the fast paths (plain numbers, lists of them, exact match), or None."""
        pred_n = _number(pred_c, comma=gold_list is None)  # where the gold is a list, "," separates
        pred_parts = split_parts(pred_c) if pred_n is None else [pred_c]
        if gold_n is not None and pred_n is not None:
            return _numbers_equal(gold_n, pred_n)
        if (gold_n is not None and len(pred_parts) > 1) or (gold_list is not None and pred_n is not None):
            return False  # a list is never a number, nor a number a list
        if _key(gold_c) == _key(pred_c):
            return True
        if gold_list is not None and len(pred_parts) > 1:
            gold_v = [_number(p, comma=False) for p in gold_list]
            pred_v = [_number(p, comma=False) for p in pred_parts]
            if None not in gold_v and None not in pred_v:
                return _same_numbers(gold_v, pred_v)  # type: ignore[arg-type]
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
