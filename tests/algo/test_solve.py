"""The graded records of ``solve`` (mgrpo_cli/algo/solve.py), which validation's held-out rows and
``mgrpo eval``'s problems.jsonl both come from, on literal answers."""
from mgrpo_cli.algo.solve import Solved


def _answer(text: str, gold: str):
    """The last word, as a grader's ``answer`` reads a completion (the gold is the problem's)."""
    assert gold in ("3", "5")
    return text.rsplit(" ", 1)[-1] if " " in text else None


def test_records_carry_verdicts_answers_and_the_second_pass():
    solved = Solved([["x = 3", "x = 4"], ["none"]], [[True, False], [None]], t2_texts=["so 3", "so 5"],
                    t2_correct=[True, False], prompts=["p0", "p1"], t2_prompts=["q0", "q1"])
    first, second = solved.records(["3", "5"], _answer)
    assert first.answers == ["3", "4"] and second.answers == [None] and first.t2_answer == "3"
    assert first.heldout("a").to_json() == {"id": "a", "t1": True, "t2": True, "t1_answer": "3", "t2_answer": "3"}
    assert second.heldout("b").to_json() == {"id": "b", "t1": False, "t2": False, "t1_answer": None,
                                             "t2_answer": "5"}
    assert list(first.fields()) == ["prompt", "completions", "t2_prompt", "t2_completion", "answers", "correct",
                                    "t2_answer", "t2_correct"]
    assert first.fields()["t2_prompt"] == "q0" and first.fields()["correct"] == [True, False]


def test_records_without_a_second_pass():
    solved = Solved([["x = 3"]], [[False]], prompts=["p0"])
    (only,) = solved.records(["3"], _answer)
    assert only.heldout("a").to_json() == {"id": "a", "t1": False, "t2": None, "t1_answer": "3", "t2_answer": None}
    assert list(only.fields()) == ["prompt", "completions", "answers", "correct"]
