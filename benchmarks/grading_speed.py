"""Grading speed: GSM8K-style numeric answers per second, and the whole MATH-500 oracle's time.

Targets (2 CPU cores): at least 5,000 numeric answers graded per second, and the MATH-500 oracle
(500 reference solutions graded against their ``answer``, math-verify worker start included) in at
most 10 s, both with the default grader and with its exact-match/plain-number shortcuts off (every
answer through math-verify). Prints one line per number; exits 1 if a target is missed.

    python benchmarks/grading_speed.py [--data-dir DIR] [--repeats 8]   # DIR: else $MGRPO_DATA_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mgrpo_cli.grading.extract import extract_gold_gsm8k
from mgrpo_cli.grading.grader import Grader

NUMERIC_TARGET_PER_S = 5_000
ORACLE_TARGET_S = 10.0
BATCH = 64  # completions per call, as one GRPO step's group batch


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def numeric_answers_per_s(golds: list[str], repeats: int) -> tuple[float, int]:
    """Graded answers/s over completions stating the gold (plain, with commas or $) or a near miss."""
    reasoning = "Let me work it out: 3 + 4 = 7, then 7 * 2 = 14, so 14 - 5 = 9. " * 6
    forms = ("{:d}", "{:,d}", "\\${:,d}", "{:d}.0")
    completions, batch_golds = [], []
    for i in range(repeats * len(golds)):
        gold = golds[i % len(golds)]
        value = int(float(gold)) + (i % 3 == 0)  # every third answer is wrong
        completions.append(f"{reasoning}The answer is $\\boxed{{{forms[i % 4].format(value)}}}$.")
        batch_golds.append(gold)
    with Grader(timeout_s=2.0, last_number_fallback=False) as grader:
        start = time.perf_counter()
        for j in range(0, len(completions), BATCH):
            grader.correct(completions[j : j + BATCH], batch_golds[j : j + BATCH])
        seconds = time.perf_counter() - start
        assert grader.stats()["fast_path"] == len(completions)
    return len(completions) / seconds, len(completions)


def math500_oracle_s(rows: list[dict], shortcuts: bool) -> tuple[float, int]:
    """Seconds for the whole oracle on a fresh grader (worker start included), and its agreement."""
    start = time.perf_counter()
    with Grader(timeout_s=2.0, last_number_fallback=False) as grader:
        grader._shortcuts = shortcuts
        verdicts = grader.correct([r["solution"] for r in rows], [r["answer"] for r in rows])
    return time.perf_counter() - start, sum(v is True for v in verdicts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("MGRPO_DATA_DIR"),
                        help="the data folder (<name>/test.jsonl); default $MGRPO_DATA_DIR")
    parser.add_argument("--repeats", type=int, default=8, help="passes over the 1,319 GSM8K test answers")
    args = parser.parse_args()
    if args.data_dir is None:
        print("grading_speed: no data folder: pass --data-dir or set MGRPO_DATA_DIR", file=sys.stderr)
        return 2
    args.data_dir = Path(args.data_dir)
    gsm8k, math500 = args.data_dir / "gsm8k" / "test.jsonl", args.data_dir / "math500" / "test.jsonl"
    for path in (gsm8k, math500):
        if not path.is_file():
            print(f"grading_speed: data file not found: {path} (pass --data-dir)", file=sys.stderr)
            return 2

    ok = True
    rate, n = numeric_answers_per_s([extract_gold_gsm8k(r["answer"]) for r in _rows(gsm8k)], args.repeats)
    ok &= rate >= NUMERIC_TARGET_PER_S
    print(f"gsm8k_numeric answers_per_s={rate:,.0f} n={n} target>={NUMERIC_TARGET_PER_S:,}")
    rows = _rows(math500)
    for label, shortcuts in (("default", True), ("math_verify_only", False)):
        seconds, agree = math500_oracle_s(rows, shortcuts)
        ok &= seconds <= ORACLE_TARGET_S
        print(
            f"math500_oracle[{label}] seconds={seconds:.2f} answers_per_s={len(rows) / seconds:,.0f} "
            f"agree={agree}/{len(rows)} target<={ORACLE_TARGET_S:.0f}s"
        )
    print("PASS" if ok else "FAIL: a target was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
