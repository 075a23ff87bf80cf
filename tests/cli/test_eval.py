"""`mgrpo eval` pieces: re-scoring reference solutions through the full pipeline, summaries, bad files."""
import json

import pytest
from conftest import compose, requires_data

from mgrpo_cli.cli.evaluate import RescoreError, read_records, run_eval, scalars
from mgrpo_cli.reporting.metrics import summarize


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rescore(tmp_path, dataset, rows):
    f = _write(tmp_path / f"{dataset}-refs.jsonl", rows)
    cfg = compose("eval", [f"dataset={dataset}", f"rescore={f}", "logger=none", f"paths.outputs={tmp_path}"])
    return run_eval(cfg)


def test_rescoring_reference_solutions_gsm8k_is_100_percent(tmp_path):
    path = requires_data("gsm8k", "test.jsonl")
    from mgrpo_cli.grading.extract import extract_gold_gsm8k

    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        r = json.loads(line)
        rows.append({"id": i, "gold": extract_gold_gsm8k(r["answer"]), "completions": [r["answer"]]})
    summary = _rescore(tmp_path, "gsm8k", rows)
    assert summary["n"] == 1319 and summary["acc_t1"] == 1.0


def test_rescoring_reference_solutions_math500_at_least_99_percent(tmp_path):
    path = requires_data("math500", "test.jsonl")
    rows = [{"id": r["unique_id"], "gold": r["answer"], "completions": [r["solution"]], "level": r["level"],
             "subject": r["subject"]} for r in map(json.loads, path.read_text().splitlines())]
    summary = _rescore(tmp_path, "math500", rows)
    assert summary["n"] == 500 and summary["acc_t1"] >= 0.99
    assert set(summary["by_level"]) == {"1", "2", "3", "4", "5"}
    assert sum(v["n"] for v in summary["by_subject"].values()) == 500


def test_summary_on_a_literal_table():
    records = [
        {"completions": ["a", "b"], "answers": ["1", "2"], "correct": [True, False], "t2_completion": "x",
         "t2_correct": True, "level": 1, "subject": "Algebra"},
        {"completions": ["c", "d"], "answers": ["3", "3"], "correct": [False, False], "t2_completion": "y",
         "t2_correct": True, "level": 2, "subject": "Algebra"},
        {"completions": ["e", "f"], "answers": ["5", "5"], "correct": [True, True], "t2_completion": "z",
         "t2_correct": False, "level": 2, "subject": "Geometry"},
    ]
    s = summarize(records)
    assert s["n"] == 3 and s["acc_t1"] == pytest.approx(2 / 3) and s["mean@2"] == pytest.approx(3 / 6)
    assert s["pass@1"] == pytest.approx(0.5) and s["pass@2"] == pytest.approx(2 / 3)
    assert s["maj@2"] == pytest.approx(2 / 3)  # ties go to the first answer
    assert s["acc_t2"] == pytest.approx(2 / 3)
    assert s["delta_i2c"] == pytest.approx(1 / 3) and s["delta_c2i"] == pytest.approx(1 / 3)
    assert s["delta"] == pytest.approx(0.0)
    # one t1-wrong problem, fixed; two t1-right problems, one broken
    assert s["fix_rate"] == 1.0 and s["break_rate"] == 0.5
    assert scalars(s, "eval/x")["eval/x/fix_rate"] == 1.0 and scalars(s, "eval/x")["eval/x/break_rate"] == 0.5
    assert s["by_level"]["1"]["acc"] == 1.0 and s["by_level"]["2"]["n"] == 2
    assert s["by_subject"]["Geometry"]["acc"] == 1.0


@pytest.mark.parametrize("content,needle", [
    ('{"gold": "1", "completions": ["x"]}\n{bad\n', ":2: bad JSON"),
    ('[1, 2]\n', ":1: not a JSON object"),
    ('{"gold": "1"}\n', ":1: missing field 'completions'"),
    ('{"completions": ["x"]}\n', ":1: missing field 'gold'"),
    ('\n\n', "holds no records"),
])
def test_bad_rescore_files_name_file_and_line(tmp_path, content, needle):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(RescoreError, match=needle.replace("[", r"\[")):
        read_records(f)


def test_rescore_accepts_single_completion_field(tmp_path):
    f = _write(tmp_path / "other.jsonl", [{"gold": "4", "completion": "so \\boxed{4}"}])
    assert read_records(f)[0]["completions"] == ["so \\boxed{4}"]


def test_eval_grades_each_answer_once(tmp_path):
    """2 problems, t1 and t2: 4 answers graded (not 8), and the grader's counts match the records."""
    cfg = compose("eval", ["dataset=arith", "eval.limit=2", "logger=none", "trainer.threads=1",
                           f"paths.outputs={tmp_path}"])
    summary = run_eval(cfg)
    records = [json.loads(line) for line in next(tmp_path.rglob("problems.jsonl")).read_text().splitlines()]
    assert len(records) == 2 and all(len(r["correct"]) == 1 and r["t2_completion"] is not None for r in records)
    verdicts = [v for r in records for v in (*r["correct"], r["t2_correct"])]
    assert summary["grader"]["graded"] == 4 == len(verdicts)
    assert summary["grader"]["correct"] == sum(v is True for v in verdicts)
    assert all(isinstance(a, str) or a is None for r in records for a in r["answers"])
