r"""Answer extraction: the final answer a completion states, and GSM8K's gold answer.

``extract_answer(text)``, first rule that applies:
  1. the last ``<answer>…</answer>``: the last ``\boxed{}`` inside it, else its whole text;
  2. the last ``\boxed{…}`` or ``\fbox{…}`` (nested braces matched; an unclosed last box counts
     as no answer; earlier boxes are not used: the last box wins);
  3. GSM8K's ``#### N`` (the rest of that line);
  4. only with ``last_number_fallback``: the last number of the text.
Several boxes (``parts`` > 1, a gold of that many parts): when the last box holds one part (no
comma outside brackets) and the text (or its ``<answer>``) has at least ``parts`` boxes, the answer
is the last ``parts`` boxes in order, joined with ``", "`` inside the gold's own ``brackets``
(``\boxed{3}`` … ``\boxed{5}`` for the gold ``3, 5`` reads ``3, 5``; for ``(3, 5)``, ``(3, 5)``).
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
_OPEN, _CLOSE = "([{", ")]}"  # brackets for split_parts (\{ and \} count as { and })


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    tail = deque(pattern.finditer(text), maxlen=1)
    return tail[0] if tail else None


def _boxes(text: str) -> list[tuple[int, int, int, int]]:
    r"""Every ``\boxed``/``\fbox`` in ``text`` as (start, end, content start, content end), in order;
    content end -1 for a box left unclosed. One pass over the braces (a stack), and no text copied, so
    linear in the text's length however many boxes nest."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return []
    closing: dict[int, int] = {}  # position of each matched "{" -> its "}"
    stack: list[int] = []
    for brace in _BRACE_RE.finditer(text, boxes[0].start()):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            closing[stack.pop()] = brace.start()
    out: list[tuple[int, int, int, int]] = []
    for match in boxes:
        if match.group(1) is None:  # \boxed 5
            out.append((match.start(), match.end(), match.start(2), match.end(2)))
            continue
        close = closing.get(match.start(1), -1)
        out.append((match.start(), len(text) if close < 0 else close + 1, match.end(1), close))
    return out


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{…}``/``\fbox{…}`` (nested braces matched), or None."""
    boxes = last_boxes(text, 1)
    return boxes[-1] if boxes else None


def last_boxes(text: str, n: int) -> list[str] | None:
    r"""Contents of the last ``n`` boxes (fewer if there are fewer), in order; of a box inside
    another, the inner one. None when there is none or the last is unclosed (the answer was cut off).
    The last box alone (``n`` = 1, the usual case) is found by a scan from it to its closing brace."""
    match = _last_match(_BOX_RE, text)
    if match is None:
        return None
    if match.group(1) is None:  # \boxed 5
        last: str | None = match.group(2)
    else:
        depth, last = 0, None
        for brace in _BRACE_RE.finditer(text, match.end(1) - 1):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                last = text[match.end(1) : brace.start()]
                break
    if last is None or n == 1:
        return None if last is None else [last]
    taken: list[tuple[int, int, int, int]] = []
    for box in reversed(_boxes(text)):
        if box[3] >= 0 and (not taken or box[1] <= taken[-1][0]):  # closed, not around the box taken last
            taken.append(box)
            if len(taken) == n:
                break
    return [text[begin:close] for _, _, begin, close in reversed(taken)]


def split_parts(answer: str) -> list[str]:
    """``answer`` split at the commas outside brackets, ``(``, ``[``, ``{`` (``\\{`` too)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(answer):
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(answer[start:i])
            start = i + 1
    parts.append(answer[start:])
    return [p.strip() for p in parts]


def extract_gold_gsm8k(solution: str) -> str:
    """GSM8K's gold answer: the text after the last ``####``, commas stripped."""
    head, sep, tail = solution.rpartition("####")
    answer = tail.strip().replace(",", "")
    if not sep or not answer:
        raise ValueError(f"GSM8K solution has no '#### <answer>' line: {solution[-200:]!r}")
    return answer


def extract_answer(text: str, *, last_number_fallback: bool = False, parts: int = 1,
                   brackets: tuple[str, str] = ("", "")) -> str | None:
    """The final answer stated in ``text`` (rules in the module docstring), or None."""
    start = text.rfind("<answer>")
    if start >= 0:
        end = text.find("</answer>", start)
        if end >= 0:
            inner = text[start + len("<answer>") : end]
            answer = _boxed_answer(inner, parts, brackets)
            return _nonempty(inner if answer is None else answer)
    answer = _boxed_answer(text, parts, brackets)
    if answer is not None:
        return _nonempty(answer)
    head, sep, tail = text.rpartition("####")
    if sep:
        return _nonempty(tail.strip().split("\n", 1)[0])
    if last_number_fallback:
        match = _last_match(_NUMBER_RE, text)
        return match.group() if match else None
    return None


def _boxed_answer(text: str, parts: int, brackets: tuple[str, str]) -> str | None:
    """The last box, or the last ``parts`` boxes joined when the last one holds a single part."""
    boxes = last_boxes(text, parts)
    if not boxes:
        return None
    if len(boxes) < parts or len(split_parts(boxes[-1])) > 1:
        return boxes[-1]
    return brackets[0] + ", ".join(p.strip() for p in boxes) + brackets[1]


def _nonempty(answer: str) -> str | None:
    answer = answer.strip()
    return answer or None
