r"""Grading throughput on a mix of answers as models write them, and the slowest case.

The mix, from the data folder's test sets: MATH-500's reference solutions against their answers and
each answer against the next problem's (mostly wrong: math-verify's work); OlympiadBench's golds boxed
whole, one box per part (several-part golds) and against the next problem's; GSM8K's answers written
with thousands separators, right and one off; and a few hostile answers (a power tower, a huge power,
deep nesting) that only the time limit stops.

Two passes, each on a fresh grader (the default training config's: 2 s limit, no last-number fallback):
  * throughput: the mix in batches of 64 (one GRPO step's group batch), math-verify worker start
    excluded; answers/s overall and for the answers math-verify graded;
  * slowest case: every pair graded alone, its wall time; the slowest ordinary pairs are listed, and
    the hostile ones must end within the limit plus the worker's restart.
Targets (2 CPU cores): a 64-answer batch of the mix in at most a second (>= 64 answers/s); no ordinary
pair reaching the worker's own timer (3/4 of the limit), so none is cut off as a timeout; no hostile
pair over the limit + 1 s (the worker's restart). Prints one line per number; exits 1 if a target is
missed.

    python benchmarks/grading_mix.py [--data-dir DIR]   # DIR: else $MGRPO_DATA_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from mgrpo_cli.data.loaders import DatasetSpec, load_problems
from mgrpo_cli.grading.extract import extract_gold_gsm8k, split_parts
from mgrpo_cli.grading.grader import Grader
from mgrpo_cli.grading.worker import Worker

TIMEOUT_S = 2.0
BATCH = 64
THROUGHPUT_TARGET_PER_S = BATCH  # a batch a second
ORDINARY_TARGET_S = Worker.soft_fraction * TIMEOUT_S  # the worker's own timer
HOSTILE_TARGET_S = TIMEOUT_S + 1.0
HOSTILE = ["9^{9^{9^{9}}}", "10^{1000000000}", "(" * 400 + "7" + ")" * 400, "\\frac{" * 150 + "1" + "}{2}" * 150]


def boxed(answer: str) -> str:
    return f"Working through it step by step, the result follows. The answer is $\\boxed{{{answer}}}$."


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def olympiad_golds(data_dir: Path) -> list[str]:
    """OlympiadBench's golds as the data loader reads them (several answers joined with ", ")."""
    spec = {f.name: None for f in dataclasses.fields(DatasetSpec)}  # Hub settings unused: a file
    spec.update(name="olympiadbench", kind="file", test_path=str(data_dir / "olympiadbench" / "test.jsonl"),
                hub_rename={}, arith={}, answer_format="list", on_bad_row="error",
                fields={"question": "question", "answer": "final_answer", "solution": None, "subject": None,
                        "level": None, "id": "id"})
    return [p.answer for p in load_problems(DatasetSpec(**spec), "test", data_dir=data_dir).problems]


def mix(data_dir: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(label, completion, gold) pairs: the ordinary mix, and the hostile answers."""
    pairs: list[tuple[str, str, str]] = []
    math500 = _rows(data_dir / "math500" / "test.jsonl")
    answers = [r["answer"] for r in math500]
    for r, other in zip(math500, answers[1:] + answers[:1], strict=True):
        pairs += [("math500 solution", r["solution"], r["answer"]), ("math500 other answer", boxed(other), r["answer"])]
    golds = olympiad_golds(data_dir)
    for gold, other in zip(golds, golds[1:] + golds[:1], strict=True):
        pairs += [("olympiad whole", boxed(gold), gold), ("olympiad other", boxed(other), gold)]
        parts = split_parts(gold)
        if len(parts) > 1:
            boxes = " and ".join(f"$\\boxed{{{p}}}$" for p in parts)
            pairs.append(("olympiad box per part", f"The answers are {boxes}.", gold))
    for r in _rows(data_dir / "gsm8k" / "test.jsonl"):
        gold = extract_gold_gsm8k(r["answer"])
        value = int(float(gold))
        pairs += [("gsm8k thousands", boxed(f"{value:,}"), gold), ("gsm8k one off", boxed(f"{value + 1:,}"), gold)]
    hostile = [("hostile", boxed(h), "7") for h in HOSTILE]
    return pairs, hostile


def throughput(pairs: list[tuple[str, str, str]]) -> tuple[float, dict[str, int]]:
    """Answers/s over the pairs in batches, and the grader's counters."""
    with Grader(timeout_s=TIMEOUT_S, last_number_fallback=False) as grader:
        grader.correct([boxed("\\sqrt{4}")], ["2"])  # the worker started outside the timed part
        grader.pop_stats()
        start = time.perf_counter()
        for j in range(0, len(pairs), BATCH):
            batch = pairs[j : j + BATCH]
            grader.correct([c for _, c, _ in batch], [g for _, _, g in batch])
        seconds = time.perf_counter() - start
        stats = grader.pop_stats()
    return len(pairs) / seconds, stats


def one_at_a_time(pairs: list[tuple[str, str, str]]) -> list[tuple[float, bool, str, str, str]]:
    """(seconds, decided by the fast path, label, completion, gold) of every pair graded alone on a
    fresh grader, slowest first."""
    times = []
    with Grader(timeout_s=TIMEOUT_S, last_number_fallback=False) as grader:
        grader.correct([boxed("\\sqrt{4}")], ["2"])
        for label, completion, gold in pairs:
            fast = grader.stats()["fast_path"]
            start = time.perf_counter()
            grader.correct([completion], [gold])
            seconds = time.perf_counter() - start
            times.append((seconds, grader.stats()["fast_path"] > fast, label, completion, gold))
    return sorted(times, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("MGRPO_DATA_DIR"),
                        help="the data folder (<name>/test.jsonl); default $MGRPO_DATA_DIR")
    parser.add_argument("--show", type=int, default=5, help="slowest ordinary pairs to list")
    args = parser.parse_args()
    if args.data_dir is None:
        print("grading_mix: no data folder: pass --data-dir or set MGRPO_DATA_DIR", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir)
    for name in ("math500", "olympiadbench", "gsm8k"):
        if not (data_dir / name / "test.jsonl").is_file():
            print(f"grading_mix: data file not found: {data_dir / name / 'test.jsonl'} (pass --data-dir)",
                  file=sys.stderr)
            return 2

    pairs, hostile = mix(data_dir)
    ok = True
    rate, stats = throughput(pairs)
    ok &= rate >= THROUGHPUT_TARGET_PER_S
    print(f"mix answers_per_s={rate:,.0f} n={len(pairs)} fast_path={stats['fast_path']} "
          f"correct={stats['correct']} target>={THROUGHPUT_TARGET_PER_S:,}")
    times = one_at_a_time(pairs + hostile)
    ordinary = [t for t in times if t[2] != "hostile"]
    slowest_hostile = max(t[0] for t in times if t[2] == "hostile")
    ok &= ordinary[0][0] < ORDINARY_TARGET_S and slowest_hostile <= HOSTILE_TARGET_S
    for name, rows in (("fast_path", [t for t in ordinary if t[1]]), ("math_verify", [t for t in ordinary if not t[1]])):
        print(f"alone[{name}] n={len(rows)} median_ms={1000 * rows[len(rows) // 2][0]:.3f} "
              f"mean_ms={1000 * sum(t[0] for t in rows) / len(rows):.3f}")
    print(f"slowest_ordinary seconds={ordinary[0][0]:.3f} target<{ORDINARY_TARGET_S:.1f}s")
    for seconds, _, label, completion, gold in ordinary[: args.show]:
        answer = completion[-70:].replace("\n", " ")
        print(f"  {seconds:.3f}s {label}: gold={gold[:50]!r} completion=...{answer!r}")
    print(f"slowest_hostile seconds={slowest_hostile:.3f} target<={HOSTILE_TARGET_S:.1f}s (limit {TIMEOUT_S:.0f}s)")
    print("PASS" if ok else "FAIL: a target was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
