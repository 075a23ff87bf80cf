r"""The grading table: (gold, completion, verdict) by category, in the style of math-verify's own suite.

Every case is graded twice: on the main thread by ``Grader.correct``, and on another thread through
``RewardFunction`` (the training reward), where math-verify's own ``signal.alarm`` cannot work and the
worker's deadline must. Cases where math-verify's defaults (``verify(parse(gold), parse(completion))``)
give the other verdict say why ours is right. ``FINDINGS`` are the cases a check against math-verify's
own suite found graded wrong (issue 33).
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from mgrpo_cli.grading.grader import Grader
from mgrpo_cli.grading.rewards import RewardFunction

# The adversarial cases run at the default reward.timeout_s, which must stop them; the others under a
# limit no honest case comes near even on a loaded machine (sympy's slowest here take ~4 s on 2 busy
# cores), so that a verdict never depends on the load.
HOSTILE_LIMIT_S = 2.0
LIMIT_S = 20.0


def b(answer: str) -> str:
    return f"We work it out step by step, and so the final answer is $\\boxed{{{answer}}}$."


FINDINGS = [
    # a list read as a thousands-separated number, both ways: "a, bbb" with a space is a list
    ("32349", b("32, 349"), False),
    ("1, 100", b("1100"), False),
    # a leading "0," is a decimal comma, both ways
    ("0,111", b("0.111"), True),
    ("0.111", b("0,111"), True),
    # percent words dropped like \%, on both sides
    ("28\\%", b("28 percent"), True),
    ("28\\%", b("28 pct"), True),
    ("28\\%", b("28 percentage"), True),
    ("28 pct", b("28"), True),
    # a trailing comma stripped as a trailing period is
    ("\\frac{1}{3}", b("\\frac{1}{3},"), True),
    # one box per part of a several-part gold
    ("3, 5", "so $\\boxed{3}$ and $\\boxed{5}$.", True),
]

NUMBERS = [
    ("-5", b("-5"), True),
    ("5", b("+5"), True),
    ("-5", b("5"), False),
    ("5", b("-5"), False),
    ("-5", b("- 5"), True),
    ("-5", b("\u22125"), True),  # Unicode minus
    ("7425000", b("7,425,000"), True),
    ("7425000", b("7{,}425{,}000"), True),
    ("7425000", b("7,425,001"), False),
    # math-verify: 1*000 = 0 (implicit product). A space between groups of three is the SI thousands separator.
    ("1000", b("1 000"), True),
    ("1000", b("1\\,000"), True),  # math-verify: 1*000 again; \, is LaTeX's thousands thin space
    ("1000", b("1000.0"), True),
    ("1000.5", b("1,000.5"), True),
    ("0.111", b("0,111"), True),  # a leading "0," is a decimal comma
    ("0.5", b("0{,}5"), True),  # math-verify: unparsed; LaTeX's decimal comma (babel's German: 0{,}5)
    ("0.5", b("0, 5"), False),  # with a space: the list 0, 5
    ("0,1", b("0, 1"), True),  # 0,1 is the list 0, 1 (a decimal comma only before three digits)
    ("0,1", b("1,0"), True),
    ("0.1", b("0,1"), False),
    ("0,25", b("0.25"), False),
    ("32349", b("32,\\!349"), True),
    ("7425000", b("7, 425, 000"), False),  # "a, bbb" with a space is a list, never a number
    ("1,100", b("1100"), True),  # the gold's own thousands separator
    ("58,500", b("58500"), True),
    ("58,500", b("58, 500"), False),
    ("1100", b("1,1000"), False),  # not grouped in threes: the list 1, 1000
    ("1.5", b("1,5"), False),  # only a leading 0 makes a decimal comma: 1,5 is the list 1, 5
    ("1500", b("1.5e3"), True),
    ("1500", b("1.5E+3"), True),  # math-verify: E as a symbol; ours: E notation as programs print it
    ("150", b("1.5e3"), False),
    ("0.025", b("2.5 \\times 10^{-2}"), True),
    ("1000", b("10^{3}"), True),
    ("1000", b("1 \\cdot 10^3"), True),
    ("0", b("10^{-7}"), False),
    ("\\frac{5}{2}", b("2\\frac{1}{2}"), True),  # mixed number
    ("-\\frac{5}{2}", b("-2\\frac{1}{2}"), True),
    ("2.25", b("2 \\frac{1}{4}"), True),
    ("1", b("2\\frac{1}{2}"), False),  # a mixed number, not 2 * 1/2
    ("12345678901234567890", b("12345678901234567890"), True),
    ("12345678901234567890", b("12345678901234567891"), False),
    ("0.4", b(".4"), True),
    ("3", b("3.0"), True),
    ("2", b("AZYUK2A"), False),
]

PRECISION = [  # decimals compare after rounding both sides to 6 places, whatever the gold carries
    ("\\frac{1}{3}", b("0.333333"), True),
    ("\\frac{1}{3}", b("0.3333333"), True),
    ("\\frac{1}{3}", b("0.33"), False),
    ("0.33", b("\\frac{1}{3}"), False),
    ("\\frac{1}{12}", b("0.0833333333333333"), True),
    ("\\frac{2}{3}", b("0.666667"), True),
    ("\\frac{2}{3}", b("0.666666"), False),
    ("2.5", b("\\frac{5}{2}"), True),
    ("2.5", b("2.50"), True),
    ("2.5", b("2.51"), False),
    ("16386.17", b("16386.17"), True),
    ("16386.17", b("16386.1655"), False),
    ("\\frac{10}{9}", b("10/9"), True),
    ("-\\frac{10}{9}", b("-10/9"), True),
    ("\\frac{3}{4}", b("\\frac{6}{8}"), True),
    ("\\frac{3}{4}", b("\\frac34"), True),
    ("\\frac{3}{4}", b("0.75"), True),
    ("\\frac{3}{4}", b("\\frac{3}{5}"), False),
    ("0.1", b("\\frac{1}{10}"), True),
    ("\\frac{1}{2}", b("\\frac{-1}{-2}"), True),
]

PERCENT = [  # the gold states the number of percent: "%" and percent words are dropped on both sides
    ("28\\%", b("28\\text{ percent}"), True),
    ("28 percent", b("28\\%"), True),
    ("28\\%", b("28 percentile"), False),  # not a percent word
    ("28\\%", b("28\\%"), True),
    ("28\\%", b("28 %"), True),  # math-verify: "%" starts a TeX comment; in a model's box it means percent
    ("28", b("28\\%"), True),  # math-verify: no; a gold states the number of percent, and so does 28%
    ("28 percent", b("28"), True),
    ("28\\%", b("0.28"), False),
    ("28\\%", b("29\\%"), False),
    ("100\\%", b("100"), True),
    ("50\\%", b("\\frac{1}{2}"), False),
]

UNITS = [
    ("18", b("18\\text{ cm}"), True),
    ("18", b("19\\text{ cm}"), False),
    ("125", b("125\\textnormal{ miles}"), True),
    ("90^\\circ", b("90"), True),
    ("90", b("90^{\\circ}"), True),
    ("\\$18", b("18"), True),
    ("18", b("\\$18.00"), True),
    ("\\text{Evelyn}", b("\\text{Evelyn}"), True),
    ("\\text{Evelyn}", b("\\text{Briana}"), False),
    ("\\text{(C)}", b("C"), True),
    ("\\text{C}", b("\\text{(C)}"), True),
    ("E", b("\\text{E}"), True),
]

SPACING = [
    ("\\frac{1}{2}", b("\\frac{1}{2}\\,"), True),
    ("12", b("1\\!2"), True),
    ("x+1", b("x\\;+\\;1"), True),
    ("1000", b("1~000"), True),  # math-verify: 1*000; a space of any kind inside a number groups thousands
    ("1000", b("1\\ 000"), True),
    ("3", b("\\quad 3"), True),
    ("3", b("3\\qquad"), True),
    ("3", b("\\hspace{1em}3"), True),  # math-verify: unparsed; spacing never changes a value
    ("2\\sqrt{2}", b("2\\,\\sqrt{2}"), True),
    ("\\frac12", b("\\displaystyle\\frac{1}{2}"), True),
    ("\\frac{1}{2}", b("\\left(\\frac{1}{2}\\right)"), True),
    ("\\frac{1}{2}", b("\\dfrac{1}{2}"), True),
]

SETS = [
    ("\\{1,2\\}", b("\\{2,1\\}"), True),
    ("\\{1,2\\}", b("\\{1,2,3\\}"), False),
    ("\\{1,2\\}", b("\\{1,3\\}"), False),
    ("\\{1\\pm\\sqrt{5},-2\\}", b("\\{1\\pm\\sqrt{5},-2\\}"), True),
    ("\\{-1\\} \\cup [0,7)", b("\\{-1\\}\\cup[0,7)"), True),
    ("\\{-1\\} \\cup [0,7)", b("\\{-1\\}\\cup[0,7]"), False),
]

INTERVALS = [
    ("[0,1)", b("[0,1)"), True),
    ("[0,9)", b("[0,1)"), False),
    ("(0,9)", b("[0,9)"), False),
    ("[-2,7]", b("x \\in [-2,7]"), True),
    ("(-\\infty, 0) \\cup (1, \\infty)", b("(-\\infty,0)\\cup(1,\\infty)"), True),
    ("(2, 12) \\cup (12, 102)", b("(2,12)\\cup(12,102)"), True),
    ("(\\frac{3}{5},\\frac{8}{3}]", b("(0.6,\\frac{8}{3}]"), True),
    ("[1,2]", b("[1,2)"), False),
    ("[-4,0]", b("[-4, 0]"), True),
    ("(3,4]", b("(3, 4]"), True),
    ("[-1, -\\frac{1}{2}) \\cup (-\\frac{1}{2}, 0)", b("[-1, -\\tfrac12) \\cup (-\\tfrac12, 0)"), True),
]

TUPLES = [
    ("(6,31,-1)", b("(6,31,-1)"), True),
    ("(6,31,-1)", b("(6, 31, -1)"), True),
    ("(6,31,-1)", b("(31,6,-1)"), False),  # a tuple is ordered
    ("(1,\\frac{9}{2})", b("(1,4.5)"), True),
    ("(3, \\frac{\\pi}{2})", b("\\left( 3, \\frac{\\pi}{2} \\right)"), True),
    ("3, 5, 7", b("7, 5, 3"), True),  # a bare list is unordered (MATH: "enter all the solutions")
    ("3, 5, 7", b("3, 5"), False),
    ("3, 5, 7", b("3, 5, 7, 9"), False),
    ("-2,1", b("1,-2"), True),
    # math-verify reads both as the set {1, 2}. A list that repeats a value is a different answer.
    ("1, 1, 2", b("1, 2"), False),
    # math-verify: the set {3} equals 3. A list is never a single number.
    ("3", b("3, 3"), False),
    ("3, 5", b("3"), False),
    ("2500,7500", b("2500, 7500"), True),
    ("1,3", b("1, 3"), True),
    ("1, 3", b("1,3"), True),
    # math-verify reads 1,100 as 1100. Where the gold is a list, the comma separates: the list 1, 100.
    ("1, 100", b("1,100"), True),
    ("1,100", b("1, 100"), False),
    ("\\frac{1}{2}, \\frac{1}{3}", b("0.5, \\frac13"), True),
    ("(1,2), (3,4)", b("(3,4), (1,2)"), True),
]

MATRICES = [
    ("\\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix}", b("\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}"), True),
    ("\\begin{bmatrix}0 & 0 \\\\ 0 & 0\\end{bmatrix}", b("\\begin{pmatrix}0 & 0 \\\\ 0 & 0\\end{pmatrix}"), True),
    ("\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", b("\\begin{pmatrix}1 & 2 \\\\ 3 & 5\\end{pmatrix}"), False),
    ("\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", b("\\begin{pmatrix}1 & 3 \\\\ 2 & 4\\end{pmatrix}"), False),
    ("\\begin{pmatrix}\\frac{1}{2} \\\\ \\frac{1}{4}\\end{pmatrix}", b("\\begin{pmatrix}0.5 \\\\ 0.25\\end{pmatrix}"), True),
    ("\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}", b("\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}"), True),
]

RELATIONS = [
    ("x \\geq 5", b("x >= 5"), True),
    ("x < 3", b("x \\lt 3"), True),
    ("x > 5", b("x < 5"), False),
    ("x \\leq 5", b("5 \\geq x"), True),
    ("x < 1", b("-x > -1"), True),
    ("x < 1", b("x > -1"), False),
    ("x \\neq 3", b("x \\ne 3"), True),
    ("k=1", b("1"), True),
    ("1", b("k=1"), True),
    ("3", b("x = 3"), True),
    ("2x+4y-3=0", b("y=-\\frac{1}{2}x+\\frac{3}{4}"), True),
    ("a+3z=0", b("0"), False),
    ("y = 2x + 1", b("y = 1 + 2x"), True),
    ("y = 2x + 1", b("y = 2x - 1"), False),
    ("\\frac{x^2}{4} + \\frac{y^2}{3} = 1", b("\\frac{x^2}{16} + \\frac{y^2}{12} = \\frac{1}{4}"), True),
]

ALGEBRA = [
    ("2 \\sin b \\cos a", b("2\\cos a \\sin b"), True),
    ("\\tan^2(y)+1", b("\\sec^2(y)"), True),
    ("4", b("4\\sqrt{2}"), False),
    ("1 \\pm \\sqrt{19}", b("1 \\pm \\sqrt{19}"), True),
    ("\\frac{\\pi r}{h+r}", b("\\frac{\\pi r}{r+h}"), True),
    ("\\sqrt{2}+\\sqrt{5}", b("\\sqrt 2+\\sqrt 5"), True),
    ("\\frac{9}{4}\\pi", b("\\frac94\\pi"), True),
    ("x+2n+1", b("x+1"), False),
]

SEVERAL_BOXES = [  # for a gold of k parts, the last k boxes when the last box holds one part
    ("3, 5", "so $x = \\boxed{3}$ and $y = \\boxed{5}$.", True),
    ("3, 5", "so $\\boxed{5}$ and $\\boxed{3}$.", True),  # a bare list: unordered, as one box would be
    ("(3, 5)", "so $x = \\boxed{3}$ and $y = \\boxed{5}$.", True),  # a tuple: the boxes in order
    ("(3, 5)", "so $x = \\boxed{5}$ and $y = \\boxed{3}$.", False),
    ("\\{3, 5\\}", "the roots are $\\boxed{5}$ and $\\boxed{3}$", True),  # a set: any order
    ("3, 5", "so $\\boxed{3}$.", False),
    ("3", "first $\\boxed{2}$, then $\\boxed{3}$", True),  # a one-part gold: the last box
    ("3", "first $\\boxed{3}$, then $\\boxed{2}$", False),
    ("3, 5", "guess $\\boxed{1}$; no: $\\boxed{3}$ and $\\boxed{5}$", True),
    ("3, 5", "$\\boxed{3}$ $\\boxed{5}$ $\\boxed{7}$", False),  # the last two are 5 and 7
    ("3, 5, 7", "$\\boxed{3}$ and $\\boxed{5}$", False),  # too few boxes
    ("3, 5", "$\\boxed{3, 5}$", True),
    ("3, 5", "first $\\boxed{1}$, then $\\boxed{3, 5}$", True),  # the last box holds both parts
    ("(1,8,19), (2,7,13)", "$\\boxed{(1,8,19)}$ and $\\boxed{(2,7,13)}$", True),
    ("3, 5", "<think>x</think><answer>$\\boxed{3}$ and $\\boxed{5}$</answer>", True),
    ("3, 5", "<think>$\\boxed{3}$</think><answer>$\\boxed{5}$</answer>", False),  # boxes of the answer only
    # math-verify joins the boxes into "1,100", the number 1100: wrong here, and right below. The boxes are
    # the parts of a list; a one-part gold is graded on the last box alone.
    ("1, 100", "$\\boxed{1}\\boxed{100}$", True),
    ("1100", "$\\boxed{1}\\boxed{100}$", False),
]

PUNCTUATION = [  # math-verify: all but the last wrong; a trailing mark ends the sentence, not the answer
    ("\\frac{1}{3}", b("\\frac{1}{3}, "), True),
    ("5", b("5."), True),
    ("5", b("5;"), True),
    ("5", b("5 ,"), True),
    ("3, 5", b("3, 5,"), True),
    ("\\frac{1}{3}", "so $\\boxed{\\frac{1}{3}}$.", True),
]

ADVERSARIAL = [  # wrong within the time limit, never a hang or a crash
    ("7", b("9^{9^{9^{9}}}"), False),
    ("7", b("10^{1000000000}"), False),
    ("2", b("2^{2^{2^{2^{2^{2}}}}}"), False),
    ("7", b("1e999"), False),
    ("7", "\\boxed{" + "1" * 5000 + "}", False),  # over the answer size limit
    ("7", "\\boxed{" * 10_000, False),  # never closed
    ("7", b("\\frac{" * 150 + "1" + "}{2}" * 150), False),
    ("1", b("\\sqrt{" * 150 + "1" + "}" * 150), False),
    ("7", b("(" * 400 + "7" + ")" * 400), False),
    ("7", b("7" + "\\!" * 300), True),  # spacing commands alone, however many
]

TABLE = {
    "finding": FINDINGS, "number": NUMBERS, "precision": PRECISION, "percent": PERCENT, "unit": UNITS,
    "spacing": SPACING, "set": SETS, "interval": INTERVALS, "tuple": TUPLES, "matrix": MATRICES, "relation": RELATIONS,
    "algebra": ALGEBRA, "boxes": SEVERAL_BOXES, "punctuation": PUNCTUATION, "adversarial": ADVERSARIAL,
}
CASES = [pytest.param(name == "adversarial", gold, completion, expected, id=f"{name}-{i}")
         for name, rows in TABLE.items() for i, (gold, completion, expected) in enumerate(rows)]


@pytest.fixture(scope="module")
def graders():
    """{hostile: Grader}, one per time limit, shared by the module."""
    with Grader(timeout_s=LIMIT_S, last_number_fallback=False) as ordinary, \
            Grader(timeout_s=HOSTILE_LIMIT_S, last_number_fallback=False) as hostile:
        hostile.correct([b("\\sqrt{4}")], ["2"])  # its worker started outside the timed cases
        yield {False: ordinary, True: hostile}


@pytest.fixture(scope="module")
def grader(graders):
    return graders[False]


@pytest.fixture(scope="module")
def thread_rewards():
    """{hostile: the training reward} on graders of their own (no verdict shared through the cache)."""
    rewards = {hostile: RewardFunction([("accuracy", 1.0)], Grader(timeout_s=limit, last_number_fallback=False),
                                       "boxed") for hostile, limit in ((False, LIMIT_S), (True, HOSTILE_LIMIT_S))}
    yield rewards
    for reward in rewards.values():
        reward.close()


def test_table_size():
    assert len(CASES) >= 150
    assert all(rows for rows in TABLE.values())


@pytest.mark.parametrize("hostile,gold,completion,expected", CASES)
def test_grading_table(graders, hostile, gold, completion, expected):
    start = time.monotonic()
    assert graders[hostile].correct([completion], [gold]) == [expected]
    if hostile:  # stopped by the time limit (the worker's own timer, else the kill at the limit)
        assert time.monotonic() - start < HOSTILE_LIMIT_S + 1.0


@pytest.mark.parametrize("hostile,gold,completion,expected", CASES)
def test_grading_table_off_the_main_thread(thread_rewards, hostile, gold, completion, expected):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(scored=thread_rewards[hostile]([completion], [gold])))
    thread.start()
    thread.join(2 * LIMIT_S + 60)
    assert not thread.is_alive()
    assert out["scored"].correct == [expected]
    assert out["scored"].rewards == [float(expected)]


def test_no_list_scores_as_a_number_or_back(grader):
    """The number a·1000 + c against the list a, c written every way a model writes a list, and back;
    the list against itself (so the check can fail), all decided without math-verify."""
    rng = random.Random(33)
    golds, completions, expected = [], [], []
    for _ in range(100):
        a, c = rng.randint(1, 999), rng.randint(100, 999)
        number, listed = f"{a}{c}", f"{a}, {c}"
        for gold, completion, verdict in [
            (number, b(listed), False),
            (number, b(f"{a} , {c}"), False),
            (number, f"\\boxed{{{a}}} and \\boxed{{{c}}}", False),
            (f"{a},{c}", b(listed), False),  # the gold's own thousands separator
            (listed, b(number), False),
            (listed, b(f"{a}{{,}}{c}"), False),  # {,} only ever separates thousands
            (listed, b(f"{a},{c}"), True),
            (listed, f"\\boxed{{{a}}} and \\boxed{{{c}}}", True),
        ]:
            golds.append(gold)
            completions.append(completion)
            expected.append(verdict)
    before = grader.stats()["fast_path"]
    assert grader.correct(completions, golds) == expected
    assert grader.stats()["fast_path"] - before == len(golds)


def test_answer_is_what_the_grader_reads(grader):
    """Records and majority votes keep the answer as graded: the boxes of a several-part gold joined."""
    two = "so $x = \\boxed{3}$ and $y = \\boxed{5}$."
    assert grader.answer(two, "3, 5") == "3, 5"
    assert grader.answer(two, "(3, 5)") == "(3, 5)"
    assert grader.answer(two, "\\{3,5\\}") == "\\{3, 5\\}"
    assert grader.answer(two, "8") == "5"
    assert grader.answer(two, "[3, 5]") == "5"  # an interval is one answer
    assert grader.answer("no box", "3, 5") is None
