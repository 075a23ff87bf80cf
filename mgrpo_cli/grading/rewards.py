r"""Answer extraction, grading and rewards: one grader for the training reward and ``mgrpo eval``.

``is_correct(completion, gold)`` answers whether a model completion states the gold answer; a
``Grader`` does the same for batches, keeps counters for logging and owns the worker process;
``build_reward(cfg)`` turns the ``reward`` config group into a ``RewardFunction`` that returns, per
completion, ``sum_k weight_k * term_k`` (accuracy, format, or an own function named by its import
path ``package.module:function``) as ``Scored``. Reward functions share the shape
``f(completions, golds, **row_fields) -> list[float | None]``; ``None`` means "cannot be graded": the
trainer leaves it out of the group statistics (``is_correct`` answers False for it), and the grader
counts it as ``ungradable`` (the gold itself does not parse) or ``grader_error`` (the worker process
died, killed or out of memory, with that answer in flight).
Format reward: a non-empty ``\boxed{}`` (style boxed), or exactly
``[<think>]…</think><answer>…</answer>`` (style think; the opening tag may end the prompt).

Extraction (``extract_answer``), first rule that applies:
  1. the last ``<answer>…</answer>``: the last ``\boxed{}`` inside it, else its whole text;
  2. the last ``\boxed{…}`` or ``\fbox{…}`` (nested braces matched; an unclosed last box counts
     as no answer, earlier boxes are never used: the last box wins);
  3. GSM8K's ``#### N`` (the rest of that line);
  4. only with ``last_number_fallback``: the last number of the text.
No extractable answer is a wrong answer (``False``, reward 0), not an ungradable one.

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
paths are regexes and ``Fraction``; math-verify (imported only in the worker) runs in a separate
process under a 2 GiB address-space limit. Every call that reaches the worker has a hard
wall-clock limit ``timeout_s`` that works from any thread: the parent waits on a pipe and, past the
deadline, kills the worker and starts a fresh one (inside the worker a SIGALRM timer at 3/4 of the
limit usually stops the work first, sparing the restart). A completion over
``MAX_COMPLETION_CHARS`` or an answer over ``MAX_ANSWER_CHARS`` is not parsed. All these cases are
wrong answers (``False``, reward 0) counted as ``grader_timeout``. A worker that dies (killed, out
of memory) never stops the caller: the answer it was grading is ``None`` (``grader_error``), a fresh
worker grades the rest, and if that one dies too the rest are ``grader_error`` and the next call
starts another.

Left out: answer-type specific rules (multiple-choice letters beyond what math-verify does, units
spelt without ``\text``), partial credit.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
import signal
import subprocess
import sys
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

log = logging.getLogger(__name__)

MAX_COMPLETION_CHARS = 200_000
MAX_ANSWER_CHARS = 1_000
FORMAT_STYLES = ("boxed", "think")
REWARD_TERMS = ("accuracy", "format")
_STARTUP_TIMEOUT_S = 120.0
_WORKER_MEMORY_BYTES = 2 << 30
_CACHE_SIZE = 4096

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?:\s*(\{)|\s+([^\s${}\\]+))")
_BRACE_RE = re.compile(r"[{}]")
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    tail = deque(pattern.finditer(text), maxlen=1)
    return tail[0] if tail else None


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{…}``/``\fbox{…}`` (nested braces matched), or None."""
    match = _last_match(_BOX_RE, text)
    if match is None:
        return None
    if match.group(1) is None:  # \boxed 5
        return match.group(2)
    depth = 0
    for brace in _BRACE_RE.finditer(text, match.end(1) - 1):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[match.end(1) : brace.start()]
    return None  # unclosed: the answer was cut off


def extract_gold_gsm8k(solution: str) -> str:
    """GSM8K's gold answer: the text after the last ``####``, commas stripped."""
    head, sep, tail = solution.rpartition("####")
    answer = tail.strip().replace(",", "")
    if not sep or not answer:
        raise ValueError(f"GSM8K solution has no '#### <answer>' line: {solution[-200:]!r}")
    return answer


def extract_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
    """The final answer stated in ``text`` (rules in the module docstring), or None."""
    start = text.rfind("<answer>")
    if start >= 0:
        end = text.find("</answer>", start)
        if end >= 0:
            inner = text[start + len("<answer>") : end]
            answer = last_boxed(inner)
            return _nonempty(inner if answer is None else answer)
    answer = last_boxed(text)
    if answer is not None:
        return _nonempty(answer)
    head, sep, tail = text.rpartition("####")
    if sep:
        return _nonempty(tail.strip().split("\n", 1)[0])
    if last_number_fallback:
        match = _last_match(_NUMBER_RE, text)
        return match.group() if match else None
    return None


def _nonempty(answer: str) -> str | None:
    answer = answer.strip()
    return answer or None


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
# math-verify worker (separate process)
# ---------------------------------------------------------------------------------------------
class _SoftTimeout(BaseException):
    """Raised by the worker's SIGALRM timer; a BaseException so math-verify cannot swallow it."""


def _worker_main(conn: Any, soft_timeout_s: float) -> None:
    """Grade (gold, prediction) jobs from ``conn``; answer True/False, "gold" or "timeout" each."""
    import resource

    # stop signals are for the trainer (a SLURM job's SIGTERM reaches every process): it finishes its
    # step, grading included, and then stops this worker itself
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > _WORKER_MEMORY_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, hard))
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from functools import lru_cache

    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]

    def parse_latex(answer: str) -> list:
        return parse(f"${answer}$", config, parsing_timeout=None)

    parse_gold = lru_cache(maxsize=1024)(parse_latex)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _SoftTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    conn.send("ready")
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):
            return
        for gold, pred in jobs:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            try:
                gold_parsed = parse_gold(gold)
                if not gold_parsed:
                    result: bool | str = "gold"
                else:
                    result = bool(verify(gold_parsed, parse_latex(pred), timeout_seconds=None))
            except (_SoftTimeout, MemoryError, RecursionError):
                result = "timeout"
            except Exception:  # a prediction math-verify cannot handle is a wrong one
                result = False
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            conn.send(result)


class _Worker:
    """A persistent math-verify process with a hard per-job deadline."""

    soft_fraction = 0.75  # the worker's own SIGALRM timer, as a share of the hard limit

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False
        self._started_once = False  # a worker has been ready before: failing to restart is not fatal
        self.restarts = 0

    def _start(self) -> None:
        # A plain `python -c` child that loads this file by path: unlike multiprocessing's spawn, it
        # never re-imports the caller's __main__ (scripts without a main guard, notebooks) nor the
        # package's __init__.
        self._conn, child = multiprocessing.Pipe()
        code = (
            "import importlib.util as u, multiprocessing.connection as c, sys;"
            f"s = u.spec_from_file_location('_mgrpo_grader_worker', {__file__!r});"
            "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m);"
            f"m._worker_main(c.Connection({child.fileno()}), {self.soft_fraction * self.timeout_s!r})"
        )
        self._ready = False
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()],
                                          stdin=subprocess.DEVNULL)
        except OSError as e:  # no memory or process slots left: not started, _ensure_ready decides
            log.warning("grader: could not start the math-verify worker: %s", e)
            self._conn.close()
            self._proc = self._conn = None
        finally:
            child.close()

    def _restart(self) -> None:
        self.close()
        self.restarts += 1
        self._start()  # boots while the caller goes on

    def _ensure_ready(self) -> bool:
        """Start the worker if it is not running and wait until it is ready. False when a restart did
        not come up (the caller counts its jobs as errors and the next call tries again); a first
        start that fails raises: math-verify is missing or broken, no grading can work."""
        if self._proc is not None and self._proc.poll() is not None:  # died while idle (killed, out of memory)
            self.close()
            self.restarts += 1
        if self._proc is None:
            self._start()
        if not self._ready:
            try:
                self._ready = (self._proc is not None and self._conn.poll(_STARTUP_TIMEOUT_S)
                               and self._conn.recv() == "ready")
            except (EOFError, OSError):
                pass
            if not self._ready:
                self.close()
                if not self._started_once:
                    raise RuntimeError(
                        f"mgrpo grader: the math-verify worker did not start within {_STARTUP_TIMEOUT_S:.0f} s "
                        f"(its error, if any, is above; is math-verify installed for {sys.executable}?)"
                    )
                log.warning("grader: the math-verify worker did not restart; its answers count as grader_error")
                return False
            self._started_once = True
        return True

    def grade(self, jobs: list[tuple[str, str]]) -> list[bool | str]:
        """One verdict per job: True/False, "gold" (gold unparseable), "timeout" or "error".

        A job past the deadline is "timeout": the worker is killed and a fresh one grades the rest.
        When the worker dies (killed, out of memory), the job it was working on is "error" and a fresh
        worker grades the rest; if that one dies too, every job left is "error" and the next call
        starts another. Nothing here raises on a dead worker."""
        results: list[bool | str] = []
        died = False
        while len(results) < len(jobs):
            if not self._ensure_ready():
                break
            pending = jobs[len(results) :]
            sent = False
            try:
                self._conn.send(pending)
                sent = True
                for _ in pending:
                    if not self._conn.poll(self.timeout_s):
                        results.append("timeout")
                        log.debug("grader worker stopped on %r; restarting it", jobs[len(results) - 1])
                        self._restart()
                        break
                    results.append(self._conn.recv())
            except (EOFError, OSError):  # the worker is gone; a job it had taken is lost
                if sent:
                    results.append("error")
                log.warning("grader: the math-verify worker died (killed or out of memory)%s",
                            "" if died else "; restarting it")
                if died:  # a second death in one call: the next call starts a fresh worker
                    self._proc.kill()
                    self._proc.wait()
                    break
                died = True
                self._restart()
        return results + ["error"] * (len(jobs) - len(results))

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._conn.close()
        self._proc = self._conn = None


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

    def __init__(self, timeout_s: float = 2.0, last_number_fallback: bool = False) -> None:
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"reward.timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.last_number_fallback = bool(last_number_fallback)
        self._worker = _Worker(self.timeout_s)
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
            for i, (completion, gold) in enumerate(zip(completions, golds)):
                verdicts[i] = self._local(completion, gold, i, pending)
            if pending:
                todo = list(pending)
                restarts = self._worker.restarts
                for job, result in zip(todo, self._worker.grade(todo)):
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


_shared: dict[tuple[float, bool], Grader] = {}
_shared_lock = threading.Lock()


def is_correct(completion: str, gold: str, *, timeout_s: float = 2.0, last_number_fallback: bool = False) -> bool:
    """Whether ``completion`` states ``gold``; an ungradable gold counts as not correct."""
    with _shared_lock:
        key = (float(timeout_s), bool(last_number_fallback))
        if key not in _shared:
            _shared[key] = Grader(timeout_s=timeout_s, last_number_fallback=last_number_fallback)
        grader = _shared[key]
    return bool(grader.correct([completion], [gold])[0])


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """Result for a batch of completions."""

    rewards: list[float | None]  # weighted reward; None = cannot be graded
    correct: list[bool | None]  # answer correctness; None = ungradable


def accuracy_reward(completions: Sequence[str], golds: Sequence[str], *, grader: Grader) -> list[float | None]:
    """1.0 for a correct answer, 0.0 for a wrong or missing one, None when ungradable."""
    return [None if c is None else float(c) for c in grader.correct(completions, golds)]


def _has_format(text: str, style: str) -> bool:
    if len(text) > MAX_COMPLETION_CHARS:
        return False
    if style == "boxed":
        return bool((last_boxed(text) or "").strip())
    # R1 style, string operations only: [<think>]…</think><answer>…</answer>, each tag once
    # (the opening <think> may sit at the end of the prompt instead).
    text = text.strip().removeprefix("<think>")
    if any(text.count(tag) != 1 for tag in ("</think>", "<answer>", "</answer>")) or "<think>" in text:
        return False
    think_end, answer_start, answer_end = text.find("</think>"), text.find("<answer>"), text.find("</answer>")
    return (
        think_end < answer_start < answer_end == len(text) - len("</answer>")
        and not text[think_end + len("</think>") : answer_start].strip()
        and bool(text[answer_start + len("<answer>") : answer_end].strip())
    )


def format_reward(completions: Sequence[str], golds: Sequence[str], *, style: str = "boxed") -> list[float | None]:
    r"""1.0 when the completion has the format: a non-empty ``\boxed{}`` (boxed) or exactly
    ``[<think>]…</think><answer>…</answer>`` (think); else 0.0. ``golds`` is unused."""
    if style not in FORMAT_STYLES:
        raise ValueError(f"reward.format_style must be one of {FORMAT_STYLES}, got {style!r}")
    return [float(_has_format(text, style)) for text in completions]


class RewardFunction:
    """Weighted sum of reward terms: ``reward = sum_k weight_k * term_k`` (None if a term is None).

    A term is ``accuracy``, ``format`` or an own function named by its import path
    (``mypkg.rewards:brevity``, resolved once, here), called as TRL calls its ``reward_funcs``:
    ``f(completions, golds, **row_fields) -> list[float | None]``, where ``row_fields`` holds one list
    per field, a value per completion (the caller's problem fields: question, id, the dataset row's
    other fields, ...). An own function should take ``**kwargs`` for the fields it does not use.
    """

    def __init__(self, terms: list[tuple[str, float]], grader: Grader, format_style: str = "boxed") -> None:
        if not terms:
            raise ValueError("reward.terms is empty: give at least one {name, weight}")
        self.own: dict[str, Callable[..., Sequence[float | None]]] = {}
        for name, weight in terms:
            if ":" in name:
                from mgrpo_cli.grading.terms import resolve_reward_function

                self.own[name] = resolve_reward_function(name)
            elif name not in REWARD_TERMS:
                raise ValueError(f"unknown reward term {name!r}; known: {REWARD_TERMS} or an import path "
                                 "'package.module:function'")
            if not (isinstance(weight, (int, float)) and math.isfinite(weight)):
                raise ValueError(f"reward term {name!r} has a weight that is not a finite number: {weight!r}")
        if format_style not in FORMAT_STYLES:
            raise ValueError(f"reward.format_style must be one of {FORMAT_STYLES}, got {format_style!r}")
        self.terms = [(name, float(weight)) for name, weight in terms]
        self.grader = grader
        self.format_style = format_style

    def __call__(self, completions: list[str], golds: list[str], **row_fields: Sequence[Any]) -> Scored:
        correct = self.grader.correct(completions, golds)
        values = {"accuracy": [None if c is None else float(c) for c in correct]}
        if any(name == "format" for name, _ in self.terms):
            values["format"] = format_reward(completions, golds, style=self.format_style)
        if self.own:
            from mgrpo_cli.grading.terms import call_reward_function

            for name, fn in self.own.items():
                values[name] = call_reward_function(name, fn, completions, golds, row_fields)
        rewards: list[float | None] = []
        for i in range(len(completions)):
            parts = [(weight, values[name][i]) for name, weight in self.terms]
            rewards.append(None if any(v is None for _, v in parts) else sum(w * v for w, v in parts))
        return Scored(rewards=rewards, correct=correct)

    def close(self) -> None:
        self.grader.close()

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _field(node: Any, name: str) -> Any:
    return node[name] if isinstance(node, Mapping) else getattr(node, name)


def build_reward(cfg: Any) -> RewardFunction:
    """The reward of a ``reward`` config (``RewardConfig``: terms, timeout_s, last_number_fallback,
    format_style), with its own ``Grader``."""
    terms = [(_field(t, "name"), _field(t, "weight")) for t in _field(cfg, "terms")]
    grader = Grader(timeout_s=_field(cfg, "timeout_s"), last_number_fallback=_field(cfg, "last_number_fallback"))
    return RewardFunction(terms, grader, format_style=_field(cfg, "format_style"))
