r"""The grader: whether a completion states the gold answer, for the training reward and ``mgrpo eval``.

A ``Grader`` answers for batches of (completion, gold) pairs, keeps counters for logging and owns
the math-verify worker process (``grading.worker``). A verdict is
True/False, or None when the pair cannot be graded: the gold itself does not parse (``ungradable``)
or the worker died with that answer in flight (``grader_error``).

Equivalence policy (gold first: ``math_verify.verify(gold, prediction)`` is asymmetric; the whole
policy, its reasons and where it parts from math-verify's defaults are in ``docs/grading.md``):
  * Both sides are cleaned alike: ``$``, ``\$``, ``\%``/``%`` and the words percent/percentage/pct,
    ``^\circ``, ``\!``, ``\,``, ``\;``, ``\:``, ``\left``/``\right``, ``\displaystyle`` are dropped;
    ``~``, ``\ ``, ``\quad``, ``\qquad``, ``\hspace{…}`` are spaces; ``\dfrac``/``\tfrac`` read as
    ``\frac``; trailing ``.``, ``,``, ``;`` are stripped. So ``50\%`` = ``50`` but ``0.5`` ≠ ``50\%``,
    and ``90^\circ`` = ``90`` (gold answers state the number of percent or degrees).
  * Numbers (``_number``): integers and decimals with a sign; thousands in groups of three after 1-3
    leading digits (not 0), separated by ``{,}``, a space (``1 000``) or ``,`` (``1,234``); a leading
    ``0,`` before three digits, or ``0{,}``, is a decimal comma (``0,111`` = ``0.111``; ``0,1`` is the
    list 0, 1); scientific ``1.5e3``, ``1.5\times10^{3}``,
    ``10^{3}``; ``a/b``, ``\frac{a}{b}``; mixed numbers ``2\frac{1}{2}``. Compared in
    ``fractions.Fraction`` without sympy: exactly, or, when either side is written as a decimal,
    after rounding both to 6 decimal places (math-verify's rule): ``0.333333`` = ``1/3``,
    ``0.33`` ≠ ``1/3``, ``-2`` ≠ ``2``.
  * Lists: an answer with a comma outside brackets that is not a number is a list. ``a, bbb`` with a
    space is always a list; where the gold is a list the prediction's commas separate too
    (``1,100`` is the list 1, 100 against the gold ``1, 100``, the number 1100 against ``1100``).
    A list never equals a number, either way. Lists of plain numbers compare without sympy as bare
    lists: unordered, each value as often.
  * Several boxes: for a gold of k parts (a list, or a tuple ``(…)``/set ``\{…\}`` of k elements)
    whose completion's last box holds one part, the last k boxes in order are the answer, joined
    in the gold's own brackets (``grading.extract``).
  * Identical after cleaning (up to spaces next to symbols): correct, without sympy.
  * Anything else goes to math-verify (LaTeX extraction only, never its ``parse_expr``-based
    expression extraction), which gives: radicals and algebra by sympy simplification
    (``\sqrt{8}`` = ``2\sqrt{2}``, ``x+y`` = ``y+x``); units in ``\text{…}`` after a number
    ignored (``18\text{ cm}`` = ``18``); tuples ordered ``(1,2)`` ≠ ``(2,1)``; sets and bare
    lists unordered (``\{1,2\}`` = ``\{2,1\}``, ``1,2`` = ``2,1``); intervals compare bounds and
    bracket types (``[1,2)`` ≠ ``[1,2]``, and ``(1,2)`` reads as an open interval); ``x \in [a,b]``
    and ``x=3`` match ``[a,b]`` and ``3``.

Safety: model text is never given to ``eval``, ``exec``, ``sympify`` or ``parse_expr``; the fast
paths are regexes and ``Fraction``; math-verify runs in the worker process under its limits. A pair
past the time limit, a completion over ``MAX_COMPLETION_CHARS`` or an answer over
``MAX_ANSWER_CHARS`` is a wrong answer (``False``, reward 0) counted as ``grader_timeout``.

Left out: answer-type specific rules (multiple-choice letters beyond what math-verify does, units
spelt without ``\text``), partial credit.
"""
from __future__ import annotations

import functools
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

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
    a space, or (``comma``) ``,``. A decimal comma: ``0{,}5``, or (``comma``) ``0,ddd``, the one
    thousands-like shape that cannot be thousands (``0,1`` stays the list 0, 1). Then scientific forms
    (``1.5e3``, ``1.5\times10^{3}``, ``10^{3}``), fractions ``a/b``, ``\frac{a}{b}``, ``\frac ab``
    and mixed numbers ``2\frac{1}{2}`` (proper fraction)."""
    sep = r"(?:\{,\}|,)" if comma else r"\{,\}"
    decimal_comma = r"0(?:\{,\}\d+|,\d{3})" if comma else r"0\{,\}\d+"
    mantissa = rf"(?:[1-9]\d{{0,2}}(?:{sep}\d{{3}})+|[1-9]\d{{0,2}}(?: \d{{3}})+|\d+)(?:\.\d*)?|\.\d+|{decimal_comma}"
    power = r"10\^(?:\{([+-]?\d{1,3})\}|(\d))"
    frac = r"\\frac(?:\{([+-]?\d+)\}\{([+-]?\d+)\}|(\d)(\d))"
    return re.compile(
        rf"([+-]?)(?:({mantissa})(?:[eE]([+-]?\d{{1,3}})|(?:\\times|\\cdot|\*){power})?|{power}"
        rf"|(\d*){frac}|([+-]?\d+)/([+-]?\d+))"
    )


_NUMBER_RE = {comma: _number_re(comma) for comma in (False, True)}
_DECIMAL_COMMA_RE = re.compile(r"0(?:\{,\}|,)")
_SEPARATOR_RE = re.compile(r"\{,\}|[, ]")


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
    thousands separator or the decimal comma of ``0,ddd`` (never where the gold is a list)."""
    match = _NUMBER_RE[comma].fullmatch(_LOOSE_SPACE_RE.sub("", cleaned))
    if match is None:
        return None
    negative = match.group(1) == "-"
    (mantissa, exp_e, exp_braced, exp_digit, bare_braced, bare_digit, whole,
     num, den, num_digit, den_digit, slash_num, slash_den) = match.groups()[1:]
    if mantissa is not None:
        comma_match = _DECIMAL_COMMA_RE.match(mantissa)
        if comma_match is not None:
            mantissa = "0." + mantissa[comma_match.end() :]
        decimal = "." in mantissa
        digits = _SEPARATOR_RE.sub("", mantissa)
        value = Fraction(digits) if decimal else Fraction(int(digits))
        exp = int(exp_e or exp_braced or exp_digit or 0)
        value = value * Fraction(10) ** exp if exp else value
        return (-value if negative else value), decimal
    if bare_braced is not None or bare_digit is not None:
        value = Fraction(10) ** int(bare_braced or bare_digit)
        return (-value if negative else value), False
    if slash_num is not None:
        num, den = slash_num, slash_den
    elif num is None:
        num, den = num_digit, den_digit
    if int(den) == 0 or (whole and not 0 <= int(num) < int(den)):  # x/0; a mixed number's fraction is proper
        return None
    value = int(whole or 0) + Fraction(int(num), int(den))
    return (-value if negative else value), False


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


class _Gold(NamedTuple):
    """A gold answer as the fast paths read it."""

    cleaned: str
    number: tuple[Fraction, bool] | None  # a plain number
    parts: tuple[str, ...] | None  # a list: its parts (two or more; never a number)
    boxes: int  # how many boxes a several-box answer takes: the list's parts, or a tuple's or set's
    brackets: tuple[str, str]  # what those boxes go in: "" for a list, its own for a tuple (…) or set \{…\}


@functools.lru_cache(maxsize=_CACHE_SIZE)  # a group's completions share their gold
def _read_gold(gold: str) -> _Gold:
    """The gold as a number, a list or neither, and the boxes a several-box answer takes for it."""
    cleaned = _clean(gold)
    number = _number(cleaned, comma=True)
    parts = split_parts(cleaned) if number is None else [cleaned]
    if len(parts) > 1:
        return _Gold(cleaned, None, tuple(parts), len(parts), ("", ""))
    for brackets in (("(", ")"), ("\\{", "\\}")):
        inner = _wrapped(cleaned, *brackets)
        inner_parts = [] if inner is None else split_parts(inner)
        if len(inner_parts) > 1:
            return _Gold(cleaned, number, None, len(inner_parts), brackets)
    return _Gold(cleaned, number, None, 1, ("", ""))

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
        gold_r = _read_gold(str(gold))
        pred = self._extract(completion, gold_r)
        if pred is None:
            self._count("no_answer")
            return False
        if len(pred) > MAX_ANSWER_CHARS:
            return "timeout"
        pred_c = _clean(pred)
        if self._shortcuts:
            verdict = self._fast(gold_r, pred_c)
            if verdict is not None:
                self._count("fast_path")
                return verdict
        job = (gold_r.cleaned, pred_c)
        if job in self._cache:
            self._cache.move_to_end(job)
            return self._cache[job]
        pending.setdefault(job, []).append(i)
        return None

    def answer(self, completion: str, gold: str) -> str | None:
        """The answer ``completion`` states as the grader reads it against ``gold`` (for records and
        majority votes): ``extract_answer``'s, the last boxes joined for a gold of several parts."""
        return self._extract(completion, _read_gold(str(gold)))

    def _extract(self, completion: str, gold: _Gold) -> str | None:
        return extract_answer(completion, last_number_fallback=self.last_number_fallback, parts=gold.boxes,
                              brackets=gold.brackets)

    @staticmethod
    def _fast(gold: _Gold, pred_c: str) -> bool | None:
        """The verdict of the fast paths (plain numbers, lists of them, exact match), or None."""
        pred_n = _number(pred_c, comma=gold.parts is None)  # where the gold is a list, "," separates
        pred_parts = split_parts(pred_c) if pred_n is None else [pred_c]
        if gold.number is not None and pred_n is not None:
            return _numbers_equal(gold.number, pred_n)
        if (gold.number is not None and len(pred_parts) > 1) or (gold.parts is not None and pred_n is not None):
            return False  # a list is never a number, nor a number a list
        if _key(gold.cleaned) == _key(pred_c):
            return True
        if gold.parts is not None and len(pred_parts) > 1:
            gold_v = [_number(p, comma=False) for p in gold.parts]
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
