"""Answer extraction, grading, time limits, injection safety and rewards (mgrpo_cli/grading: extract, grader, worker, rewards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mgrpo_cli.cli import build
from mgrpo_cli.config.schema import TrainAppConfig
from mgrpo_cli.errors import UserError
from mgrpo_cli.grading.extract import extract_answer, extract_gold_gsm8k, last_boxed
from mgrpo_cli.grading.grader import Grader
from mgrpo_cli.grading.rewards import RewardFunction, format_reward
from mgrpo_cli.grading.terms import RewardTermError
from mgrpo_cli.grading.worker import Worker

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MGRPO_DATA_DIR") or "mgrpo-no-data-folder")  # tests/conftest.py sets it
needs_data = pytest.mark.skipif(not (DATA / "math500").is_dir(), reason=f"no data folder with math500 at {DATA}")


def b(answer: str) -> str:
    return f"Some reasoning first: 2+2=4.\nSo the final answer is $\\boxed{{{answer}}}$."


# (completion, gold, expected) ---------------------------------------------------------------
EQUIVALENT = [
    (b("18"), "18"),
    (b("\\frac{1}{2}"), "0.5"),
    (b("0.5"), "\\frac{1}{2}"),
    (b("\\dfrac{3}{4}"), "\\frac{3}{4}"),
    (b("\\tfrac34"), "0.75"),
    (b("3/4"), "\\frac34"),
    (b("-\\frac{1}{2}"), "-0.5"),
    (b("\\frac{-1}{2}"), "-\\frac12"),
    (b("0.333333"), "\\frac{1}{3}"),
    (b("1000.0"), "1000"),
    (b("1,234"), "1234"),
    (b("1{,}234,567"), "1234567"),
    (b("\\$18"), "18"),
    (b("\\$18.00"), "\\$18"),
    (b("50\\%"), "50"),
    (b("1.5\\times10^{3}"), "1500"),
    (b("1.5e3"), "1500"),
    (b("2.5 \\times 10^{-2}"), "0.025"),
    (b("10^{3}"), "1000"),
    (b("\\sqrt{8}"), "2\\sqrt{2}"),
    (b("\\frac{\\sqrt{3}}{3}"), "\\frac{1}{\\sqrt{3}}"),
    (b("(3, \\frac{\\pi}{2})"), "\\left( 3, \\frac{\\pi}{2} \\right)"),
    (b("[-2, 7]"), "[-2,7]"),
    (b("x \\in [-2,7]"), "[-2,7]"),
    (b("(-\\infty, 0) \\cup (1, \\infty)"), "(-\\infty,0)\\cup(1,\\infty)"),
    (b("\\{2, 1\\}"), "\\{1,2\\}"),
    (b("3, 1, 2"), "1, 2, 3"),
    (b("y+x"), "x+y"),
    (b("2x+1"), "1+2x"),
    (b("(x+1)^2"), "x^2+2x+1"),
    (b("r^2\\pi"), "\\pi r^2"),
    (b("6 - 5i"), "6-5i"),
    (b("90^\\circ"), "90"),
    (b("18\\text{ cm}"), "18"),
    (b("C"), "\\text{(C)}"),
    (b("x=3"), "3"),
    (b("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("Reasoning.\n#### 1,000", "1000"),
    ("<think>2+2 is 4</think><answer>4</answer>", "4"),
    ("<think>maybe \\boxed{3}</think><answer>The answer is \\boxed{7}.</answer>", "7"),
    ("so \\fbox{12}", "12"),
    ("first \\boxed{6}, then on second thought \\boxed{5}", "5"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),
]
NOT_EQUIVALENT = [
    (b("-18"), "18"),  # sign
    (b("18"), "-18"),
    (b("6+5i"), "6-5i"),
    (b("0.33"), "\\frac{1}{3}"),  # rounding: 6 decimals needed
    (b("0.67"), "\\frac{2}{3}"),
    (b("3.14"), "\\pi"),
    (b("19"), "18"),
    (b("1,234"), "1243"),
    (b("0.5"), "5"),
    (b("1.5e3"), "150"),
    (b("x-y"), "y-x"),
    (b("2\\sqrt{3}"), "3\\sqrt{2}"),
    (b("[1,2]"), "(1,2)"),  # bracket type
    (b("[1,2)"), "[1,2]"),
    (b("(2,1)"), "(1,2)"),  # tuples are ordered
    (b("\\{1,2\\}"), "\\{1,2,3\\}"),
    ("first \\boxed{5}, then on second thought \\boxed{6}", "5"),  # last boxed wins
    ("<think>\\boxed{5}</think><answer>6</answer>", "5"),  # the answer tag wins
    ("The answer is 18.", "18"),  # no boxed answer, no fallback
]
MALFORMED = [
    ("", "1"),
    ("the answer is \\boxed{12", "12"),  # unclosed (cut-off) box
    ("\\boxed{}", "0"),
    ("\\boxed{\\frac{1}{2}", "\\frac12"),
    (b("\\left("), "1"),
    (b("\\sqrt"), "1"),
    (b("@#^&*"), "1"),
    (b("\\frac{1}{0}"), "0"),
    (b("1/0"), "0"),
    (b("\\infty"), "1"),
    ("<answer></answer>", "1"),
    ("#### ", "1"),
    (b("\x00\ufffd\u202e"), "1"),
    (b("}{"), "1"),
    (b("\\begin{pmatrix} 1 \\\\ 2"), "1"),
]
INJECTION = [  # {M} = a file the payload would create
    b("__import__('os').system('touch {M}')"),
    b("eval(\"open('{M}', 'w')\")"),
    b("exec('import os; os.system(\\'touch {M}\\')')"),
    b("().__class__.__base__.__subclasses__()[0]('{M}')"),
    b("\\text{__import__('os').system('touch {M}')}"),
    "<answer>__import__('pathlib').Path('{M}').touch()</answer>",
    "#### __import__('os').system('touch {M}')",
    "$__import__('os').system('touch {M}')$ = 1",
]
CASES = (
    [pytest.param(c, g, True, id=f"eq-{i}") for i, (c, g) in enumerate(EQUIVALENT)]
    + [pytest.param(c, g, False, id=f"ne-{i}") for i, (c, g) in enumerate(NOT_EQUIVALENT)]
    + [pytest.param(c, g, False, id=f"malformed-{i}") for i, (c, g) in enumerate(MALFORMED)]
)


# The tables' verdicts must not depend on the machine's load: a limit no honest case comes near (sympy's
# slowest here take seconds on 2 busy cores); the time-limit tests below make graders of their own.
TABLE_LIMIT_S = 20.0


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=TABLE_LIMIT_S, last_number_fallback=False) as g:
        yield g


@pytest.fixture(scope="module")
def fallback_grader():
    with Grader(timeout_s=TABLE_LIMIT_S, last_number_fallback=True) as g:
        yield g


@pytest.mark.parametrize("completion,gold,expected", CASES)
def test_grading_table(grader, completion, gold, expected):
    assert grader.correct([completion], [gold]) == [expected]


def test_table_size():
    assert len(CASES) + len(INJECTION) >= 60


@pytest.mark.parametrize("payload", INJECTION)
@pytest.mark.parametrize("fallback", [False, True])
def test_injection_executes_nothing(payload, fallback, grader, fallback_grader, tmp_path):
    marker = tmp_path / "pwned"
    completion = payload.replace("{M}", str(marker))
    g = fallback_grader if fallback else grader
    assert g.correct([completion, "\\boxed{1}"], ["0", completion[-80:]]) in ([False, False], [False, None])
    assert not marker.exists()


def test_parent_imports_neither_torch_nor_math_verify():
    code = (
        "import sys; from mgrpo_cli.grading.grader import Grader;"
        "g = Grader(timeout_s=2.0, last_number_fallback=False); assert g.correct(['\\\\boxed{1,000}'], ['1000']) == [True];"
        "assert not {'torch', 'math_verify', 'sympy'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# Extraction ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("a \\boxed{1} b \\boxed{ {2} }", " {2} "),
        ("\\boxed 5$", "5"),
        ("\\fbox{x}", "x"),
        ("\\boxed{1", None),
        ("no box", None),
        ("\\boxed{\\boxed{3}}", "3"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_rules():
    assert extract_answer("x <answer> 42 </answer>") == "42"
    assert extract_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72\n") == "72"
    assert extract_answer("I think it is 12, or 1,234.5 apples") is None
    assert extract_answer("I think it is 12, or 1,234.5 apples", last_number_fallback=True) == "1,234.5"
    assert extract_answer("x = -3.", last_number_fallback=True) == "-3"


def test_last_number_fallback_grades():
    with Grader(timeout_s=2.0, last_number_fallback=True) as g:
        assert g.correct(["so it is 1,234 apples"], ["1234"]) == [True]
    with Grader(timeout_s=2.0, last_number_fallback=False) as g:
        assert g.correct(["so it is 1,234 apples"], ["1234"]) == [False]


def test_extract_gold_gsm8k():
    assert extract_gold_gsm8k("she pays 3,000\n#### 3,000") == "3000"
    with pytest.raises(ValueError, match="no '####"):
        extract_gold_gsm8k("she pays 3,000")


# Time limits --------------------------------------------------------------------------------
HOSTILE = {
    "tower": b("9^{9^{9^{9}}}"),
    "huge power": b("10^{1000000000}"),
    "1 MB answer": "\\boxed{" + "1" * 1_000_000 + "}",
    "1 MB completion": "(" * 1_000_000,
    "5000 nested parentheses": b("(" * 5000 + "1" + ")" * 5000),
}


def test_hostile_inputs_are_wrong_within_the_limit():
    limit = 1.0
    with Grader(timeout_s=limit, last_number_fallback=False) as g:
        g.correct([b("\\sqrt{4}")], ["2"])  # worker started outside the timed calls
        for name, completion in HOSTILE.items():
            start = time.monotonic()
            assert g.correct([completion], ["7"]) == [False], name
            assert time.monotonic() - start < limit + 0.5, name
        assert g.stats()["grader_timeout"] == len(HOSTILE)


def test_hard_limit_kills_a_stuck_worker_off_the_main_thread(monkeypatch):
    monkeypatch.setattr(Worker, "soft_fraction", 1000.0)  # the worker's own timer never fires
    limit, out = 1.0, {}

    def grade(g: Grader) -> None:
        start = time.monotonic()
        out["verdict"] = g.correct([HOSTILE["tower"], b("\\sqrt{9}")], ["7", "3"])
        out["seconds"] = time.monotonic() - start

    with Grader(timeout_s=limit, last_number_fallback=False) as g:
        g.correct([b("\\sqrt{4}")], ["2"])
        thread = threading.Thread(target=grade, args=(g,))
        thread.start()
        thread.join(30)
        assert out["verdict"] == [False, True]  # the restarted worker grades the rest
        assert out["seconds"] < limit + 5  # kill + restart + one more grading
        stats = g.stats()
    assert (stats["grader_timeout"], stats["worker_restarts"]) == (1, 1)


def _gone(pid: int) -> bool:
    """The process has ended (a zombie until its parent reaps it, or no longer listed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_workers_while_busy(grader: Grader, times: int, after_s: float = 3.0) -> threading.Thread:
    """A thread that SIGKILLs the grader's worker ``times`` times, each one ``after_s`` after it is seen:
    long enough to boot (math-verify's import) and be inside a stuck job, which runs until the worker's
    own timer (3/4 of the grader's limit)."""
    def run() -> None:
        killed: set[int] = set()
        while len(killed) < times:
            pid = grader.worker_pid
            if pid is None or pid in killed:
                time.sleep(0.01)
                continue
            time.sleep(after_s)
            _kill(pid)
            killed.add(pid)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


STUCK = [b("9^{9^{9^{9}}}"), b("10^{1000000000}")]  # math-verify works on each until the worker's own timer


MATH_VERIFY_JOBS = ([b("\\sqrt{9}"), b("\\sqrt{16}"), b("\\sqrt{25}")], ["3", "4", "5"])  # none on the fast path


def test_worker_killed_mid_batch_loses_only_the_answer_in_flight():
    with Grader(timeout_s=4.0, last_number_fallback=False) as g:
        assert g.correct([b("\\sqrt{4}")], ["2"]) == [True]  # worker up, so it is 1.5 s into the stuck job
        g.pop_stats()
        killer = _kill_workers_while_busy(g, 1, after_s=1.5)
        assert g.correct([STUCK[0], *MATH_VERIFY_JOBS[0]], ["7", *MATH_VERIFY_JOBS[1]]) == [None, True, True, True]
        killer.join(1)
        stats = g.pop_stats()  # a fresh worker graded the rest
        assert (stats["grader_error"], stats["worker_restarts"], stats["ungradable"], stats["graded"]) == (1, 1, 0, 3)
        assert g.correct([STUCK[0]], ["7"]) == [False]  # the lost answer was not cached: graded again
        stats = g.pop_stats()
        assert (stats["grader_error"], stats["grader_timeout"]) == (0, 1)


def test_worker_killed_twice_in_a_batch_counts_the_rest_and_the_next_batch_restarts_it():
    with Grader(timeout_s=10.0, last_number_fallback=False) as g:
        g.correct([b("\\sqrt{4}")], ["2"])
        g.pop_stats()
        killer = _kill_workers_while_busy(g, 2)
        assert g.correct([*STUCK, b("\\sqrt{9}")], ["7", "7", "3"]) == [None, None, None]
        killer.join(1)
        assert g.pop_stats()["grader_error"] == 3
        assert g.correct(*MATH_VERIFY_JOBS) == [True, True, True]
        assert g.stats()["worker_restarts"] == 2  # once within the batch, once at the next


def test_worker_killed_between_batches_or_failing_to_restart_never_raises(monkeypatch):
    reward = RewardFunction([("accuracy", 1.0)], Grader(timeout_s=5.0, last_number_fallback=False), "boxed")
    with reward:
        reward([b("\\sqrt{4}")], ["2"])
        _kill(reward.grader.worker_pid)
        assert reward(*MATH_VERIFY_JOBS).rewards == [1.0, 1.0, 1.0]  # restarted before the batch
        assert reward.grader.stats()["worker_restarts"] == 1 and reward.grader.stats()["grader_error"] == 0
        _kill(reward.grader.worker_pid)
        monkeypatch.setattr(sys, "executable", "/bin/false")  # the restart dies at once
        scored = reward([b("\\sqrt{36}"), b("7")], ["6", "7"])
        assert scored.rewards == [None, 1.0] and scored.correct == [None, True]  # fast path still grades
        assert reward.grader.stats()["grader_error"] == 1
        monkeypatch.undo()
        assert reward([b("\\sqrt{36}")], ["6"]).rewards == [1.0]


def test_worker_ignores_the_stop_signals_meant_for_the_trainer():
    with Grader(timeout_s=5.0, last_number_fallback=False) as g:
        g.correct([b("\\sqrt{4}")], ["2"])
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(g.worker_pid, sig)
        time.sleep(0.2)
        assert g.correct(*MATH_VERIFY_JOBS) == [True, True, True]
        assert g.stats()["worker_restarts"] == 0 and g.stats()["grader_error"] == 0


# Counters, None, validation -----------------------------------------------------------------
def test_stats_and_ungradable():
    with Grader(timeout_s=2.0, last_number_fallback=False) as g:
        verdicts = g.correct([b("18"), b("19"), "nothing", b("x+y"), b("1")], ["18", "18", "18", "y+x", ""])
        assert verdicts == [True, False, False, True, None]
        popped = g.pop_stats()
        assert popped == g.stats()
        assert popped["graded"] == 4 and popped["correct"] == 2 and popped["ungradable"] == 1
        assert popped["no_answer"] == 1 and popped["fast_path"] == 2 and popped["grader_timeout"] == 0
        assert g.pop_stats()["graded"] == 0 and g.stats()["graded"] == 4
        with pytest.raises(ValueError, match="2 completions but 1 gold"):
            g.correct(["a", "b"], ["1"])



# Rewards ------------------------------------------------------------------------------------
def test_format_reward():
    think = ["<think>a</think><answer>1</answer>", " a </think>\n<answer> 1 </answer>\n", "<answer>1</answer>",
             "<think>a</think><answer>1</answer> trailing", "<think>a</think><answer></answer>",
             "<think>a</think><think>b</think><answer>1</answer>"]  # fmt: skip
    assert format_reward(think, [""] * 6, style="think") == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert format_reward(["\\boxed{1}", "\\boxed{}", "1", "\\boxed{1"], [""] * 4, style="boxed") == [1.0, 0.0, 0.0, 0.0]


def test_reward_function_weights_and_none(grader):
    completions, golds = [b("5"), "5", b("4"), b("5")], ["5", "5", "5", ""]
    assert RewardFunction([("accuracy", 1.0)], grader, "boxed")(completions, golds).rewards == [1.0, 0.0, 0.0, None]
    scored = RewardFunction([("accuracy", 1.0), ("format", 0.1)], grader, "boxed")(completions, golds)
    assert scored.rewards == [1.1, 0.0, 0.1, None]
    assert scored.correct == [True, False, False, None]
    # each term's own value, for GDPO's per-term normalisation (reward.multi_objective_aggregation)
    assert scored.terms == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [None, 1.0]] and scored.weights == [1.0, 0.1]


def test_own_reward_functions_get_the_row_fields(grader, monkeypatch):
    """Own terms by import path (examples/rewards.py), weighted with the built-in ones; the dataset's
    fields reach them as one list per field."""
    monkeypatch.syspath_prepend(str(REPO))
    from examples.rewards import BREVITY_CHARS

    reward = RewardFunction([("accuracy", 1.0), ("examples.rewards:brevity", 0.5),
                             ("examples.rewards:steps_shown", 0.25)], grader, "boxed")
    completions = ["3+4=7 7-2=5 \\boxed{5}", "3+4-2=5 \\boxed{5}", "no"]
    scored = reward(completions, ["5", "5", "5"], operands=[3, 3, 3], question=["3+4-2"] * 3)
    brevity = [1 - len(c) / BREVITY_CHARS for c in completions]
    assert scored.rewards == pytest.approx([1 + 0.5 * brevity[0] + 0.25, 1 + 0.5 * brevity[1], 0.5 * brevity[2]])
    with pytest.raises(RewardTermError, match="'examples.rewards:steps_shown': raised TypeError"):
        reward(completions, ["5"] * 3)  # no operands field: the function's own error, named


OWN_TERMS = """
def none_for_short(completions, golds, **fields):
    return [None if len(c) < 2 else 0.5 for c in completions]

def crash(completions, golds, **fields):
    raise KeyError("level")

def too_few(completions, golds, **fields):
    return [1.0]

def text(completions, golds, **fields):
    return ["high"] * len(completions)

not_a_function = 3
"""


@pytest.mark.parametrize(("name", "message"), [
    ("own_terms_mod:crash", "reward term 'own_terms_mod:crash': raised KeyError: 'level'"),
    ("own_terms_mod:too_few", "reward term 'own_terms_mod:too_few': returned 1 values for 2 completions"),
    ("own_terms_mod:text", "reward term 'own_terms_mod:text': returned 'high': expected a finite float or None"),
])
def test_own_reward_function_errors_at_call_are_one_line(grader, tmp_path, monkeypatch, name, message):
    (tmp_path / "own_terms_mod.py").write_text(OWN_TERMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = RewardFunction([("accuracy", 1.0), (name, 1.0)], grader, "boxed")
    with pytest.raises(RewardTermError) as info:
        reward(["ab", "cd"], ["1", "1"])
    assert isinstance(info.value, UserError)  # the command line shows it as one line, exit 2
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "message"), [
    ("own_terms_mod:missing", "reward term 'own_terms_mod:missing': 'own_terms_mod' has no attribute 'missing'"),
    ("own_terms_mod:not_a_function", "reward term 'own_terms_mod:not_a_function': 'not_a_function' is not callable (int)"),
    ("no_such_pkg.rewards:f", "reward term 'no_such_pkg.rewards:f': cannot import 'no_such_pkg.rewards' "
                              "(ModuleNotFoundError: No module named 'no_such_pkg')"),
    (":f", "reward term ':f': an own reward function is named 'package.module:function'"),
])
def test_own_reward_function_bad_paths_fail_at_build(grader, tmp_path, monkeypatch, name, message):
    (tmp_path / "own_terms_mod.py").write_text(OWN_TERMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardTermError) as info:
        RewardFunction([(name, 1.0)], grader, "boxed")
    assert str(info.value) == message


def test_own_reward_none_is_ungradable(grader, tmp_path, monkeypatch):
    (tmp_path / "own_terms_mod.py").write_text(OWN_TERMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    scored = RewardFunction([("accuracy", 1.0), ("own_terms_mod:none_for_short", 2.0)], grader, "boxed")([b("1"), "x"], ["1", "1"])
    assert scored.rewards == [2.0, None] and scored.correct == [True, False]


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "reward").glob("*.yaml")), ids=lambda p: p.stem)
def test_reward_configs_build(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["name"] == path.stem
    cfg = OmegaConf.merge(OmegaConf.structured(TrainAppConfig), {"reward": raw})
    with build.reward(cfg) as reward:
        scored = reward(["<think>x</think><answer>\\boxed{3}</answer>", "3"], ["3", "3"])
        weights = {t.name: t.weight for t in cfg.reward.terms}
        assert scored.correct == [True, False]
        if "random" in weights:  # whatever the answer
            assert set(scored.rewards) <= {0.0, weights["random"]}
        else:
            assert scored.rewards == [sum(weights.values()), 0.0]




# Oracles on the real data -------------------------------------------------------------------
# MATH-500 references whose last \boxed{} in `solution` does not grade equal to `answer`, and why.
# None: the `answer` field is the verbatim content of the solution's last box in all 500 rows,
# and math-verify parses every one of them (checked with the exact-match shortcut off).
MATH500_EXPECTED_MISSES: dict[str, str] = {}


def _rows(name: str) -> list[dict]:
    with open(DATA / name / "test.jsonl") as f:
        return [json.loads(line) for line in f]


@needs_data
@pytest.mark.parametrize("shortcuts", [True, False], ids=["default", "math_verify_only"])
def test_math500_oracle(shortcuts):
    rows = _rows("math500")
    with Grader(timeout_s=2.0, last_number_fallback=False) as g:
        g._shortcuts = shortcuts
        verdicts = g.correct([r["solution"] for r in rows], [r["answer"] for r in rows])
    misses = {r["unique_id"]: r["answer"] for r, v in zip(rows, verdicts, strict=True) if v is not True}
    assert set(misses) == set(MATH500_EXPECTED_MISSES), misses
    assert 1 - len(misses) / len(rows) >= 0.99


@needs_data
def test_math500_answers_do_not_match_other_problems(grader):
    rows = _rows("math500")
    answers = [r["answer"] for r in rows]
    verdicts = grader.correct([f"\\boxed{{{a}}}" for a in answers[1:] + answers[:1]], answers)
    # coincidences only: consecutive problems whose answers are equal
    assert [i for i, v in enumerate(verdicts) if v] == [22, 186, 403]  # 5 ~ x=5, 7 ~ 7, 3 ~ 3


@needs_data
def test_gsm8k_oracle(grader):
    rows = _rows("gsm8k")
    golds = [extract_gold_gsm8k(r["answer"]) for r in rows]
    assert grader.correct([r["answer"] for r in rows], golds) == [True] * len(rows)


@needs_data
def test_olympiadbench_golds_grade_right_boxed_whole_and_one_box_per_part(grader):
    from mgrpo_cli.data.loaders import load_problems
    from mgrpo_cli.grading.extract import split_parts

    raw = yaml.safe_load((REPO / "conf" / "dataset" / "olympiadbench.yaml").read_text())
    cfg = OmegaConf.merge(OmegaConf.structured(TrainAppConfig), {"dataset": raw})
    golds = [p.answer for p in load_problems(build.dataset_spec(cfg.dataset), "test", data_dir=DATA).problems]
    assert grader.correct([f"\\boxed{{{g}}}" for g in golds], golds) == [True] * len(golds)
    several = [g for g in golds if len(split_parts(g)) > 1]
    per_part = [" and ".join(f"$\\boxed{{{p}}}$" for p in split_parts(g)) for g in several]
    assert len(several) >= 50  # the joined multi-answer golds
    assert grader.correct(per_part, several) == [True] * len(several)


# DAPO's overlong shaping and the random-reward control (issue 32) ---------------------------------------

def test_overlong_penalty_is_zero_before_the_buffer_and_linear_inside_it():
    import torch

    from mgrpo_cli.grading.rewards import overlong_penalty

    # budget 16, buffer 4: free up to 12 tokens; 14 tokens = 2 of 4 into the buffer = -0.5 * factor
    got = overlong_penalty(torch.tensor([0, 10, 12, 13, 14, 16]), budget=16, buffer_len=4, factor=2.0)
    assert got.tolist() == [0.0, 0.0, 0.0, -0.5, -1.0, -2.0]


def test_the_random_term_is_bernoulli_reseeded_and_ignores_the_answer(grader):
    fn = RewardFunction([("random", 1.0)], grader, "boxed", random_probability=0.25)
    right = [b("4")] * 400
    fn.reseed(7)
    first = fn(right, ["4"] * 400)
    fn.reseed(7)
    again = fn(right, ["4"] * 400)
    assert first.rewards == again.rewards and set(first.rewards) == {0.0, 1.0}
    assert first.correct == [True] * 400  # still graded: accuracy stays measured
    # 400 draws of p = 0.25: mean 0.25, std 0.0217; 5 std either side
    assert abs(sum(first.rewards) / 400 - 0.25) < 5 * (0.25 * 0.75 / 400) ** 0.5
    fn.reseed(8)
    assert fn(right, ["4"] * 400).rewards != first.rewards
    assert RewardFunction([("random", 1.0)], grader, "boxed", random_probability=0.0)(right, ["4"] * 400).rewards \
        == [0.0] * 400
