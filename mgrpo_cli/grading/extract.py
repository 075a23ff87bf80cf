r"""Answer extraction: the final answer a completion states, and GSM8K's gold answer.

``extract_answer(text)``, first rule that applies:
  1. the last ``<answer>…</answer>``: the last ``\boxed{}`` inside it, else its whole text;
  2. the last ``\boxed{…}`` or ``\fbox{…}`` (nested braces matched; an unclosed last box counts
     as no answer, earlier boxes are never used: the last box wins);
  3. GSM8K's ``#### N`` (the rest of that line);
  4. only with ``last_number_fallback``: the last number of the text.
No extractable answer is a wrong answer (``False``, reward 0), not an ungradable one.

Everything here is regexes and string operations: model text is never evaluated. A completion over
``MAX_COMPLETION_CHARS`` or an answer over ``MAX_ANSWER_CHARS`` is not parsed (the grader counts it
as a time-limit case).
"""
from __future__ import annotations

import re
from collections import deque

MAX_COMPLETION_CHARS = 200_000
MAX_ANSWER_CHARS = 1_000

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
